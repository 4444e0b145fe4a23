"""Prepared dataset folders: train/val/test JSONL plus a manifest, written atomically.

A prepared folder is what every later stage reads::

    DIR/train.jsonl  DIR/val.jsonl  DIR/test.jsonl  DIR/manifest.json

It is built in a temporary sibling folder and renamed into place only when every record
passed validation, so a failed run leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from sdpo.data.prompts import DEFAULT_DOMAIN, DOMAINS
from sdpo.data.records import Record, read_records, record_problem, write_records
from sdpo.errors import UserError
from sdpo.io import refuse_non_empty, write_folder_atomic

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


def data_fingerprint(data_dir: str | Path) -> str:
    """SHA-256 of a prepared folder's manifest and split files: which records a run read, beyond the folder's path.

    Preparation is deterministic, so a folder prepared again from the same source and seed has the same fingerprint;
    a change in the preparation code that changes any record changes it."""
    from sdpo.data.sources.fetch import sha256_of

    digest = hashlib.sha256()
    for name in ("manifest.json", *(f"{split}.jsonl" for split in SPLITS)):
        path = Path(data_dir) / name
        digest.update(f"{name} {sha256_of(path) if path.is_file() else '-'}\n".encode())
    return digest.hexdigest()


def split_path(data_dir: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
    return Path(data_dir) / f"{split}.jsonl"


def subset(records: list[Record], limit: int | None, seed: int = 0) -> list[Record]:
    """`limit` records drawn at random (seeded), in file order; all of them if `limit` is None.

    The draw is the first `limit` of one seeded shuffle, so a smaller subset lies inside a
    larger one with the same seed: SFT on 512 records and S-DPO on 256 share those 256. Never
    "the first N lines": the prepared files are ordered by user, so the first 256 LastFM train
    records are the sliding windows of 7 users.
    """
    if limit is None or limit >= len(records):
        return list(records)
    if limit < 1:
        raise UserError(f"a record limit must be at least 1, got {limit}.")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[:limit])]


def load_split(data_dir: str | Path, split: str, limit: int | None = None, seed: int = 0) -> list[Record]:
    """The validated records of one split of a prepared folder; `limit` of them drawn with `seed` (see `subset`)."""
    return subset(read_records(split_path(data_dir, split)), limit, seed)


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared folder, with its fields checked (a user error names the bad one)."""
    path = Path(data_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"{path}: no manifest; {data_dir} is not a prepared dataset (run sdpo data prepare).") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable manifest ({exc}).") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: a manifest must be a JSON object. Prepare the folder again with sdpo data prepare.")
    domain = manifest.get("domain", DEFAULT_DOMAIN)
    if domain not in DOMAINS:
        raise UserError(f"{path}: unknown domain {domain!r}; known: {', '.join(DOMAINS)}. Fix the manifest or pass --domain.")
    counts = manifest.get("counts", {})
    if not isinstance(counts, dict) or not all(isinstance(v, int) and v >= 0 for v in counts.values()):
        raise UserError(f"{path}: 'counts' must map split names to record counts. Prepare the folder again.")
    return manifest


def resolve_domain(data_dir: str | Path, domain: str | None) -> str:
    """The prompt domain of a run: `domain` if given (checked), else the manifest's."""
    if domain is None:
        return read_manifest(data_dir).get("domain", DEFAULT_DOMAIN)
    if domain not in DOMAINS:
        raise UserError(f"--domain {domain!r}: unknown; choose one of {', '.join(DOMAINS)}.")
    return domain
