"""`Record`: one recommendation question, and the JSONL files that hold them.

A record is one user's recent history (item titles, oldest first), the candidate titles
(the true next item among them) and the true next item. Every data source becomes a list
of records; everything downstream reads records through `read_records`, which validates
each line and names file, line and problem when one is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields
from itertools import repeat
from pathlib import Path

from sdpo.errors import UserError

FIELDS = {"id": str, "user": (str, type(None)), "history": list, "candidates": list, "target": str}


@dataclass(frozen=True)
class Record:
    id: str
    user: str | None
    history: list[str]
    candidates: list[str]
    target: str

    def to_json(self) -> str:
        # the fields as they are: dataclasses.asdict would deep-copy every title list first (half of `data prepare`)
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, ensure_ascii=False)

    @property
    def negatives(self) -> list[str]:
        """The candidates other than the target, in candidate order."""
        return [c for c in self.candidates if c != self.target]


def record_problem(record: Record) -> str | None:
    """Why `record` is not a valid recommendation question, or None if it is."""
    if not record.id:
        return "empty id"
    if not record.history:
        return "empty history"
    titles = [*record.history, *record.candidates, record.target]
    # map/all over built-ins: a LastFM train file's 1.5 million titles are checked at C speed
    if not all(map(isinstance, titles, repeat(str))):
        return "every title must be a string"
    if not all(map(str.strip, titles)):
        return "empty title"
    joined = "".join(titles)
    if "\n" in joined or "\r" in joined:
        return "a title contains a line break"
    if len(record.candidates) < 2:
        return f"needs at least 2 candidates, has {len(record.candidates)}"
    if len(set(record.candidates)) != len(record.candidates):
        dup = next(c for c in record.candidates if record.candidates.count(c) > 1)
        return f"duplicate candidate {dup!r}"
    if record.target not in record.candidates:
        return f"target {record.target!r} is not among the candidates"
    inside = set(record.history).intersection(record.candidates)
    if inside:
        return f"candidate {sorted(inside)[0]!r} is inside the history"
    return None


def parse_record(obj: object) -> Record:
    """Build a record from a decoded JSON value, raising ValueError with the problem."""
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    missing = [k for k in FIELDS if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    extra = sorted(set(obj) - set(FIELDS))
    if extra:
        raise ValueError(f"unknown field(s) {', '.join(extra)}")
    for key, kind in FIELDS.items():
        if not isinstance(obj[key], kind):
            raise ValueError(f"field {key!r} has type {type(obj[key]).__name__}")
    record = Record(**obj)
    problem = record_problem(record)
    if problem:
        raise ValueError(problem)
    return record


def read_records(path: str | Path, limit: int | None = None) -> list[Record]:
    """Read and validate a JSONL file of records (the first `limit` lines if given)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of the data
    except FileNotFoundError:
        raise UserError(f"{path}: no such file. Prepare a dataset first (sdpo data prepare ...).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({exc}).") from None
    records: list[Record] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(records) >= limit:
            break
        if not line.strip():
            continue
        try:
            record = parse_record(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}). Each line must be one record.") from None
        except ValueError as exc:
            raise UserError(f"{path}:{number}: bad record: {exc}.") from None
        if record.id in seen:
            raise UserError(f"{path}:{number}: bad record: duplicate id {record.id!r}.")
        seen.add(record.id)
        records.append(record)
    if not records:
        raise UserError(f"{path}: holds no records.")
    return records


def write_records(path: str | Path, records: Iterable[Record]) -> int:
    """Write records as JSONL; returns how many were written."""
    count = 0
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(record.to_json() + "\n")
            count += 1
    return count
