"""MovieLens-100K (GroupLens): u.data ratings and u.item titles, through the interactions path.

u.data is tab-separated ``user item rating unix-time``; u.item is latin-1, ``id|title|...``.
MovieLens titles carry their year; the few titles shared by two ids get " (#id)".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdpo.data.records import Record
from sdpo.data.sources.fetch import verified_path
from sdpo.data.sources.interactions import Interaction, build_records
from sdpo.errors import UserError


def read_movielens(raw_dir: Path, min_rating: float | None = None) -> tuple[list[Interaction], dict[str, str]]:
    data = verified_path(raw_dir, "movielens-100k", "u.data")
    items = verified_path(raw_dir, "movielens-100k", "u.item")
    interactions = []
    for number, line in enumerate(data.read_text(encoding="utf-8").splitlines()):
        user, item, rating, timestamp = line.split("\t")
        if min_rating is not None and float(rating) < min_rating:
            continue
        interactions.append(Interaction(user, item, float(timestamp), number))
    titles = {}
    for line in items.read_text(encoding="latin-1").splitlines():
        if line.strip():
            fields = line.split("|")
            titles[fields[0]] = " ".join(fields[1].split())
    if not interactions:
        raise UserError(f"{data}: no interactions left (min rating {min_rating}).")
    return interactions, titles


def prepare_movielens(raw_dir: Path, seed: int, min_rating: float | None = None) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    interactions, titles = read_movielens(raw_dir, min_rating)
    splits, info = build_records(interactions, titles, seed)
    return splits, {"dataset": "movielens-100k", "domain": "movies", "seed": seed, "min_rating": min_rating, **info}
