"""Late fusion: rank each record's candidates by an LM's score plus w times a collaborative model's score.

It is the cheap bar for an LM that reads collaborative tokens: two models trained apart, their
scores of the same candidates added. The weight is chosen on validation records only, from a
fixed grid (`WEIGHTS`, 0 and half decades from 1e-3 to 1e3, since an LM's summed log-prob and a
sequential model's dot product live on different scales); the test is then scored once with it.
Ranks use the same seeded tie order as every other ranking in sdpo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sdpo.data.records import Record
from sdpo.evaluation.metrics import target_ranks

WEIGHTS = (0.0, *(10 ** (k / 2) for k in range(-6, 7)))


def fused_scores(lm: Sequence[Sequence[float]], collaborative: Sequence[Sequence[float]], weight: float) -> list[list[float]]:
    """Per record, per candidate: ``lm + weight * collaborative`` (both [N][C], candidate order)."""
    return [[float(a) + weight * float(b) for a, b in zip(row_lm, row_cf, strict=True)]
            for row_lm, row_cf in zip(lm, collaborative, strict=True)]


def choose_weight(records: list[Record], lm: Sequence[Sequence[float]], collaborative: Sequence[Sequence[float]],
                  weights: Sequence[float] = WEIGHTS) -> tuple[float, list[dict[str, Any]]]:
    """The weight whose fused ranking has the best HR@1 on `records` (the smallest such weight on ties), and every weight's HR@1."""
    if not records or not weights:
        raise ValueError("choosing a fusion weight needs records and weights")
    tried = []
    for weight in sorted(weights):
        ranks = target_ranks(records, fused_scores(lm, collaborative, weight))
        tried.append({"weight": weight, "hr@1": sum(rank == 1 for rank in ranks) / len(ranks)})
    best = max(tried, key=lambda row: row["hr@1"])  # max keeps the first, i.e. the smallest weight, among equals
    return best["weight"], tried
