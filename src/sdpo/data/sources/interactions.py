"""Records from a user's own interaction log, built the way the paper's data was built.

Input: an interactions file (CSV or JSONL; columns ``user``, ``item``, ``timestamp``, optional
``rating``) and an items file (columns ``item``, ``title``).

1. Each user's interactions in time order (ties keep file order); with ``min_rating``,
   interactions rated below it are dropped first.
2. Users are split 8:1:1 at random with the seed: train users' windows are for training,
   validation and test users' windows for evaluation.
3. A window is every position t of a user's sequence whose history (the up to 10 items before
   t) has at least 3 items; the target is the item at t. A window whose target already occurs
   in its history is skipped (and counted): a candidate may not be in the history.
4. 20 candidates per record: the target plus 19 items never in that history, drawn from the
   whole items file (the catalogue) with a generator seeded per record.
5. Titles that name several items are made unique by appending the item id, " (#id)".
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdpo.data.candidates import record_rng, sample_candidates
from sdpo.data.records import Record
from sdpo.errors import UserError

MIN_HISTORY, MAX_HISTORY, N_CANDIDATES = 3, 10, 20
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass
class Interaction:
    user: str
    item: str
    timestamp: float
    order: int  # position in the file: breaks timestamp ties


def read_table(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Rows of a CSV (header line) or JSONL file as dicts of strings; checks the columns."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file.") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}). Re-save it as UTF-8.") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}).") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object per line.")
            rows.append({k: "" if v is None else str(v) for k, v in row.items()})
        columns = set().union(*(r.keys() for r in rows)) if rows else set()
    else:
        reader = csv.DictReader(text.splitlines())
        columns = set(reader.fieldnames or [])
        rows = list(reader)
    missing = [c for c in required if c not in columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; needs {', '.join(required)}" +
                        (f" (optional: {', '.join(optional)})" if optional else "") + ".")
    if not rows:
        raise UserError(f"{path}: holds no rows.")
    return rows


def parse_interactions(path: Path, min_rating: float | None = None) -> list[Interaction]:
    rows = read_table(path, ("user", "item", "timestamp"), ("rating",))
    line_offset = 1 if path.suffix.lower() not in (".jsonl", ".json") else 0
    interactions = []
    for index, row in enumerate(rows):
        where = f"{path}:{index + 1 + line_offset}"
        user, item = (row.get("user") or "").strip(), (row.get("item") or "").strip()
        if not user or not item:
            raise UserError(f"{where}: empty user or item.")
        try:
            timestamp = float(row["timestamp"])
        except (TypeError, ValueError):
            timestamp = _parse_datetime(row.get("timestamp"), where)
        if min_rating is not None:
            try:
                rating = float(row.get("rating", ""))
            except ValueError:
                raise UserError(f"{where}: --min-rating needs a numeric rating column, got {row.get('rating')!r}.") from None
            if rating < min_rating:
                continue
        interactions.append(Interaction(user, item, timestamp, index))
    return interactions


def _parse_datetime(value: str | None, where: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat((value or "").strip()).timestamp()
    except ValueError:
        raise UserError(f"{where}: unparsable timestamp {value!r}; use a number (Unix time) or ISO 8601 (2024-05-01T12:00:00).") from None


def parse_titles(path: Path) -> dict[str, str]:
    rows = read_table(path, ("item", "title"))
    titles: dict[str, str] = {}
    for index, row in enumerate(rows):
        item, title = (row.get("item") or "").strip(), " ".join((row.get("title") or "").split())
        if not item or not title:
            raise UserError(f"{path}: row {index + 1}: empty item or title.")
        titles[item] = title
    return titles


def unique_titles(titles: dict[str, str]) -> dict[str, str]:
    """Item -> title, with titles shared by several items made unique by the item id."""
    counts = Counter(titles.values())
    return {item: (f"{title} (#{item})" if counts[title] > 1 else title) for item, title in titles.items()}


def split_users(users: list[str], seed: int) -> dict[str, str]:
    """User -> 'train' | 'val' | 'test', 8:1:1 at random (seeded)."""
    order = np.random.default_rng(seed).permutation(len(users)).tolist()
    n_train = round(len(users) * SPLIT_FRACTIONS[0])
    n_val = round(len(users) * SPLIT_FRACTIONS[1])
    assignment = {}
    for rank, index in enumerate(order):
        assignment[users[index]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return assignment


def build_records(interactions: list[Interaction], titles: dict[str, str], seed: int) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """Train/val/test records and counts describing how they were made."""
    unknown = sorted({i.item for i in interactions} - set(titles))
    if unknown:
        raise UserError(f"{len(unknown)} item(s) have interactions but no title, e.g. {', '.join(unknown[:5])}. Add them to the items file.")
    sequences: dict[str, list[Interaction]] = defaultdict(list)
    for interaction in interactions:
        sequences[interaction.user].append(interaction)
    users = sorted(sequences)
    assignment = split_users(users, seed)
    item_ids = sorted(titles)
    index_of = {item: n for n, item in enumerate(item_ids)}
    names = unique_titles(titles)
    splits: dict[str, list[Record]] = {"train": [], "val": [], "test": []}
    skipped_repeats = 0
    position = 0
    for user in users:
        events = sorted(sequences[user], key=lambda i: (i.timestamp, i.order))
        ids = [index_of[e.item] for e in events]
        for t in range(MIN_HISTORY, len(ids)):
            history, target = ids[max(0, t - MAX_HISTORY) : t], ids[t]
            if target in history:
                skipped_repeats += 1
                continue
            if len(item_ids) - len(set(history)) - 1 < N_CANDIDATES - 1:
                raise UserError(f"only {len(item_ids)} items in the items file: too few for {N_CANDIDATES} candidates per record.")
            split = assignment[user]
            candidates = sample_candidates(record_rng(seed, position), len(item_ids), target, history, N_CANDIDATES)
            splits[split].append(Record(
                id=f"{split}-{len(splits[split])}", user=user, history=[names[item_ids[i]] for i in history],
                candidates=[names[item_ids[i]] for i in candidates], target=names[item_ids[target]],
            ))
            position += 1
    if not any(splits.values()):
        raise UserError(f"no user has more than {MIN_HISTORY} interactions: no record could be built.")
    empty = [s for s, records in splits.items() if not records]
    if empty:
        raise UserError(f"the {', '.join(empty)} split(s) came out empty ({len(users)} users): the log is too small for an 8:1:1 user split.")
    info = {
        "n_items": len(item_ids),
        "n_users": len(users),
        "n_interactions": len(interactions),
        "users": {s: sum(1 for u in users if assignment[u] == s) for s in splits},
        "skipped_repeat_targets": skipped_repeats,
        "renamed_duplicate_titles": sum(1 for item in item_ids if names[item] != titles[item]),
        "window": f"history of {MIN_HISTORY}..{MAX_HISTORY} most recent items; {N_CANDIDATES} candidates, negatives seeded per record",
    }
    return splits, info
