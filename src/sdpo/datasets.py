"""Prepared dataset folders: train/val/test JSONL plus a manifest, written atomically.

A prepared folder is what every later stage reads::

    DIR/train.jsonl  DIR/val.jsonl  DIR/test.jsonl  DIR/manifest.json

It is built in a temporary sibling folder and renamed into place only when every record
passed validation, so a failed run leaves nothing half-written behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdpo.errors import UserError
from sdpo.io import refuse_non_empty, write_folder_atomic
from sdpo.records import Record, read_records, record_problem, write_records

SPLITS = ("train", "val", "test")


def write_prepared(out: str | Path, splits: dict[str, list[Record]], manifest: dict[str, Any], overwrite: bool = False) -> Path:
    """Validate `splits` and write them with `manifest` into the folder `out`."""
    out = Path(out)
    refuse_non_empty(out, overwrite, "--out")
    for split, records in splits.items():
        seen: set[str] = set()
        for index, record in enumerate(records):
            problem = record_problem(record) or ("duplicate id" if record.id in seen else None)
            if problem:
                raise UserError(f"{split} record {index} (id {record.id!r}): {problem}. Nothing was written.")
            seen.add(record.id)

    def fill(staging: Path) -> None:
        counts = {split: write_records(staging / f"{split}.jsonl", records) for split, records in splits.items()}
        (staging / "manifest.json").write_text(json.dumps({**manifest, "counts": counts}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return write_folder_atomic(out, fill)


def split_path(data_dir: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    return Path(data_dir) / f"{split}.jsonl"


def load_split(data_dir: str | Path, split: str, limit: int | None = None) -> list[Record]:
    """The validated records of one split of a prepared folder (the first `limit` if given)."""
    return read_records(split_path(data_dir, split), limit=limit)


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no manifest; {data_dir} is not a prepared dataset (run sdpo data prepare).") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc}).") from None
