"""Resumable evaluation: each record's raw output, appended to a journal batch by batch.

Evaluating thousands of records takes an hour or more on a CPU. The raw output of each record
(the candidates' log-probs, the reference's log-probs, or the generated text) is appended to
``OUT/progress.jsonl.gz`` after every batch, as one gzip member per batch (gzip reads the members
as one stream). A rerun with the same settings reads what is there and computes only the rest.
Scores are kept as the shortest decimals that give back the same float32 (`float32_compact`), which
is what the kernel computes and what a reader casts them to, so the result is the one an
uninterrupted run gives; this keeps a whole test split's journal small enough to commit. The
first line holds the settings (model, adapter hash, data, record ids, prompts, precision, device, batch
size): a journal written under other settings is started over. What a killed process left half-written
at its end is dropped. `Evaluation.save` removes the journal once metrics.json and the predictions
(predictions.jsonl, or .jsonl.gz in a pipeline) are written.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpo.io import replace_atomic

if TYPE_CHECKING:
    from sdpo.data.records import Record

JOURNAL_FILE = "progress.jsonl.gz"
PLAIN_JOURNAL_FILE = "progress.jsonl"  # an older sdpo's plain journal: read once, then rewritten compressed


def float32_compact(value: Any) -> Any:
    """`value` with every float replaced by the shortest decimal that rounds to the same float32 (lists and dicts walked).

    For a float32 score this loses nothing (``float32(result) == float32(value)``) and takes about half the characters.
    """
    if isinstance(value, float):
        if not abs(value) < 3.4e38:  # inf, nan, or beyond float32's range: kept as it is
            return value
        single = to_float32(value)
        for digits in range(6, 10):
            text = float(f"{value:.{digits}g}")
            if to_float32(text) == single:
                return text
        return value
    if isinstance(value, list):
        return [float32_compact(item) for item in value]
    if isinstance(value, dict):
        return {key: float32_compact(item) for key, item in value.items()}
    return value


def to_float32(value: float) -> float:
    """The float32 nearest to `value`, as a Python float: what a compact score stands for."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _read_lines(path: Path) -> list[str]:
    """The whole lines of a journal, plain or as gzip members; what a kill cut off at the end is dropped."""
    if path.suffix != ".gz":
        return path.read_text(encoding="utf-8", errors="replace").splitlines()  # a cut character spoils only its line
    lines: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:  # a file that cannot be opened is an error, not an empty journal
        try:
            for line in f:
                if line.endswith("\n"):
                    lines.append(line)
        except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError):
            print(f"[evaluate] {path}: the end a killed process left half-written is dropped ({len(lines)} whole lines kept)")
    return lines


class Journal:
    """Raw per-record outputs by (kind, record id); kinds: logp, reference, text."""

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.done: dict[tuple[str, str], Any] = {}
        plain = self.path.with_name(PLAIN_JOURNAL_FILE)
        source = self.path if self.path.is_file() else plain if plain.is_file() else None
        lines = _read_lines(source) if source else []
        if lines and self._header(lines[0]) != self.settings:
            print(f"[evaluate] {source} was written under other settings: starting over")
        elif lines:
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                    self.done[(entry["kind"], entry["id"])] = float32_compact(entry["value"])
                except (ValueError, KeyError, TypeError):
                    continue  # cut off by a kill
        # rewrite: the header, then only whole lines, so appending starts on a fresh member
        text = "".join(json.dumps(row) + "\n" for row in self._rows())
        replace_atomic(self.path, lambda tmp: tmp.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0)))
        plain.unlink(missing_ok=True)  # read above, or older than the compressed journal

    @staticmethod
    def _header(line: str) -> Any:
        try:
            return json.loads(line).get("settings")
        except (ValueError, AttributeError):
            return None

    def _rows(self):
        yield {"settings": self.settings}
        for (kind, record_id), value in self.done.items():
            yield {"kind": kind, "id": record_id, "value": value}

    def get(self, kind: str, record_id: str) -> Any:
        return self.done.get((kind, record_id))

    def add(self, kind: str, outputs: list[tuple[str, Any]]) -> None:
        """Append one batch's outputs (as one gzip member) and flush them to disk."""
        lines = []
        for record_id, value in outputs:
            value = float32_compact(value)
            lines.append(json.dumps({"kind": kind, "id": record_id, "value": value}) + "\n")
            self.done[(kind, record_id)] = value
        with open(self.path, "ab") as f:
            f.write(gzip.compress("".join(lines).encode("utf-8"), mtime=0))
            f.flush()
            os.fsync(f.fileno())

    def __len__(self) -> int:
        return len(self.done)


def batches(items: list, size: int):
    """`items` in consecutive lists of `size` (the last one shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def journaled(journal: Journal | None, kind: str, batch: list[Record]) -> list[Any] | None:
    """The batch's outputs of `kind` from the journal, if it holds all of them."""
    if journal is None:
        return None
    found = [journal.get(kind, r.id) for r in batch]
    return None if any(value is None for value in found) else found
