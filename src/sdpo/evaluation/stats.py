"""Uncertainty of a metric over records: bootstrap intervals, single and paired.

Every metric here is a mean over records of a per-record value (hit = 1 or 0, 1/rank, ...).
The test records are a sample, so a metric has a sampling error; the percentile bootstrap
(Efron & Tibshirani, 1993) estimates it without assuming a distribution: draw the records
with replacement, recompute the mean, repeat, and take the 2.5% and 97.5% quantiles.

Two models evaluated on the same records are compared *paired*: each resample draws records,
and the difference of the two means is computed on the same drawn records. That removes the
variation between records that both models share and gives a much narrower interval than two
independent intervals would suggest.

Records are not always independent: test records are windows over a few users' histories
(LastFM's 2,495 over 122 users, MovieLens's 10,280 over 95), and one user's records tend to hit
or miss together. With
`groups` (one label per record, e.g. its user) the bootstrap resamples the groups instead,
each drawn group bringing all its records (the cluster bootstrap; Field & Welsh, 2007): a
resample's mean is the sum of the drawn groups' values over the number of their records. Its
interval describes the spread over new users rather than new records of the same users, and is
wider wherever a group's records agree. With every record its own group it is the record bootstrap.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] indices in [0, n) drawn with replacement."""
    if n < 1:
        raise ValueError("no records to resample")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _resampled_means(columns: Mapping[str, np.ndarray], resamples: int, seed: int,
                     groups: Sequence[Hashable] | None) -> dict[str, np.ndarray]:
    """Per column, its mean in each of `resamples` bootstrap resamples ([resamples] each), all from the same draws.

    Without `groups`, records are drawn; with them (one label per record), groups are drawn and
    a resample's mean is sum of the drawn groups' values / number of their records.
    """
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"columns of different lengths: {sorted(lengths)}")
    n = lengths.pop()
    if groups is None:
        index = _indices(n, resamples, seed)
        return {name: values[index].mean(axis=1) for name, values in columns.items()}
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group labels for {n} records")
    labels: dict[Hashable, int] = {}
    codes = np.array([labels.setdefault(group, len(labels)) for group in groups])  # [n] group numbers, in order of appearance
    sizes = np.bincount(codes).astype(float)  # [G] records per group
    index = _indices(len(sizes), resamples, seed)  # [resamples, G] drawn groups
    drawn_sizes = sizes[index].sum(axis=1)
    return {name: np.bincount(codes, weights=values)[index].sum(axis=1) / drawn_sizes for name, values in columns.items()}


def _interval(means: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return [float(low), float(high)]


def bootstrap_ci(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
                 *, groups: Sequence[Hashable] | None = None) -> list[float]:
    """[low, high]: the percentile bootstrap interval of the mean of `values` (one value per record; `groups`: see the module)."""
    return bootstrap_cis({"x": values}, resamples, level, seed, groups=groups)["x"]


def bootstrap_cis(columns: Mapping[str, Sequence[float]], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
                  *, groups: Sequence[Hashable] | None = None) -> dict[str, list[float]]:
    """`bootstrap_ci` of several per-record columns of the same records, all from the same resamples."""
    data = {name: np.asarray(values, dtype=float) for name, values in columns.items()}
    return {name: _interval(means, level) for name, means in _resampled_means(data, resamples, seed, groups).items()}


def paired_difference(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
    *, groups: Sequence[Hashable] | None = None,
) -> dict[str, float | list[float]]:
    """Mean of a - b over the same records, its paired bootstrap interval, and the share of resamples where it is <= 0.

    `a[i]` and `b[i]` must be the same record's values under two models. ``p_le_0`` is the
    bootstrap's one-sided estimate of how often a difference at least this favourable to `a`
    could be noise: a difference whose interval excludes 0 has ``p_le_0`` below (1 - level) / 2.
    With `groups`, whole groups of records are resampled (see the module).
    """
    first, second = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if first.shape != second.shape:
        raise ValueError(f"paired values need the same records: {first.shape} vs {second.shape}")
    diff = first - second
    means = _resampled_means({"diff": diff}, resamples, seed, groups)["diff"]
    return {"difference": float(diff.mean()), "interval": _interval(means, level), "p_le_0": float((means <= 0).mean())}
