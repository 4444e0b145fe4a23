"""The ensemble of several ID models: a weighted sum of their scores, the weights chosen on val.

The bar a collaborative LM must clear once it reads several ID models is not the best single one,
but their ensemble (EnsRec, arXiv 2512.17820: a fused model must beat the best ensemble of the same
parts). Each model's scores of a record's candidates are first turned into log-probabilities over
those candidates (a log-softmax per record), so models whose dot products live on different scales
add up; then

    score(c) = sum_m w_m * log_softmax_c(s_m(c))

with every w_m from `GRID` (not all 0), chosen by HR@1 on validation records; ties go to the
weights that come first in the grid's order (fewer models, smaller weights). The test is then
scored once with them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from sdpo.data.records import Record
from sdpo.evaluation.metrics import target_ranks

GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def log_softmax_rows(scores: Sequence[Sequence[float]]) -> list[list[float]]:
    """Each record's candidate scores [N][C] as log-probabilities over its candidates."""
    return [torch.log_softmax(torch.tensor(row, dtype=torch.float64), dim=0).tolist() for row in scores]


def ensemble_scores(per_model: Sequence[Sequence[Sequence[float]]], weights: Sequence[float]) -> list[list[float]]:
    """[N][C]: sum over models of weight times the model's log-softmaxed scores (`per_model` [M][N][C])."""
    normalised = [log_softmax_rows(scores) for scores in per_model]
    return [[sum(w * model[i][c] for w, model in zip(weights, normalised, strict=True)) for c in range(len(normalised[0][i]))]
            for i in range(len(normalised[0]))]


def choose_weights(records: list[Record], per_model: Sequence[Sequence[Sequence[float]]],
                   grid: Sequence[float] = GRID) -> tuple[list[float], list[dict[str, Any]]]:
    """The weights (one per model) whose ensemble has the best HR@1 on `records`, and every weight vector's HR@1."""
    if not records or not per_model:
        raise ValueError("choosing ensemble weights needs records and models")
    normalised = [torch.tensor(log_softmax_rows(scores)) for scores in per_model]  # [N, C] each (every record has C candidates)
    stacked = torch.stack(normalised)  # [M, N, C]
    tried = []
    for weights in itertools.product(grid, repeat=len(per_model)):
        if not any(weights):
            continue
        fused = torch.einsum("m,mnc->nc", torch.tensor(weights, dtype=stacked.dtype), stacked)
        ranks = target_ranks(records, fused.tolist())
        tried.append({"weights": list(weights), "hr@1": sum(rank == 1 for rank in ranks) / len(ranks)})
    order = sorted(tried, key=lambda row: (sum(w > 0 for w in row["weights"]), sum(row["weights"])))  # fewer models, then smaller
    best = max(order, key=lambda row: row["hr@1"])  # max keeps the first among equals
    return best["weights"], tried
