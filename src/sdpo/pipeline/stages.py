"""A pipeline's training stages and classic baselines: reuse what is finished, resume what is not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sdpo.config import build_config
from sdpo.errors import UserError
from sdpo.io import write_folder_atomic
from sdpo.pipeline.config import Pipeline


def run_training_stage(name: str, config_cls, runner, values: dict[str, Any], out: Path, path: Path) -> Path:
    """Run a training stage into `out`, reusing a finished run and resuming an interrupted one (or a damaged one's training)."""
    from sdpo.lm.adapters import ADAPTER_WEIGHTS, check_adapter_folder, store_adapter_weights
    from sdpo.training.runs import CONFIG_FILE, changed_training_options, read_run_config

    values = {**values, "output_dir": str(out)}
    # finished: config and adapter, weights included (a study folder whose weights were kept out of git trains it again)
    finished = all((out / name).is_file() for name in (CONFIG_FILE, "adapter_config.json", ADAPTER_WEIGHTS))
    if finished:
        try:
            check_adapter_folder(out, f"adapter of stage {name}")
        except UserError as damage:  # cut short, say: it is not the adapter later stages and evaluations were made from
            print(f"[{name}] not reusing {out}: {damage}")
            finished = False
    if finished:
        saved = read_run_config(out)
        changed = changed_training_options(saved, build_config(config_cls, values, where=f"{path}: {name}"))
        if changed:
            raise UserError(f"{path}: stage {name}: {out} was trained with other options ({'; '.join(changed)}). "
                            f"Set them back to reuse it, or remove {out} to train the stage again.")
        if saved.get("adapter_dtype", "fp32") != "fp32":
            store_adapter_weights(out, saved["adapter_dtype"])  # finishes a cast a kill interrupted; else nothing
        print(f"[{name}] reusing {out}")
        return out
    values["resume"] = out.is_dir() and any(out.glob("checkpoint-*"))
    values["overwrite"] = True  # the pipeline owns this folder (e.g. a reference table left by a crash)
    print(f"[{name}] training into {out}" + (" (resuming)" if values["resume"] else ""))
    return runner(build_config(config_cls, values, where=f"{path}: {name}"))


def import_stage(name: str, source: str | Path, out: Path, start: Path | None = None) -> Path:
    """A stage that a run elsewhere trained (``adapter: DIR``, e.g. a shipped model): copied into `out` once, not trained.

    An align stage's copy names its SFT stage `start` as its reference, and
    must have been trained from that stage's weights (their SHA-256 as recorded) or is refused.
    """
    import yaml

    from sdpo.lm.adapters import ADAPTER_WEIGHTS, adapter_sha256, check_adapter_folder
    from sdpo.training.collaborative import load_collaborative
    from sdpo.training.export import EXPORTED_FROM, EXPORTED_SHA256
    from sdpo.training.runs import CONFIG_FILE, read_run_config

    source = Path(source)
    if source.resolve() == out.resolve() or out.resolve() in source.resolve().parents:
        raise UserError(f"stage {name}: adapter {source} lies inside the stage's own folder {out}; import a run from elsewhere.")
    check_adapter_folder(source, f"adapter of stage {name}")
    config = read_run_config(source, f"a training run folder (stage {name})")
    collaborative = load_collaborative(config)  # checked by its SHA-256; the copy carries it inside
    if collaborative is not None:
        config["collaborative"] = "collaborative"
        config.setdefault(EXPORTED_FROM, str(source))
    if start is not None:
        trained_from = config.get("sft_sha256")
        started = read_run_config(start)
        if not trained_from or trained_from not in (started.get(EXPORTED_SHA256), adapter_sha256(start)):
            raise UserError(f"stage {name}: {source} was not trained from the weights of stage {start.name}; "
                            "import the SFT run it was aligned from as that stage.")
        config["sft"] = str(start)  # recorded relative to the study folder (sdpo.pipeline.study.record_paths_in_study)
        config.setdefault(EXPORTED_FROM, str(source))
    if (out / ADAPTER_WEIGHTS).is_file() and adapter_sha256(out) == adapter_sha256(source):
        print(f"[{name}] reusing {out} (imported from {source})")
        return out
    print(f"[{name}] importing {source} into {out} (trained elsewhere, not here)")

    def fill(staging: Path) -> None:
        for item in source.iterdir():
            if item.is_file() and item.name != CONFIG_FILE:
                shutil.copy2(item, staging / item.name)
        if collaborative is not None:
            for file in collaborative.files():  # a stack's members lie in subfolders
                (staging / "collaborative" / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(collaborative.folder / file, staging / "collaborative" / file)
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=True, allow_unicode=True), encoding="utf-8")

    return write_folder_atomic(out, fill)  # the old folder is replaced only once the copy is whole


