"""Uncertainty of a metric over records: bootstrap intervals, single and paired.

Every metric here is a mean over records of a per-record value (hit = 1 or 0, 1/rank, ...).
The test records are a sample, so a metric has a sampling error; the percentile bootstrap
(Efron & Tibshirani, 1993) estimates it without assuming a distribution: draw the records
with replacement, recompute the mean, repeat, and take the 2.5% and 97.5% quantiles.

Two models evaluated on the same records are compared *paired*: each resample draws records,
and the difference of the two means is computed on the same drawn records. That removes the
variation between records that both models share and gives a much narrower interval than two
independent intervals would suggest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] record indices drawn with replacement."""
    if n < 1:
        raise ValueError("no records to resample")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(means: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return [float(low), float(high)]


def bootstrap_ci(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> list[float]:
    """[low, high]: the percentile bootstrap interval of the mean of `values` (one value per record)."""
    data = np.asarray(values, dtype=float)
    return _interval(data[_indices(len(data), resamples, seed)].mean(axis=1), level)


def bootstrap_cis(columns: Mapping[str, Sequence[float]], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> dict[str, list[float]]:
    """`bootstrap_ci` of several per-record columns of the same records, all from the same resamples."""
    data = {name: np.asarray(values, dtype=float) for name, values in columns.items()}
    lengths = {len(v) for v in data.values()}
    if len(lengths) != 1:
        raise ValueError(f"columns of different lengths: {sorted(lengths)}")
    index = _indices(lengths.pop(), resamples, seed)
    return {name: _interval(values[index].mean(axis=1), level) for name, values in data.items()}


def paired_difference(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> dict[str, float | list[float]]:
    """Mean of a - b over the same records, its paired bootstrap interval, and the share of resamples where it is <= 0.

    `a[i]` and `b[i]` must be the same record's values under two models. ``p_le_0`` is the
    bootstrap's one-sided estimate of how often a difference at least this favourable to `a`
    could be noise: a difference whose interval excludes 0 has ``p_le_0`` below (1 - level) / 2.
    """
    first, second = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if first.shape != second.shape:
        raise ValueError(f"paired values need the same records: {first.shape} vs {second.shape}")
    diff = first - second
    means = diff[_indices(len(diff), resamples, seed)].mean(axis=1)
    return {"difference": float(diff.mean()), "interval": _interval(means, level), "p_le_0": float((means <= 0).mean())}
