"""Training run folders: the resolved config they record, and what a resume may trust.

A run folder (``sdpo sft`` / ``sdpo align`` output) holds ``sdpo_config.yaml``: every option
of the run, resolved (base model, data, record draws, prompts, precision), plus the sdpo
version that wrote it. It is written when training starts and again when it ends, so an
interrupted run says what it was doing. Its paths (`PATH_KEYS`) may be relative: a study records
them relative to the study folder, an export relative to itself; `read_run_config` finds them
(`sdpo.io.find_recorded`), and comparisons are of the folders they name, not of their spelling. ``--resume`` continues only a run of the same sdpo
version and the same training options, from a checkpoint whose files are all readable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from accelerate import PartialState

from sdpo import __version__
from sdpo.config import config_to_dict
from sdpo.errors import UserError
from sdpo.io import find_recorded, refuse_non_empty, remove_temporaries, write_text_atomic
from sdpo.lm.adapters import ADAPTER_WEIGHTS, check_safetensors

CONFIG_FILE = "sdpo_config.yaml"
VERSION_KEY = "sdpo_version"
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", ADAPTER_WEIGHTS, "adapter_config.json")
# Options that define what is trained: a resume must not change them.
TRAINING_KEYS = (
    "model", "data", "data_sha256", "domain", "prompt_seed", "train_limit", "subset_seed", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "lora_layers", "bf16", "load_in_4bit", "seed", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "max_grad_norm", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "sft", "sft_sha256", "loss", "negatives", "negative_sampling", "beta", "sft_weight", "boundary_negatives",
    "dynamic_beta", "dynamic_beta_margin", "reference",
    "collaborative", "collaborative_place", "collaborative_score", "collaborative_unknown_rate", "collaborative_inject",
    "collaborative_folds", "train_projector", "projector_learning_rate", "adapter_dtype",
)  # (collaborative_layer and collaborative_folds_sha256 are recorded from these, as collaborative_sha256 is)
# Options an align run takes from its SFT run when left out: compared only where given.
INHERITABLE = ("collaborative", "collaborative_place", "collaborative_score", "collaborative_folds", "collaborative_folds_sha256",
               "collaborative_inject", "collaborative_layer")
PATH_KEYS = ("data", "sft", "collaborative", "output_dir")  # options that name a folder


def write_run_config(config: Any, out: str | Path) -> None:
    """Save the resolved options of `config` (and the sdpo version) as OUT/sdpo_config.yaml (main process only)."""
    if not PartialState().is_main_process:
        return
    values = {**config_to_dict(config), VERSION_KEY: __version__}
    write_text_atomic(Path(out) / CONFIG_FILE, yaml.safe_dump(values, sort_keys=True, allow_unicode=True))


def read_run_config(run_dir: str | Path, what: str = "a run folder") -> dict[str, Any]:
    """The options a run folder recorded; a user error if the file is missing or unreadable."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: not {what} (no {CONFIG_FILE}). Give the output folder of sdpo sft or sdpo align.")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}). Rerun the stage that wrote it.") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: not a run config (a YAML mapping). Rerun the stage that wrote it.")
    for key in PATH_KEYS:
        if isinstance(values.get(key), str) and values[key]:
            values[key] = str(find_recorded(values[key], run_dir))
    return values


def same_option(key: str, saved: Any, now: Any) -> bool:
    """Whether a recorded option and today's agree; a folder agrees with any spelling of it (absolute, or from elsewhere)."""
    if key in PATH_KEYS and isinstance(saved, str) and isinstance(now, str) and saved and now:
        return Path(saved).resolve() == Path(now).resolve()
    return saved == now


def check_checkpoint(checkpoint: str | Path) -> None:
    """A user error unless every file a resume reads is present and readable."""
    checkpoint = Path(checkpoint)
    hint = f"Delete {checkpoint} to resume from an earlier checkpoint, or start over with --overwrite."
    for name in CHECKPOINT_FILES:
        if not (checkpoint / name).is_file():
            raise UserError(f"{checkpoint}: incomplete checkpoint, {name} is missing. {hint}")
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise UserError(f"{checkpoint / 'trainer_state.json'}: damaged. {hint}") from None
    try:
        check_safetensors(checkpoint / ADAPTER_WEIGHTS)
    except UserError as exc:
        raise UserError(f"{exc} {hint}") from None


def checkpoints(out: Path) -> list[Path]:
    """The checkpoint-N folders of a run, newest first."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def changed_training_options(saved: dict[str, Any], config: Any) -> list[str]:
    """'key old -> new' for each option that defines what is trained (TRAINING_KEYS) and differs.

    An option the saved run did not record (written before sdpo had it) is not compared.
    """
    now = config_to_dict(config)
    if now.get("sft"):  # an align run
        now = {k: v for k, v in now.items() if k not in INHERITABLE or v not in (None, "")}
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in TRAINING_KEYS if k in now and k in saved and not same_option(k, saved[k], now[k])]


def resume_point(config: Any) -> str | None:
    """The checkpoint to resume from, or None; refuses to overwrite a run or to resume a different one.

    With ``--resume``: the newest complete checkpoint-* folder, if the run folder was written by
    this sdpo version with the same training options. A newer checkpoint that a crash left
    half-written is skipped (and named). Without ``--resume`` the output folder must be empty
    (or ``--overwrite`` given).
    """
    out = Path(config.output_dir)
    found = checkpoints(out)
    remove_temporaries(out)  # what a killed run was writing: never read, so never trusted
    if not config.resume:
        refuse_non_empty(out, config.overwrite, "--output_dir", " (it has checkpoints: add --resume to continue)" if found else "")
        return None
    if not found:
        raise UserError(f"--resume: no checkpoint-* folder in {out}. Start without --resume.")
    saved = read_run_config(out)
    version = saved.get(VERSION_KEY)
    if version != __version__:
        raise UserError(f"--resume: {out} was written by sdpo {version or 'before 0.2'}, this is sdpo {__version__}; "
                        "its checkpoints may not mean the same. Start over in another --output_dir (or with --overwrite).")
    changed = changed_training_options(saved, config)
    if changed:
        raise UserError(f"--resume: {out} was started with other options ({'; '.join(changed)}). "
                        "Resume with the same options, or start in another --output_dir.")
    for newer, checkpoint in enumerate(found):
        try:
            check_checkpoint(checkpoint)
        except UserError as problem:
            if newer + 1 == len(found):
                raise  # no complete checkpoint at all
            print(f"[resume] skipping {checkpoint.name}: {problem}")
            continue
        return str(checkpoint)
    return None


def start_run(config: Any, resume_from: str | None) -> None:
    """Record the run's options and trim its log to `resume_from`, once every process has checked the folder.

    Under accelerate/torchrun each process runs `resume_point` on the folder; the main process
    writes into it only after all of them have, and the others write nothing.
    """
    from sdpo.training.logs import trim_log

    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        write_run_config(config, config.output_dir)
        trim_log(config.output_dir, resume_from)