def run_baselines(plan: Pipeline, data_dir: Path) -> list[dict[str, Any]]:
    """Rows for the classic recommenders, evaluated on the same split and records as the LMs."""
    if plan.baselines is None:
        return []
    from sdpo.baselines.train import CHECKPOINT, BaselineConfig, run_baseline
    from sdpo.data.datasets import data_fingerprint

    section = {k: v for k, v in plan.baselines.items() if k not in ("models", "ensemble", "ensemble_val_limit", "stack")}
    fingerprint = data_fingerprint(data_dir)
    rows = []
    for name, options in plan.baselines["models"]:
        target = plan.out / "baselines" / name
        values = {"data": str(data_dir), "seed": plan.seed, "eval_split": plan.split, "eval_limit": plan.limit,
                  "subset_seed": plan.shared["subset_seed"], **section, **options, "model": name, "output_dir": str(target),
                  "resume": (target / CHECKPOINT).is_file(), "overwrite": True, "compress_predictions": True}
        config = build_config(BaselineConfig, values, where=f"{plan.path}: baselines")
        metrics = _finished_baseline(plan, name, target, config, fingerprint, {**section, **options}.get("folds") or 0)
        if metrics is None:
            print(f"[baseline] {name}" + (" (resuming)" if config.resume else ""))
            metrics = run_baseline(config)
        rows.append({**metrics, "stage": name, "protocol": "rank"})
    from sdpo.pipeline.ensemble import run_ensemble

    if plan.baselines.get("stack"):
        stack_baselines(plan)
    return rows + run_ensemble(plan, data_dir)


def _finished_baseline(plan: Pipeline, name: str, target: Path, config, fingerprint: str, folds: int) -> dict[str, Any] | None:
    """The metrics of a finished baseline to reuse; None where there is none, or its predictions are damaged (said in one line)."""
    from sdpo.data.datasets import load_split
    from sdpo.evaluation.results import read_whole_evaluation

    if not (target / "metrics.json").is_file():
        return None
    try:
        recorded = json.loads((target / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"[baseline] {target}: its metrics.json is damaged ({type(exc).__name__}): training it again")
        return None
    if recorded.get("data_sha256", fingerprint) != fingerprint:
        raise UserError(f"{plan.path}: baseline {name}: {target} was trained on other prepared data than {config.data} holds now "
                        f"(it was prepared again since). Remove {target} to train it again.")
    if name != "popularity" and folds and (recorded.get("folds") is None or len(recorded["folds"]) != folds):
        raise UserError(f"{plan.path}: baseline {name}: {target} was trained without the {folds} fold models the config "
                        f"asks for now. Remove {target} to train it again with them.")
    metrics, problem = read_whole_evaluation(target, load_split(config.data, config.eval_split, config.eval_limit, config.subset_seed))
    if problem:
        print(f"[baseline] {target}: {problem}: training it again")
        return None
    print(f"[baseline] reusing {target}")
    return metrics


def stack_baselines(plan: Pipeline) -> Path:
    """OUTPUT/baselines/stack: the baselines with item vectors side by side (`sdpo.baselines.stack`), made again if they changed."""
    import shutil

    from sdpo.baselines.fingerprint import model_sha256
    from sdpo.baselines.stack import StackedCollaborative, is_stack, make_stack

    members = [plan.out / "baselines" / name for name, _ in plan.baselines["models"] if name != "popularity"]
    target = plan.out / "baselines" / "stack"
    if is_stack(target):
        made = StackedCollaborative.load(target)
        if [m.sha256 for m in made.members] == [model_sha256(folder) for folder in members]:
            print(f"[baseline] reusing {target}")
            return target
        shutil.rmtree(target)
    print(f"[baseline] stack of {', '.join(folder.name for folder in members)}")
    return make_stack(members, target)
