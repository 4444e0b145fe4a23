"""Recommendation metrics: ranking metrics from a ranked list, and the paper's answer matcher.

One implementation for everything that ranks candidates (LM likelihood ranking, reward
ranking and the classic baselines). Ranks are 1-based.

Ties: candidates with equal scores (an untrained adapter gives every candidate reward 0;
popularity gives every unseen item count 0) are ordered by a random permutation fixed by
(TIE_SEED, record id), never by their position in the candidate list: the target is the
first candidate in 6.5% of the first 200 LastFM test records, so breaking ties by position
would hand those a hit.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

RANK_CUTOFFS = {"hr": (1, 5), "ndcg": (5, 10)}
TIE_SEED = 0


def rank_of(target: str, ranked: Sequence[str]) -> int:
    """1-based position of `target` in `ranked`."""
    return list(ranked).index(target) + 1


def tie_order(record_id: str, n: int, seed: int = TIE_SEED) -> list[int]:
    """tie_order[i]: where candidate i goes among candidates with the same score (a seeded permutation of range(n))."""
    digest = hashlib.sha256(f"ties:{seed}:{record_id}".encode()).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest[:8], "little")).shuffle(order)
    return order


def ranked_indices(scores: Sequence[float], record_id: str, seed: int = TIE_SEED) -> list[int]:
    """Candidate indices, best score first; equal scores in the record's seeded tie order."""
    ties = tie_order(record_id, len(scores), seed)
    return sorted(range(len(scores)), key=lambda i: (-scores[i], ties[i]))


def target_ranks(records, scores, seed: int = TIE_SEED) -> list[int]:
    """Per record, the 1-based rank of its target when its candidates are sorted by `scores` (a [C] sequence per record)."""
    ranks = []
    for record, row in zip(records, scores, strict=True):
        row = [float(x) for x in row][: len(record.candidates)]
        order = ranked_indices(row, record.id, seed)
        ranks.append(order.index(record.candidates.index(record.target)) + 1)
    return ranks


def per_record_ranking(ranks: Iterable[int]) -> dict[str, list[float]]:
    """Each ranking metric's value for every record, from the target ranks (their means are the metrics)."""
    ranks = list(ranks)
    if not ranks:
        raise ValueError("no records to score")
    values: dict[str, list[float]] = {}
    for k in RANK_CUTOFFS["hr"]:
        values[f"hr@{k}"] = [float(r <= k) for r in ranks]
    for k in RANK_CUTOFFS["ndcg"]:
        values[f"ndcg@{k}"] = [1 / math.log2(r + 1) if r <= k else 0.0 for r in ranks]
    values["mrr"] = [1 / r for r in ranks]
    return values


def ranking_metrics(ranks: Iterable[int]) -> dict[str, float]:
    """HR@1, HR@5, NDCG@5, NDCG@10 and MRR averaged over records, from each record's target rank."""
    metrics = {name: sum(v) / len(v) for name, v in per_record_ranking(ranks).items()}
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
