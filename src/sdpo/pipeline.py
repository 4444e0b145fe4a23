"""The main job: run the stages a pipeline config lists and print one results table.

A pipeline config (see ``configs/quickstart.yaml``)::

    output_dir: runs/quickstart      # everything goes under here
    model: smollm2-135m              # the base LM
    data: {dataset: lastfm}          # fetch + prepare into OUTPUT/data (or {path: DIR})
    sft: {train_limit: 256, ...}     # any SFTConfig option; output in OUTPUT/sft
    align: {negatives: 3, ...}       # any AlignConfig option, from OUTPUT/sft; output in OUTPUT/align
    baselines: {models: [popularity, sasrec], ...}   # any BaselineConfig option; OUTPUT/baselines/NAME
    evaluate: {split: test, limit: 200, protocols: [generate, rank]}

Evaluation covers the zero-shot base model and every trained stage. A stage whose output
is complete is reused, and an interrupted SFT resumes from its last checkpoint, so
re-running a pipeline continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sdpo.config import build_config, read_yaml
from sdpo.datasets import load_split, read_manifest
from sdpo.errors import UserError
from sdpo.evaluation import PROTOCOLS, evaluate
from sdpo.io import write_json, write_text_atomic

PREPARERS = ("lastfm", "movielens-100k", "interactions", "llara")
PIPELINE_KEYS = {"output_dir", "model", "seed", "data", "sft", "align", "baselines", "evaluate"}
TABLE_COLUMNS = ("hr@1", "valid_ratio", "strict_hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr")


def prepare_dataset(
    dataset: str,
    out: str | Path,
    seed: int = 0,
    mirror=None,
    raw_dir=None,
    overwrite: bool = False,
    *,
    interactions: str | Path | None = None,
    items: str | Path | None = None,
    folder: str | Path | None = None,
    domain: str | None = None,
    min_rating: float | None = None,
    trust_pickles: bool = False,
) -> dict[str, Any]:
    """Build the prepared folder `out` for `dataset`; returns its manifest.

    lastfm and movielens-100k are fetched (or copied from a mirror) first; ``interactions``
    reads the user's files `interactions` + `items`; ``llara`` reads the LLaRA `folder`.
    """
    from sdpo.datasets import write_prepared
    from sdpo.prompts import DOMAINS
    from sdpo.sources.fetch import fetch

    if dataset not in PREPARERS:
        raise UserError(f"unknown dataset {dataset!r}; known: {', '.join(PREPARERS)}.")
    if dataset in ("interactions", "llara") and domain not in DOMAINS:
        raise UserError(f"{dataset}: --domain must be one of {', '.join(DOMAINS)}.")
    if dataset == "lastfm":
        from sdpo.sources.lastfm import prepare_lastfm

        splits, manifest = prepare_lastfm(fetch(dataset, raw_dir, mirror), seed)
    elif dataset == "movielens-100k":
        from sdpo.sources.movielens import prepare_movielens

        splits, manifest = prepare_movielens(fetch(dataset, raw_dir, mirror), seed, min_rating)
    elif dataset == "interactions":
        from sdpo.sources.interactions import build_records, parse_interactions, parse_titles

        if not interactions or not items:
            raise UserError("interactions: give both --interactions FILE and --items FILE.")
        splits, info = build_records(parse_interactions(Path(interactions), min_rating), parse_titles(Path(items)), seed)
        manifest = {"dataset": "interactions", "domain": domain, "seed": seed, "min_rating": min_rating,
                    "sources": {"interactions": str(interactions), "items": str(items)}, **info}
    else:
        from sdpo.sources.llara import prepare_llara

        if not folder:
            raise UserError("llara: give the folder with --dir DIR.")
        splits, manifest = prepare_llara(Path(folder), domain, seed, trust_pickles)
    write_prepared(out, splits, manifest, overwrite=overwrite)
    return read_manifest(out)


def evaluate_model(
    data, split, model_name, adapter, protocol, limit, output, batch_size=8, domain=None, prompt_seed=0, progress=True
) -> dict[str, Any]:
    """Evaluate a model (+ adapter) on a prepared split and save metrics.json / predictions.jsonl."""
    from sdpo.models import load_model

    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose generate or rank.")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}.")
    domain = domain or read_manifest(data).get("domain", "music")
    records = load_split(data, split, limit=limit)
    model, tokenizer = load_model(model_name, adapter)
    info = {"model": model_name, "adapter": str(adapter) if adapter else None, "data": str(data), "split": split}
    result = evaluate(model, tokenizer, records, domain, protocol, batch_size, prompt_seed, progress, info)
    result.save(output)
    return result.metrics


def _section(config: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{path}: '{key}' must be a mapping of options.")
    return value


def run_pipeline(path: str | Path) -> list[dict[str, Any]]:
    """Run the pipeline config at `path`; returns the results rows (also saved as results.json/.md)."""
    path = Path(path)
    config = read_yaml(path)
    unknown = sorted(set(config) - PIPELINE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(PIPELINE_KEYS))}.")
    out = Path(config.get("output_dir", "runs/pipeline"))
    base_model = str(config.get("model", "smollm2-135m"))
    seed = int(config.get("seed", 0))
    started = time.perf_counter()

    data_cfg = _section(config, "data", path)
    if "path" in data_cfg:
        data_dir = Path(data_cfg["path"])
        read_manifest(data_dir)
    else:
        data_dir = out / "data"
        if not (data_dir / "manifest.json").is_file():
            dataset = data_cfg.get("dataset", "lastfm")
            print(f"[data] preparing {dataset} into {data_dir}")
            prepare_dataset(dataset, data_dir, seed=seed, mirror=data_cfg.get("mirror"))
        else:
            print(f"[data] reusing {data_dir}")

    from sdpo.training.preference import AlignConfig, run_align
    from sdpo.training.sft import SFTConfig, run_sft

    models: list[tuple[str, str | None]] = [("zero-shot", None)]
    common = {"model": base_model, "data": str(data_dir), "seed": seed}
    if "sft" in config:
        sft_dir = _run_training_stage("sft", SFTConfig, run_sft, {**common, **_section(config, "sft", path)}, out / "sft", path)
        models.append(("sft", str(sft_dir)))
    if "align" in config:
        if "sft" not in config:
            raise UserError(f"{path}: the align stage starts from the SFT model; add an sft section.")
        section = {**common, "sft": str(out / "sft"), **_section(config, "align", path)}
        label = "s-dpo" if section.get("loss", "sdpo") == "sdpo" else "dpo"
        models.append((label, str(_run_training_stage("align", AlignConfig, run_align, section, out / "align", path))))

    eval_cfg = _section(config, "evaluate", path)
    protocols = eval_cfg.get("protocols", list(PROTOCOLS))
    split, limit = eval_cfg.get("split", "test"), eval_cfg.get("limit")
    rows = []
    for label, adapter in models:
        for protocol in protocols:
            target = out / "eval" / f"{label}-{protocol}"
            if (target / "metrics.json").is_file():
                print(f"[evaluate] reusing {target}")
                metrics = json.loads((target / "metrics.json").read_text())
            else:
                print(f"[evaluate] {label}, {protocol} protocol, {split} split")
                metrics = evaluate_model(data_dir, split, base_model, adapter, protocol, limit, target, eval_cfg.get("batch_size", 8))
            rows.append({**metrics, "stage": label})
    rows.extend(_run_baselines(config, path, out, data_dir, seed, split, limit))
    table = results_table(rows)
    write_json(out / "results.json", rows)
    write_text_atomic(out / "results.md", table + "\n")
    print(table)
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s; results in {out / 'results.md'}")
    return rows


def _run_baselines(config, path, out, data_dir, seed, split, limit) -> list[dict[str, Any]]:
    """Rows for the classic recommenders, evaluated on the same split and records as the LMs."""
    if "baselines" not in config:
        return []
    from sdpo.baselines.train import CHECKPOINT, BaselineConfig, run_baseline

    section = dict(_section(config, "baselines", path))
    names = section.pop("models", ["popularity", "sasrec"])
    rows = []
    for name in names:
        target = out / "baselines" / name
        if (target / "metrics.json").is_file():
            print(f"[baseline] reusing {target}")
            metrics = json.loads((target / "metrics.json").read_text())
        else:
            resume = (target / CHECKPOINT).is_file()
            print(f"[baseline] {name}" + (" (resuming)" if resume else ""))
            values = {"data": str(data_dir), "seed": seed, "eval_split": split, "eval_limit": limit, **section,
                      "model": name, "output_dir": str(target), "resume": resume, "overwrite": True}
            metrics = run_baseline(build_config(BaselineConfig, values, where=f"{path}: baselines"))
        rows.append({**metrics, "stage": name, "protocol": "rank"})
    return rows


def _run_training_stage(name: str, config_cls, runner, values: dict[str, Any], out: Path, path: Path) -> Path:
    """Run a training stage into `out`, reusing a finished run and resuming an interrupted one."""
    from sdpo.training.sft import CONFIG_FILE

    if (out / CONFIG_FILE).is_file() and (out / "adapter_config.json").is_file():
        print(f"[{name}] reusing {out}")
        return out
    values = {**values, "output_dir": str(out)}
    values["resume"] = out.is_dir() and any(out.glob("checkpoint-*"))
    values["overwrite"] = True  # the pipeline owns this folder (e.g. a reference table left by a crash)
    print(f"[{name}] training into {out}" + (" (resuming)" if values["resume"] else ""))
    return runner(build_config(config_cls, values, where=f"{path}: {name}"))


def results_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per (model, protocol), the metrics each protocol has."""
    header = ["stage", "protocol", "n", *TABLE_COLUMNS, "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["stage"], row["protocol"], str(row["n_records"])]
        cells += [f"{row[c]:.4f}" if c in row else "–" for c in TABLE_COLUMNS]
        cells.append(f"{row.get('seconds', 0):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
