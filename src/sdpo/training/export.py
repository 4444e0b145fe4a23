"""Export a trained run's LoRA adapter as a small folder to share or commit.

The folder holds what ``sdpo evaluate --adapter``, ``sdpo recommend`` and ``Recommender.load``
read: ``adapter_config.json``, ``adapter_model.safetensors`` (in bf16 by default, or fp32) and
``sdpo_config.yaml`` (the run's resolved options), plus its ``log.jsonl``. Checkpoints, optimizer
state and tokenizer files stay behind: the tokenizer comes with the base model. An S-DPO/DPO run's
reference is its SFT run; its export names the exported SFT folder instead (``reference``, checked
by the hash of the SFT weights it was trained from, and written relative to the export), so reward
ranking works wherever the two folders travel together. A run with collaborative tokens carries
its collaborative model inside (``collaborative/``: config, item table, weights; named relative to
the export and checked by the SHA-256 the run recorded), so the folder is whole on its own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from sdpo.errors import UserError
from sdpo.io import write_folder_atomic
from sdpo.lm.adapters import ADAPTER_WEIGHTS, WEIGHT_DTYPES, adapter_sha256, check_adapter_folder, store_adapter_weights
from sdpo.training.runs import CONFIG_FILE, read_run_config

EXPORTED_FROM = "exported_from"  # keys added to the exported sdpo_config.yaml: the run folder it came from,
EXPORTED_SHA256 = "exported_sha256"  # and the SHA-256 of that run's adapter weights (before any cast)
COLLABORATIVE_DIR = "collaborative"  # inside an export: the collaborative model its prompts read


def export_adapter(run_dir: str | Path, out: str | Path, reference: str | Path | None = None, dtype: str = "bf16") -> Path:
    """Write run_dir's adapter into the new folder `out` (nothing is written unless all of it is)."""
    run_dir, out = Path(run_dir), Path(out)
    if dtype not in WEIGHT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose {' or '.join(WEIGHT_DTYPES)}.")
    config = read_run_config(run_dir, "a training run folder")
    check_adapter_folder(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; export into a new folder.")
    if config.get("sft"):
        # relative to the exported folder, so the pair works wherever the two folders travel together
        config["sft"] = os.path.relpath(_checked_reference(run_dir, config, reference).resolve(), out.resolve())
    elif reference is not None:
        raise UserError(f"--reference: {run_dir} is an SFT run; its reference is the base model. Leave --reference out.")
    collaborative = _collaborative_files(run_dir, config)
    if collaborative:
        config["collaborative"] = COLLABORATIVE_DIR
    config[EXPORTED_FROM] = str(run_dir)  # as given: no machine's absolute path travels with the folder
    config[EXPORTED_SHA256] = adapter_sha256(run_dir)
    config["output_dir"] = str(out)

    def fill(staging: Path) -> None:
        shutil.copy2(run_dir / "adapter_config.json", staging / "adapter_config.json")
        shutil.copy2(run_dir / ADAPTER_WEIGHTS, staging / ADAPTER_WEIGHTS)
        store_adapter_weights(staging, dtype)
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=True, allow_unicode=True), encoding="utf-8")
        if (run_dir / "log.jsonl").is_file():
            shutil.copy2(run_dir / "log.jsonl", staging / "log.jsonl")
        if collaborative:
            folder, files = collaborative
            for file in files:  # a stack's members lie in subfolders
                (staging / COLLABORATIVE_DIR / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(folder / file, staging / COLLABORATIVE_DIR / file)

    return write_folder_atomic(out, fill)


def _collaborative_files(run_dir: Path, config: dict) -> tuple[Path, list[Path]] | None:
    """The run's collaborative model folder and its files relative to it (None for a text-only run), checked against the
    SHA-256 it recorded."""
    from sdpo.training.collaborative import load_collaborative

    source = load_collaborative(config)
    return None if source is None else (Path(source.folder), source.files())


def _checked_reference(run_dir: Path, config: dict, reference: str | Path | None) -> Path:
    """The exported SFT folder that stands in for the SFT run that run_dir was trained against."""
    sft_run = config["sft"]
    if reference is None:
        raise UserError(f"{run_dir} was trained against the SFT run {sft_run} (its reward's reference): export that run "
                        f"first and give its folder with --reference.")
    reference = Path(reference)
    check_adapter_folder(reference, "reference adapter")
    exported = read_run_config(reference, "an exported SFT folder")
    if EXPORTED_FROM not in exported:
        raise UserError(f"--reference {reference}: not an exported folder (no {EXPORTED_FROM} in its {CONFIG_FILE}). "
                        f"Export {sft_run} with sdpo export and give that folder.")
    # by the weights' hash where the run recorded it, else by the folder
    same = (exported.get(EXPORTED_SHA256) == config["sft_sha256"] if config.get("sft_sha256")
            else Path(exported[EXPORTED_FROM]).resolve() == Path(sft_run).resolve())
    if not same:
        raise UserError(f"--reference {reference} was exported from {exported[EXPORTED_FROM]}, which is not the SFT adapter "
                        f"{run_dir} was trained against ({sft_run}). Give the export of that one.")
    return reference
