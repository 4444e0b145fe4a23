"""`run_pipeline`: data, training stages, evaluation of every stage protocol by protocol, baselines, one table."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from sdpo.data.datasets import data_fingerprint, load_split, read_manifest, resolve_domain
from sdpo.data.prepare import prepare_dataset
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.evaluation.results import read_whole_evaluation
from sdpo.io import folder_bytes, write_json, write_text_atomic
from sdpo.lm.adapters import adapter_sha256, shared_trunk_depth
from sdpo.pipeline.config import Pipeline, read_pipeline
from sdpo.pipeline.evaluate import evaluate_model, in_pinned_precision, read_candidate_logps
from sdpo.pipeline.fusion import run_fusion
from sdpo.pipeline.stages import import_stage, run_baselines, run_training_stage
from sdpo.pipeline.study import check_gitignore, committable, record_paths_in_study, warn_about_large_files, write_gitignore
from sdpo.pipeline.table import results_table, reward_row

TRUNK_CACHE = "trunk-cache"


def run_pipeline(path: str | Path, output_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Run the pipeline config at `path`; returns the results rows (also saved as results.json/.md).

    `output_dir` (default: the config's ``output_dir``) receives everything; its .gitignore lets
    git carry the study to a fresh checkout (`sdpo.pipeline.study`).
    """
    plan = read_pipeline(path, output_dir)
    check_gitignore(plan.out)
    started = time.perf_counter()
    data_dir = prepared_data(plan)
    write_gitignore(plan.out, plan.imported_stages)
    record_paths_in_study(plan.out)  # mends a folder an older sdpo wrote with paths of its machine
    plan.shared["domain"] = resolve_domain(data_dir, plan.shared["domain"])
    baseline_rows = run_baselines(plan, data_dir)  # first: a stage may read one as its collaborative model
    models = train_stages(plan, data_dir)
    record_paths_in_study(plan.out)
    results = evaluate_stages(plan, data_dir, models)
    rows = []
    for label, _, _ in models:  # the table: stage by stage
        for protocol in plan.protocols:
            if (label, protocol) in results:
                rows.append({**results[label, protocol], "stage": label})
                if "reward_hr@1" in results[label, protocol]:
                    rows.append({**reward_row(results[label, protocol]), "stage": label})
    rows.extend(run_fusion(plan, data_dir, models))
    rows.extend(baseline_rows)
    table = results_table(rows)
    write_json(plan.out / "results.json", rows)
    write_text_atomic(plan.out / "results.md", table + "\n")
    record_paths_in_study(plan.out)
    print(table)
    if committable(plan.out):  # a study folder to commit, not a run folder git ignores (runs/)
        warn_about_large_files(plan.out, plan.imported_stages)
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s; results in {plan.out / 'results.md'}")
    return rows


def prepared_data(plan: Pipeline) -> Path:
    """The prepared dataset folder: the config's ``data.path``, or OUTPUT/data, prepared from its source once."""
    if "path" in plan.data:
        read_manifest(plan.data["path"])
        return Path(plan.data["path"])
    data_dir = plan.out / "data"
    if (data_dir / "manifest.json").is_file():
        print(f"[data] reusing {data_dir}")
    else:
        dataset = plan.data.get("dataset", "lastfm")
        print(f"[data] preparing {dataset} into {data_dir}")
        prepare_dataset(dataset, data_dir, seed=plan.seed, mirror=plan.data.get("mirror"))
    return data_dir


def train_stages(plan: Pipeline, data_dir: Path) -> list[tuple[str, str | None, str | None]]:
    """Train (or reuse) every SFT and align stage; (label, adapter folder, label of its reference stage) per model, zero-shot first."""
    from sdpo.training.preference import AlignConfig, run_align
    from sdpo.training.sft import SFTConfig, run_sft

    models: list[tuple[str, str | None, str | None]] = [("zero-shot", None, None)]
    common = {"model": plan.model, "data": str(data_dir), "data_sha256": data_fingerprint(data_dir), "seed": plan.seed, **plan.shared}
    for name, options in plan.sft_stages:
        options = collaborative_folder(plan, options)
        if "adapter" in options:
            adapter = import_stage(name, options["adapter"], plan.out / name)
        else:
            adapter = run_training_stage(name, SFTConfig, run_sft, {**common, **options}, plan.out / name, plan.path)
        models.append((name, str(adapter), "zero-shot"))
    for name, options, start in plan.align_stages:
        if "adapter" in options:
            models.append((name, str(import_stage(name, options["adapter"], plan.out / name, plan.out / start)), start))
            continue
        options = collaborative_folder(plan, options)
        # the SFT adapter's hash: a stage trained from an SFT run that was trained again since is not reused
        section = {**common, "sft": str(plan.out / start), "sft_sha256": adapter_sha256(plan.out / start), **options}
        models.append((name, str(run_training_stage(name, AlignConfig, run_align, section, plan.out / name, plan.path)), start))
    return models


def collaborative_folder(plan: Pipeline, options: dict[str, Any]) -> dict[str, Any]:
    """A stage's options with ``collaborative: NAME`` (a model of the baselines section, or ``stack``) as that baseline's folder."""
    name = options.get("collaborative")
    if plan.baselines is not None and (name in [model for model, _ in plan.baselines["models"]] or (name == "stack" and plan.baselines.get("stack"))):
        return {**options, "collaborative": str(plan.out / "baselines" / name)}
    return options


