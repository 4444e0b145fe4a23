"""Reference log-probs: the frozen SFT model's score of every candidate, computed once.

Before preference training, every record's candidates are scored by the SFT model (base +
SFT adapter) with `score_answers`, and the [N, C] table is saved in the run folder with a
fingerprint of what produced it (records, model, adapter weights, prompts, precision). It is
kept in the SFT run folder (``reference-cache/<fingerprint>.safetensors``, or in the align run
folder when the SFT folder cannot be written), so a resumed run and every other align run
from the same SFT model on the same records (DPO and S-DPO at each K in a study) reload it
instead of recomputing it. The reference therefore costs one no-grad pass over the data,
instead of a second model in memory and a second forward at every step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdpo.data.records import Record
from sdpo.evaluation.journal import JOURNAL_FILE, Journal
from sdpo.evaluation.protocols import candidate_logps
from sdpo.io import remove_temporaries, replace_atomic


def fingerprint(records: list[Record], model_name: str, adapter_dir: str | Path, domain: str, prompt_seed: int, dtype: str,
                collaborative: dict | None = None) -> str:
    """A hash of everything the reference scores depend on (records, weights, prompts, precision, collaborative tokens)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.to_json().encode())
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        path = Path(adapter_dir) / name
        digest.update(path.read_bytes() if path.is_file() else b"-")
    extra = [collaborative] if collaborative else []  # text-only runs keep the names their tables had
    digest.update(json.dumps([model_name, domain, prompt_seed, dtype, *extra], sort_keys=True).encode())
    return digest.hexdigest()


def compute_reference_logps(model, tokenizer, records: list[Record], domain: str, prompt_seed: int = 0, batch_size: int = 8,
                            prompts=None, journal: Journal | None = None) -> torch.Tensor:
    """[N, C]: log pi_ref(candidate c | prompt of record n), in each record's candidate order
    (rows of records with fewer candidates padded with -inf). `prompts`: as in `candidate_logps`; with a `journal`
    (`reference_journal`), batches it holds are read from it and new ones added, so a killed pass resumes."""
    rows = candidate_logps(model, tokenizer, records, domain, batch_size, prompt_seed, progress=True, journal=journal,
                           kind="reference", prompts=prompts)
    width = max(len(r) for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=float("-inf")) for r in rows])


def journal_path(table: Path, key: str) -> Path:
    """Where the pass that computes the table `key` for `table`'s folder keeps its finished batches."""
    return table.parent / f"{key}.{JOURNAL_FILE}"


def reference_journal(paths: Sequence[Path], key: str, settings: dict) -> Journal | None:
    """The journal of the pass that computes table `key`, beside the first of `paths` whose folder can be written (None
    where none can). Scores are journaled as the float32 they are, so a resumed pass gives the table an unbroken one does."""
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return Journal(journal_path(path, key), {"reference": key, **settings})
        except OSError:
            continue
    return None


def cached_reference_logps(paths: Sequence[Path], key: str, compute) -> torch.Tensor:
    """The table from the first of `paths` whose fingerprint is `key`; else `compute()` it and save it
    to the first of `paths` that can be written (written whole or not at all)."""
    return cached_tensors(paths, key, lambda: {"logps": compute()})["logps"]


def cached_tensors(paths: Sequence[Path], key: str, compute) -> dict[str, torch.Tensor]:
    """The tensors in the first of `paths` whose fingerprint is `key`; else `compute()` them (a dict of
    tensors) and save them to the first of `paths` that can be written (written whole or not at all)."""
    for path in paths:
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as stored:
                    if (stored.metadata() or {}).get("fingerprint") == key:
                        return {name: stored.get_tensor(name) for name in stored.keys()}  # noqa: SIM118 (safe_open is no dict)
            except Exception:  # damaged in any way (safetensors raises its own error type): recompute
                pass
    tensors = compute()
    for path in paths:
        remove_temporaries(path.parent)  # left by a process killed while saving a table
        try:
            replace_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                       metadata={"fingerprint": key}))
            break
        except OSError:
            continue  # e.g. a read-only SFT folder: try the next place
    return tensors
