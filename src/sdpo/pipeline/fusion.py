"""Late fusion rows: an evaluated LM stage's scores plus w times a trained baseline's, w chosen on val.

For each stage in the ``fusion`` section, the stage is ranked on ``val_limit`` validation records
as well (``eval/<stage>-rank-val``; an align stage by reward, against its SFT stage ranked there
too, an SFT stage by log-prob). The weight with the best val HR@1 (`sdpo.evaluation.fusion`) then
ranks the test records once, from the stage's test scores and the baseline's; the row is
``fusion-<stage>`` and its folder ``eval/fusion-<stage>-rank`` (metrics with the weight and every
weight's val HR@1, per-record predictions), read by `sdpo report` as any other rank row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdpo.baselines.collaborative import CollaborativeModel
from sdpo.data.datasets import load_split
from sdpo.data.records import Record
from sdpo.evaluation.fusion import choose_weight, fused_scores
from sdpo.evaluation.protocols import score_rankings
from sdpo.evaluation.results import predictions_file
from sdpo.io import read_jsonl
from sdpo.lm.adapters import adapter_sha256
from sdpo.pipeline.config import Pipeline
from sdpo.pipeline.evaluate import evaluate_model, in_pinned_precision, read_candidate_logps


def run_fusion(plan: Pipeline, data_dir: Path, models: list[tuple[str, str | None, str | None]]) -> list[dict[str, Any]]:
    """The fusion rows of the pipeline (none without a fusion section); evaluations already finished are reused."""
    if plan.fusion is None:
        return []
    name = plan.fusion["collaborative"]
    source = CollaborativeModel.load(plan.out / "baselines" / name)
    val = load_split(data_dir, "val", plan.fusion["val_limit"], plan.shared["subset_seed"])
    test = load_split(data_dir, plan.split, plan.limit, plan.shared["subset_seed"])
    by_label = {label: (adapter, reference) for label, adapter, reference in models}
    rows = []
    for stage in plan.fusion["stages"]:
        adapter, reference = by_label[stage]
        target = plan.out / "eval" / f"fusion-{stage}-rank"
        metrics_path = target / "metrics.json"
        key = {"adapter_sha256": adapter_sha256(adapter) if adapter else None, "val_records": len(val), "n_records": len(test), **_precision(plan)}
        if metrics_path.is_file() and _same_fusion(json.loads(metrics_path.read_text()), key, source):
            print(f"[fusion] reusing {target}")
            metrics = json.loads(metrics_path.read_text())
        else:
            aligned = reference not in (None, "zero-shot")
            score = "reward" if aligned else "logp"
            val_scores = _stage_scores(plan, data_dir, stage, adapter, val, "val", score, by_label[reference][0] if aligned else None)
            test_scores = _stage_scores(plan, data_dir, stage, adapter, test, plan.split, score, by_label[reference][0] if aligned else None)
            weight, tried = choose_weight(val, val_scores, baseline_scores(source, val))
            print(f"[fusion] {stage} + {weight:g} x {name} (chosen on {len(val)} val records)")
            result = score_rankings(test, fused_scores(test_scores, baseline_scores(source, test), weight), label="fused")
            result.metrics.update({"n_records": len(test), "protocol": "rank", "split": plan.split, "stage": stage, "lm_score": score,
                                   "collaborative": source.describe(), "weight": weight, "val_records": len(val), "val_tried": tried,
                                   "adapter_sha256": adapter_sha256(adapter) if adapter else None, **_precision(plan)})
            result.save(target, compress=True)
            metrics = result.metrics
        rows.append({**metrics, "stage": f"fusion-{stage}", "protocol": "rank"})
    return rows


def _same_fusion(finished: dict[str, Any], key: dict[str, Any], source: CollaborativeModel) -> bool:
    """Whether a finished fusion row was made from this adapter, these records and this collaborative model (wherever it lies)."""
    recorded = finished.get("collaborative") or {}
    return all(finished.get(k) == v for k, v in key.items()) and source.matches(recorded.get("sha256"))


def _stage_scores(plan: Pipeline, data_dir: Path, stage: str, adapter: str | None, records: list[Record], split: str, score: str,
                  reference_adapter: str | None = None) -> list[list[float]]:
    """Per record, the stage's score of each candidate (candidate order): from its evaluation of `split`, run here if missing.

    A reward is the stage's float32 log-prob minus its reference stage's, both read from their rankings: exactly what
    the evaluation ranked by (the files keep rewards only to float32 precision)."""
    folder = plan.out / "eval" / (f"{stage}-rank" if split == plan.split else f"{stage}-rank-{split}")
    reference_logps = None
    if score == "reward":
        reference_logps = _stage_scores(plan, data_dir, Path(reference_adapter).name, reference_adapter, records, split, "logp")
    if not _covers(folder, records, score, adapter, plan):
        print(f"[fusion] ranking {len(records)} {split} records with {stage}")
        evaluate_model(data_dir, split, plan.model, adapter, "rank", len(records) if split != plan.split else plan.limit, folder,
                       plan.evaluate.get("batch_size", 8), plan.shared["domain"], plan.shared["prompt_seed"],
                       subset_seed=plan.shared["subset_seed"], bf16=plan.shared["bf16"], reference_scores=reference_logps,
                       reward=score == "reward", compress_predictions=True)
    logps = read_candidate_logps(folder, records)
    if reference_logps is None:
        return logps
    return [[p - r for p, r in zip(row, ref, strict=True)] for row, ref in zip(logps, reference_logps, strict=True)]


def _precision(plan: Pipeline) -> dict[str, bool]:
    """The precision a pipeline pins ({} where it leaves it to the hardware): rankings in another are not reused."""
    return {} if plan.shared["bf16"] is None else {"bf16": plan.shared["bf16"]}


def _covers(folder: Path, records: list[Record], score: str, adapter: str | None, plan: Pipeline) -> bool:
    """Whether `folder` holds a finished ranking of `records` by this very adapter, in the pinned precision (with rewards, for `score` reward)."""
    path, metrics = predictions_file(folder), folder / "metrics.json"
    if not path.is_file() or not metrics.is_file():
        return False
    finished = json.loads(metrics.read_text())
    if finished.get("adapter_sha256") != (adapter_sha256(adapter) if adapter else None):
        return False  # the stage was trained again since
    if not in_pinned_precision(finished, plan.shared["bf16"]):
        return False  # ranked in another precision than the pipeline pins
    rows = {row["id"]: row for row in read_jsonl(path)}
    return all(r.id in rows and (score == "logp" or "reward" in rows[r.id]["ranking"][0]) for r in records)


def baseline_scores(source: CollaborativeModel, records: list[Record], batch: int = 256) -> list[list[float]]:
    """Per record, the baseline's score of each candidate (candidate order)."""
    scores = []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        rows = source.encode(chunk).scores
        scores.extend(row[: len(r.candidates)].tolist() for r, row in zip(chunk, rows, strict=True))
    return scores
