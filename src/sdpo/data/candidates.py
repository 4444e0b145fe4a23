"""Seeded negative sampling for candidate lists.

Each record gets its own generator, seeded from the dataset seed and the record's
position, so two records with the same target do not share negatives by construction
(the published code seeds with the target's id, which makes them share about a third).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def record_rng(seed: int, position: int) -> np.random.Generator:
    """The generator for record number `position` of a dataset prepared with `seed`."""
    return np.random.default_rng([seed, position])


def sample_candidates(
    rng: np.random.Generator,
    n_items: int,
    target: int,
    history: Sequence[int],
    n_candidates: int = 20,
) -> list[int]:
    """`n_candidates` distinct item ids in random order: `target` plus negatives never in `history`.

    Items are ids 0..n_items-1. Raises ValueError when too few items are left to draw from.
    """
    excluded = set(history) | {target}
    n_negatives = n_candidates - 1
    if n_items - len(excluded) < n_negatives:
        raise ValueError(f"only {n_items - len(excluded)} items outside the history, need {n_negatives} negatives")
    negatives: list[int] = []
    chosen = set(excluded)
    while len(negatives) < n_negatives:
        for item in rng.integers(0, n_items, size=2 * n_negatives).tolist():
            if item not in chosen:
                chosen.add(item)
                negatives.append(item)
                if len(negatives) == n_negatives:
                    break
    candidates = [target, *negatives]
    order = rng.permutation(n_candidates).tolist()
    return [candidates[i] for i in order]
