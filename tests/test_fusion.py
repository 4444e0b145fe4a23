"""Late fusion against slow, obvious rankings: LM score + w x collaborative score, w chosen by HR@1."""

import random

import pytest

from sdpo.data.records import Record
from sdpo.evaluation.fusion import WEIGHTS, choose_weight, fused_scores
from sdpo.evaluation.metrics import target_ranks


def slow_hr1(records, lm, collaborative, weight):
    """Sort each record's candidates by the fused score by hand (no ties in these scores) and count targets on top."""
    hits = 0
    for record, row_lm, row_cf in zip(records, lm, collaborative, strict=True):
        fused = {c: a + weight * b for c, a, b in zip(record.candidates, row_lm, row_cf, strict=True)}
        hits += max(fused, key=fused.get) == record.target
    return hits / len(records)


def planted(seed=0, n=60):
    """Records where the LM knows the target for the first third, the collaborative model for the second, neither for the rest.

    The LM is sure where it knows (a 5-nat margin) and nearly indifferent elsewhere; the collaborative
    model's scores are small dot products. A weight between about 0.07 and 2.5 gets both thirds right.
    """
    rng = random.Random(seed)
    records, lm, collaborative = [], [], []
    for i in range(n):
        candidates = [f"item-{i}-{c}" for c in range(5)]
        target = rng.randrange(5)
        row_lm = [-20 + rng.uniform(-0.1, 0.1) for _ in range(5)]  # summed log-probs: large, negative
        row_cf = [rng.uniform(-1, 1) for _ in range(5)]  # dot products: small
        if i < n // 3:
            row_lm[target] = max(row_lm) + 5.0
        elif i < 2 * n // 3:
            row_cf[target] = max(row_cf) + 3.0
        records.append(Record(f"r{i}", None, ["h"], candidates, candidates[target]))
        lm.append(row_lm)
        collaborative.append(row_cf)
    return records, lm, collaborative


def test_fused_scores_are_the_weighted_sum():
    assert fused_scores([[1.0, -2.0]], [[0.5, 4.0]], 2.0) == [[2.0, 6.0]]
    with pytest.raises(ValueError):
        fused_scores([[1.0, 2.0]], [[1.0]], 1.0)


def test_the_ends_of_the_grid_are_each_model_alone():
    records, lm, collaborative = planted()
    assert target_ranks(records, fused_scores(lm, collaborative, 0.0)) == target_ranks(records, lm)
    assert target_ranks(records, fused_scores(lm, collaborative, 1e6)) == target_ranks(records, collaborative)


def test_the_chosen_weight_has_the_best_hr1_of_the_grid():
    records, lm, collaborative = planted()
    weight, tried = choose_weight(records, lm, collaborative)
    assert [row["weight"] for row in tried] == sorted(WEIGHTS)
    for row in tried:
        assert row["hr@1"] == pytest.approx(slow_hr1(records, lm, collaborative, row["weight"]))
    best = max(row["hr@1"] for row in tried)
    assert weight == min(row["weight"] for row in tried if row["hr@1"] == best)
    # fusing beats either model alone here: each knows a different third
    alone = (slow_hr1(records, lm, collaborative, 0.0), slow_hr1(records, lm, collaborative, 1e6))
    assert best > max(alone) + 0.2 and 0.05 < weight < 2.5
    with pytest.raises(ValueError, match="needs records and weights"):
        choose_weight([], [], [])
