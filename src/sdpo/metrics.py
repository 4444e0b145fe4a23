"""Recommendation metrics: ranking metrics from a ranked list, and the paper's answer matcher.

One implementation for everything that ranks candidates (LM likelihood ranking and the
classic baselines). Ranks are 1-based.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

RANK_CUTOFFS = {"hr": (1, 5), "ndcg": (5, 10)}


def rank_of(target: str, ranked: Sequence[str]) -> int:
    """1-based position of `target` in `ranked`."""
    return list(ranked).index(target) + 1


def ranking_metrics(ranks: Iterable[int]) -> dict[str, float]:
    """HR@1, HR@5, NDCG@5, NDCG@10 and MRR averaged over records, from each record's target rank."""
    ranks = list(ranks)
    if not ranks:
        raise ValueError("no records to score")
    n = len(ranks)
    metrics: dict[str, float] = {}
    for k in RANK_CUTOFFS["hr"]:
        metrics[f"hr@{k}"] = sum(r <= k for r in ranks) / n
    for k in RANK_CUTOFFS["ndcg"]:
        metrics[f"ndcg@{k}"] = sum(1 / math.log2(r + 1) for r in ranks if r <= k) / n
    metrics["mrr"] = sum(1 / r for r in ranks) / n
    metrics["valid_ratio"] = 1.0
    return metrics


@dataclass(frozen=True)
class Match:
    """How a generated answer matches the candidates."""

    matched: tuple[str, ...]  # candidates counted
    valid: bool  # exactly one candidate named
    hit: bool  # valid and it is the target


def paper_match(text: str, candidates: Sequence[str], target: str) -> Match:
    """The paper's rule: every candidate occurring as a substring counts; valid iff exactly one."""
    matched = tuple(c for c in candidates if c in text)
    valid = len(matched) == 1
    return Match(matched, valid, valid and target in matched)


def _spans(text: str, title: str) -> list[tuple[int, int]]:
    spans, start = [], text.find(title)
    while start != -1:
        spans.append((start, start + len(title)))
        start = text.find(title, start + 1)
    return spans


def longest_match(text: str, candidates: Sequence[str], target: str) -> Match:
    """Like `paper_match`, but a candidate found only inside a longer found candidate does not count.

    "Jeff Beck" names one artist, not also "Beck": every occurrence of "Beck" lies inside an
    occurrence of "Jeff Beck", so "Beck" is dropped. "Beck and Jeff Beck" still names two.
    """
    found = {c: _spans(text, c) for c in candidates}
    found = {c: s for c, s in found.items() if s}
    matched = []
    for title, spans in found.items():
        longer = [span for other, other_spans in found.items() if len(other) > len(title) for span in other_spans]
        inside = all(any(lo <= start and end <= hi for lo, hi in longer) for start, end in spans)
        if not inside:
            matched.append(title)
    valid = len(matched) == 1
    return Match(tuple(matched), valid, valid and matched[0] == target)
