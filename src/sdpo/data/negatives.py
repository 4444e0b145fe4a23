"""Which K of a record's negative candidates a preference step trains against.

- ``random``: K drawn once per record, seeded (the paper's way).
- ``resample``: K drawn afresh every epoch, seeded by (seed, epoch, record).
- ``hard``: the K negatives the reference model scores highest.

All return candidate indices (positions in ``record.candidates``), never the target's.
"""

from __future__ import annotations

import numpy as np
import torch

from sdpo.data.records import Record

STRATEGIES = ("random", "resample", "hard")


def negative_indices(record: Record) -> list[int]:
    return [i for i, c in enumerate(record.candidates) if c != record.target]


def check_k(records: list[Record], k: int) -> None:
    fewest = min(len(r.candidates) - 1 for r in records)
    if not 1 <= k <= fewest:
        raise ValueError(f"negatives must be between 1 and {fewest} (the fewest negatives a record has), got {k}")


def random_negatives(record: Record, k: int, seed: int, position: int, epoch: int = 0) -> list[int]:
    """K negative indices drawn with a generator seeded by (seed, epoch, position)."""
    rng = np.random.default_rng([seed, epoch, position])
    pool = negative_indices(record)
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False).tolist()]


def hard_negatives(record: Record, k: int, reference_logps: torch.Tensor) -> list[int]:
    """The K negative indices with the highest reference log-prob (ties: candidate order).

    reference_logps: [C] the reference scores of the record's candidates.
    """
    pool = negative_indices(record)
    scores = reference_logps[pool]
    order = torch.argsort(-scores, stable=True)[:k].tolist()
    return [pool[i] for i in order]
