"""Reference log-probs: the frozen SFT model's score of every candidate, computed once.

Before preference training, every record's candidates are scored by the SFT model (base +
SFT adapter) with `score_answers`, and the [N, C] table is saved in the run folder with a
fingerprint of what produced it (records, model, adapter weights, prompts). A resumed or
repeated run whose fingerprint matches reloads the table instead of recomputing it. The
reference therefore costs one no-grad pass over the data, instead of a second model in
memory and a second forward at every step.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdpo.evaluation import candidate_logps
from sdpo.records import Record


def fingerprint(records: list[Record], model_name: str, adapter_dir: str | Path, domain: str, prompt_seed: int, dtype: str) -> str:
    """A hash of everything the reference scores depend on (records, weights, prompts, precision)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.to_json().encode())
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        path = Path(adapter_dir) / name
        digest.update(path.read_bytes() if path.is_file() else b"-")
    digest.update(json.dumps([model_name, domain, prompt_seed, dtype]).encode())
    return digest.hexdigest()


def compute_reference_logps(model, tokenizer, records: list[Record], domain: str, prompt_seed: int = 0, batch_size: int = 8) -> torch.Tensor:
    """[N, C]: log pi_ref(candidate c | prompt of record n), in each record's candidate order
    (rows of records with fewer candidates padded with -inf)."""
    rows = candidate_logps(model, tokenizer, records, domain, batch_size, prompt_seed, progress=True)
    width = max(len(r) for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=float("-inf")) for r in rows])


def cached_reference_logps(path: Path, key: str, compute) -> torch.Tensor:
    """Load the table at `path` if its fingerprint is `key`; else `compute()` it and save it."""
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as stored:
                if (stored.metadata() or {}).get("fingerprint") == key:
                    return stored.get_tensor("logps")
        except (OSError, ValueError, RuntimeError):
            pass  # unreadable: recompute
    logps = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"logps": logps.contiguous()}, str(tmp), metadata={"fingerprint": key})
    tmp.replace(path)
    return logps
