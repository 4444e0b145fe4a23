"""The item table of a prepared dataset: titles to integer ids, built once from the train records.

Id 0 is padding and id 1 stands for an unknown item: a title never seen in training. A
title missing from the table is first looked up by a loose key (case, punctuation and the
connectors "and", "plus", "&", "+" ignored), which maps for instance 'Florence and the
Machine' to 'Florence + the Machine' and 'Plus 44' to '+44'; what still fails is unknown,
and counted.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from sdpo.data.records import Record

PAD, UNKNOWN = 0, 1
_CONNECTORS = re.compile(r"\b(and|plus)\b|[&+]")


def loose_key(title: str) -> str:
    return re.sub(r"[\W_]+", "", _CONNECTORS.sub(" ", title.casefold()))


class ItemTable:
    def __init__(self, titles: list[str]):
        self.titles = list(titles)  # id - 2 -> title
        self.ids = {title: i + 2 for i, title in enumerate(self.titles)}
        keys = Counter(loose_key(t) for t in self.titles)
        self.loose = {loose_key(t): self.ids[t] for t in self.titles if keys[loose_key(t)] == 1}

    @classmethod
    def from_records(cls, records: list[Record]) -> ItemTable:
        """Every title of the training records, in first-seen order."""
        seen: dict[str, None] = {}
        for record in records:
            for title in (*record.history, *record.candidates, record.target):
                seen.setdefault(title, None)
        return cls(list(seen))

    def __len__(self) -> int:
        """Number of ids, padding and unknown included."""
        return len(self.titles) + 2

    def id_of(self, title: str) -> int:
        if title in self.ids:
            return self.ids[title]
        return self.loose.get(loose_key(title), UNKNOWN)

    def coverage(self, records: list[Record]) -> dict:
        """How the titles of `records` map: remapped spellings, unknown titles, records touched."""
        remapped, unknown, touched = {}, Counter(), 0
        for record in records:
            hit = False
            for title in (*record.history, *record.candidates):
                item = self.id_of(title)
                if item == UNKNOWN:
                    unknown[title] += 1
                    hit = True
                elif title not in self.ids:
                    remapped[title] = self.titles[item - 2]
            touched += hit
        return {"remapped_titles": remapped, "unknown_titles": dict(unknown), "records_with_unknown_items": touched}

    def save(self, path: str | Path) -> None:
        from sdpo.io import write_json

        write_json(path, {"titles": self.titles})

    @classmethod
    def load(cls, path: str | Path) -> ItemTable:
        return cls(json.loads(Path(path).read_text(encoding="utf-8"))["titles"])
