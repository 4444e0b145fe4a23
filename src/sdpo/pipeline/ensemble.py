"""The ensemble row of a pipeline: the baselines with item vectors, their scores summed with weights chosen on val.

``baselines: {models: [sasrec, gru4rec, caser], ensemble: true}`` adds the row ``ensemble``
(`sdpo.baselines.ensemble`): every model scores all validation records (``ensemble_val_limit`` of
them drawn with the subset seed, default all) and the test records; the weights with the best val
HR@1 rank the test records once. Its folder ``baselines/ensemble`` holds the metrics (the weights,
every weight vector's val HR@1, each model's fingerprint) and the per-record predictions, which
`sdpo report` reads as any baseline's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdpo.baselines.collaborative import CollaborativeModel
from sdpo.baselines.ensemble import choose_weights, ensemble_scores
from sdpo.data.datasets import data_fingerprint, load_split
from sdpo.evaluation.protocols import score_rankings
from sdpo.evaluation.results import read_whole_evaluation
from sdpo.pipeline.config import Pipeline
from sdpo.pipeline.fusion import baseline_scores

ENSEMBLE = "ensemble"


def run_ensemble(plan: Pipeline, data_dir: Path) -> list[dict[str, Any]]:
    """The ensemble row (none unless the baselines section asks for it); a finished one of the same models and records is reused."""
    if not plan.baselines or not plan.baselines.get(ENSEMBLE):
        return []
    names = [name for name, _ in plan.baselines["models"] if name != "popularity"]
    models = [CollaborativeModel.load(plan.out / "baselines" / name) for name in names]
    val = load_split(data_dir, "val", plan.baselines.get("ensemble_val_limit"), plan.shared["subset_seed"])
    test = load_split(data_dir, plan.split, plan.limit, plan.shared["subset_seed"])
    target = plan.out / "baselines" / ENSEMBLE
    key = {"models": [{"name": n, "sha256": m.sha256} for n, m in zip(names, models, strict=True)], "val_records": len(val),
           "n_records": len(test), "data_sha256": data_fingerprint(data_dir)}
    if (target / "metrics.json").is_file():
        finished, problem = read_whole_evaluation(target, test)
        if problem:
            print(f"[baseline] {target}: {problem}: making it again")
        elif all(finished.get(k) == v for k, v in key.items()):
            print(f"[baseline] reusing {target}")
            return [{**finished, "stage": ENSEMBLE, "protocol": "rank"}]
    weights, tried = choose_weights(val, [baseline_scores(m, val) for m in models])
    print(f"[baseline] ensemble: {' + '.join(f'{w:g} x {n}' for w, n in zip(weights, names, strict=True))} "
          f"(chosen on {len(val)} val records)")
    result = score_rankings(test, ensemble_scores([baseline_scores(m, test) for m in models], weights), label="score")
    result.metrics.update({"n_records": len(test), "protocol": "rank", "split": plan.split, "model": ENSEMBLE, "data": str(data_dir),
                           **key, "weights": dict(zip(names, weights, strict=True)), "val_tried": tried})
    result.save(target, compress=True)
    return [{**result.metrics, "stage": ENSEMBLE, "protocol": "rank"}]