def evaluate_stages(plan: Pipeline, data_dir: Path, models) -> dict[tuple[str, str], dict[str, Any]]:
    """Evaluate (or reuse) every stage, protocol by protocol; the metrics by (stage, protocol)."""
    evaluated = plan.evaluate.get("stages", [label for label, _, _ in models])  # names checked by read_pipeline
    # the layers no evaluated adapter changes run once per batch for all stages (sdpo.lm.trunk)
    trunk_dir, trunk_depth = plan.out / "eval" / TRUNK_CACHE, None
    generated = plan.evaluate.get("generate_stages", evaluated)
    # soft tokens that enter layer 0 through each stage's own projectors change every layer's states: no shared trunk;
    # late ones (--collaborative_inject lora) leave the layers below them to text, which every stage shares
    collaborative = {label for label, a, _ in models if _reads_collaborative(a, at_input=True)}
    adapters = [a for label, a, _ in models if label in evaluated and a and label not in collaborative]
    if collaborative & set(evaluated):
        print(f"[evaluate] {', '.join(sorted(collaborative & set(evaluated)))}: no trunk cache (collaborative tokens at the input)")
    if plan.evaluate.get("trunk_cache", True) and {"rank", "generate"} & set(plan.protocols):
        trunk_depth = shared_trunk_depth(adapters)
        print(f"[evaluate] layers 0-{trunk_depth - 1} are shared by every stage and computed once (trunk cache)" if trunk_depth
              else "[evaluate] no trunk cache (no evaluated adapter, or one that changes the first layer or every layer)")
    records = load_split(data_dir, plan.split, plan.limit, plan.shared["subset_seed"])
    fingerprint = data_fingerprint(data_dir)
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for protocol in plan.protocols:
        for label, adapter, reference_label in models:
            if label not in (generated if protocol == "generate" else evaluated):
                continue
            target = plan.out / "eval" / f"{label}-{protocol}"
            metrics = _finished_evaluation(target, adapter, plan.shared["bf16"], records, fingerprint)
            if metrics is not None:
                print(f"[evaluate] reusing {target}")
            else:
                print(f"[evaluate] {label}, {protocol} protocol, {plan.split} split")
                # a stage's reward needs its reference stage's log-probs: free when that stage is evaluated too
                reward = reference_label in evaluated and protocol == "rank"
                reference_scores = None
                if reward and reference_label == "zero-shot" and _reads_collaborative(adapter):
                    pass  # its reference is the base model with the initial projectors, on its own prompts: computed
                elif reward:
                    reference_dir = plan.out / "eval" / f"{reference_label}-rank"
                    reference_scores = read_candidate_logps(reference_dir, records)
                    if reference_scores is None:  # never fall back to another reference than the stage's own
                        raise UserError(f"{label}'s reward needs {reference_label}'s rank predictions for these records, and "
                                        f"{reference_dir} has none that cover them. Remove {reference_dir} to evaluate {reference_label} again.")
                metrics = evaluate_model(
                    data_dir, plan.split, plan.model, adapter, protocol, plan.limit, target, plan.evaluate.get("batch_size", 8),
                    plan.shared["domain"], plan.shared["prompt_seed"], subset_seed=plan.shared["subset_seed"], bf16=plan.shared["bf16"],
                    score=plan.evaluate.get("score", "logp"), reference_scores=reference_scores, reward=reward,
                    trunk_cache=trunk_dir / protocol if trunk_depth and label not in collaborative else None, trunk_depth=trunk_depth,
                    compress_predictions=True,
                )
            results[label, protocol] = metrics
        _remove_trunk_cache(trunk_dir / protocol, f"every stage is evaluated with {protocol}")
    _remove_trunk_cache(trunk_dir, "every stage is evaluated")
    return results


def _reads_collaborative(adapter: str | None, at_input: bool = False) -> bool:
    """Whether the run that wrote `adapter` reads collaborative tokens (then zero-shot's text prompts are not its reference);
    with `at_input`, only where they enter at the input (not late, at the first LoRA layer)."""
    from sdpo.training.runs import CONFIG_FILE, read_run_config

    if adapter is None or not (Path(adapter) / CONFIG_FILE).is_file():
        return False
    settings = read_run_config(adapter)
    return bool(settings.get("collaborative")) and not (at_input and settings.get("collaborative_layer"))


def _remove_trunk_cache(folder: Path, why: str) -> None:
    if folder.exists():
        size = folder_bytes(folder)
        shutil.rmtree(folder)
        print(f"[evaluate] {why}: removed the trunk cache {folder} ({size / 1e9:.2f} GB)")


def _finished_evaluation(target: Path, adapter: str | None, bf16: bool | None, records: list[Record], fingerprint: str) -> dict[str, Any] | None:
    """The metrics of a finished, whole evaluation of this very adapter on `records` of the data `fingerprint` names, in the
    pinned precision if any; None (evaluate it, saying why in one line) where any of that is not so."""
    if not (target / "metrics.json").is_file():
        return None
    metrics, problem = read_whole_evaluation(target, records)
    if problem:
        print(f"[evaluate] {target}: {problem}: evaluating again")
        return None
    if adapter is not None and metrics.get("adapter_sha256", "unrecorded") not in ("unrecorded", adapter_sha256(adapter)):
        print(f"[evaluate] {target} evaluated another adapter of that stage (it was trained again since): evaluating again")
        return None
    if metrics.get("data_sha256", fingerprint) != fingerprint:
        print(f"[evaluate] {target} evaluated other prepared data (prepared again since): evaluating again")
        return None
    if not in_pinned_precision(metrics, bf16):
        print(f"[evaluate] {target} ran in {'bf16' if metrics['bf16'] else 'fp32'}, the pipeline pins the other: evaluating again")
        return None
    return metrics
