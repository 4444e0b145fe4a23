"""A pipeline's training stages and classic baselines: reuse what is finished, resume what is not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdpo.config import build_config
from sdpo.errors import UserError
from sdpo.pipeline.config import Pipeline


def run_training_stage(name: str, config_cls, runner, values: dict[str, Any], out: Path, path: Path) -> Path:
    """Run a training stage into `out`, reusing a finished run and resuming an interrupted one."""
    from sdpo.training.runs import CONFIG_FILE, changed_training_options, read_run_config

    values = {**values, "output_dir": str(out)}
    if (out / CONFIG_FILE).is_file() and (out / "adapter_config.json").is_file():
        changed = changed_training_options(read_run_config(out), build_config(config_cls, values, where=f"{path}: {name}"))
        if changed:
            raise UserError(f"{path}: stage {name}: {out} was trained with other options ({'; '.join(changed)}). "
                            f"Set them back to reuse it, or remove {out} to train the stage again.")
        print(f"[{name}] reusing {out}")
        return out
    values["resume"] = out.is_dir() and any(out.glob("checkpoint-*"))
    values["overwrite"] = True  # the pipeline owns this folder (e.g. a reference table left by a crash)
    print(f"[{name}] training into {out}" + (" (resuming)" if values["resume"] else ""))
    return runner(build_config(config_cls, values, where=f"{path}: {name}"))


def run_baselines(plan: Pipeline, data_dir: Path) -> list[dict[str, Any]]:
    """Rows for the classic recommenders, evaluated on the same split and records as the LMs."""
    if plan.baselines is None:
        return []
    from sdpo.baselines.train import CHECKPOINT, BaselineConfig, run_baseline

    section = {k: v for k, v in plan.baselines.items() if k != "models"}
    rows = []
    for name, options in plan.baselines["models"]:
        target = plan.out / "baselines" / name
        if (target / "metrics.json").is_file():
            print(f"[baseline] reusing {target}")
            metrics = json.loads((target / "metrics.json").read_text())
        else:
            resume = (target / CHECKPOINT).is_file()
            print(f"[baseline] {name}" + (" (resuming)" if resume else ""))
            values = {"data": str(data_dir), "seed": plan.seed, "eval_split": plan.split, "eval_limit": plan.limit,
                      "subset_seed": plan.shared["subset_seed"], **section, **options, "model": name, "output_dir": str(target),
                      "resume": resume, "overwrite": True, "compress_predictions": True}
            metrics = run_baseline(build_config(BaselineConfig, values, where=f"{plan.path}: baselines"))
        rows.append({**metrics, "stage": name, "protocol": "rank"})
    return rows
