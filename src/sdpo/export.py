"""Export a trained run's LoRA adapter as a small folder to share or commit.

The folder holds what ``sdpo evaluate --adapter``, ``sdpo recommend`` and ``Recommender.load``
read: ``adapter_config.json``, ``adapter_model.safetensors`` (in bf16 by default, or fp32) and
``sdpo_config.yaml`` (the run's resolved options), plus its ``log.jsonl``. Checkpoints, optimizer
state and tokenizer files stay behind: the tokenizer comes with the base model. An S-DPO/DPO run's
reference is its SFT run; its export names the exported SFT folder instead (``reference``), so
reward ranking works wherever the two folders travel together.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from sdpo.errors import UserError
from sdpo.io import write_folder_atomic
from sdpo.runs import CONFIG_FILE, check_adapter_folder, read_run_config

WEIGHTS = "adapter_model.safetensors"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
EXPORTED_FROM = "exported_from"  # key added to the exported sdpo_config.yaml: the run folder it came from


def export_adapter(run_dir: str | Path, out: str | Path, reference: str | Path | None = None, dtype: str = "bf16") -> Path:
    """Write run_dir's adapter into the new folder `out` (nothing is written unless all of it is)."""
    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose {' or '.join(DTYPES)}.")
    config = read_run_config(run_dir, "a training run folder")
    check_adapter_folder(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; export into a new folder.")
    if config.get("sft"):
        config["sft"] = str(_checked_reference(run_dir, config["sft"], reference))
    elif reference is not None:
        raise UserError(f"--reference: {run_dir} is an SFT run; its reference is the base model. Leave --reference out.")
    config[EXPORTED_FROM] = str(run_dir)
    config["output_dir"] = str(out)
    weights = {name: tensor.to(DTYPES[dtype]) if tensor.is_floating_point() else tensor
               for name, tensor in load_file(run_dir / WEIGHTS).items()}

    def fill(staging: Path) -> None:
        shutil.copy2(run_dir / "adapter_config.json", staging / "adapter_config.json")
        save_file(weights, staging / WEIGHTS, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=True, allow_unicode=True), encoding="utf-8")
        if (run_dir / "log.jsonl").is_file():
            shutil.copy2(run_dir / "log.jsonl", staging / "log.jsonl")

    return write_folder_atomic(out, fill)


def _checked_reference(run_dir: Path, sft_run: str, reference: str | Path | None) -> Path:
    """The exported SFT folder that stands in for `sft_run`, the reference run_dir was trained against."""
    if reference is None:
        raise UserError(f"{run_dir} was trained against the SFT run {sft_run} (its reward's reference): export that run "
                        f"first and give its folder with --reference.")
    reference = Path(reference)
    check_adapter_folder(reference, "reference adapter")
    exported_from = read_run_config(reference, "an exported SFT folder").get(EXPORTED_FROM)
    if exported_from is None:
        raise UserError(f"--reference {reference}: not an exported folder (no {EXPORTED_FROM} in its {CONFIG_FILE}). "
                        f"Export {sft_run} with sdpo export and give that folder.")
    if Path(exported_from).resolve() != Path(sft_run).resolve():
        raise UserError(f"--reference {reference} was exported from {exported_from}, but {run_dir} was trained against "
                        f"{sft_run}. Give the export of {sft_run}.")
    return reference
