"""LastFM as the paper used it: LLaRA's split plus the paper's val/test JSON files.

- test / val: the paper's 2,495 / 2,767 records, exactly as published (history,
  candidates and target in their order).
- train: the 47,872 LLaRA training windows with at least 3 history items; 20 candidates
  each (the target plus 19 artists outside the history), seeded per record.

Neither source names users, but each holds every window of its users in order, and a window's
history continues the previous window's history and target. Chaining them recovers the users
("test-user-0", ...): 122 test users, as LLaRA's Test_data.df has one row per held-out user.
Evaluation needs them: one user's records are not independent (see `sdpo.evaluation.stats`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sdpo.data.candidates import record_rng, sample_candidates
from sdpo.data.records import Record
from sdpo.data.sources.fetch import DATASETS, verified_path
from sdpo.errors import UserError

MIN_HISTORY = 3
N_CANDIDATES = 20


def read_id2name(path: Path) -> list[str]:
    """Titles by item id from an ``id::name`` file whose ids are 0..n-1."""
    names: dict[int, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        item, sep, name = line.partition("::")
        if not sep or not item.strip().isdigit():
            raise UserError(f"{path}:{number}: expected 'id::name', got {line[:60]!r}.")
        names[int(item)] = name.strip()
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{path}: item ids are not 0..{len(names) - 1}.")
    return [names[i] for i in range(len(names))]


def read_llara_windows(path: Path) -> list[tuple[list[int], int]]:
    """(history ids oldest first, target id) per row of a LLaRA ``*_data.df`` pickle.

    Call only on a file whose SHA-256 was checked: unpickling runs code.
    """
    import pandas as pd

    frame = pd.read_pickle(path)
    missing = {"seq", "len_seq", "next"} - set(frame.columns)
    if missing:
        raise UserError(f"{path}: missing columns {sorted(missing)}.")
    return [(list(seq[:length]), int(nxt)) for seq, length, nxt in zip(frame["seq"], frame["len_seq"], frame["next"], strict=True)]


def read_paper_json(path: Path, split: str) -> list[Record]:
    """The paper's evaluation records (``historyList`` 'a::b', ``itemList``, ``trueSelection``)."""
    rows = json.loads(path.read_text(encoding="utf-8"))
    return [
        Record(
            id=f"{split}-{i}",
            user=None,
            history=row["historyList"].split("::"),
            candidates=list(row["itemList"]),
            target=row["trueSelection"],
        )
        for i, row in enumerate(rows)
    ]


def sliding_window_users(records: list[Record], split: str) -> list[Record]:
    """`records` with their users recovered: a record whose history is the previous record's history and target
    (its last items, once the history is full) belongs to the same user; any other starts a new one."""
    labelled, user, previous = [], -1, None
    for record in records:
        follows = (previous is not None and len(record.history) <= len(previous.history) + 1
                   and (previous.history + [previous.target])[-len(record.history):] == record.history)
        user += 0 if follows else 1
        labelled.append(dataclasses.replace(record, user=f"{split}-user-{user}"))
        previous = record
    return labelled


def train_records(windows: list[tuple[list[int], int]], titles: list[str], seed: int) -> list[Record]:
    """Training records for every window with at least MIN_HISTORY items, 20 candidates each."""
    records = []
    for position, (history, target) in enumerate(windows):
        if len(history) < MIN_HISTORY:
            continue
        rng = record_rng(seed, position)
        candidates = sample_candidates(rng, len(titles), target, history, N_CANDIDATES)
        records.append(
            Record(
                id=f"train-{position}",
                user=None,
                history=[titles[i] for i in history],
                candidates=[titles[i] for i in candidates],
                target=titles[target],
            )
        )
    return records


def prepare_lastfm(raw_dir: Path, seed: int) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """Records for train/val/test and the manifest fields describing their source."""
    paths = {f.name: verified_path(raw_dir, "lastfm", f.name) for f in DATASETS["lastfm"]}
    titles = read_id2name(paths["id2name.txt"])
    windows = read_llara_windows(paths["train_data.df"])
    splits = {
        "train": train_records(windows, titles, seed),
        "val": read_paper_json(paths["sdpo-lastfm-val.json"], "val"),
        "test": read_paper_json(paths["sdpo-lastfm-test.json"], "test"),
    }
    splits = {split: sliding_window_users(records, split) for split, records in splits.items()}
    manifest = {
        "dataset": "lastfm",
        "domain": "music",
        "seed": seed,
        "n_items": len(titles),
        "sources": {f.name: {"repo": f.repo, "commit": f.commit, "path": f.path, "sha256": f.sha256} for f in DATASETS["lastfm"]},
        "train_rule": f"LLaRA train windows with >= {MIN_HISTORY} history items; {N_CANDIDATES} candidates, negatives seeded per record",
        "users": {split: len({r.user for r in records}) for split, records in splits.items()},
        "user_rule": "not in the sources: recovered by chaining each user's consecutive windows",
    }
    return splits, manifest
