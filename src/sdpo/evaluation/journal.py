"""Resumable evaluation: each record's raw output, appended to a journal batch by batch.

Evaluating thousands of records takes an hour or more on a CPU. The raw output of each record
(the candidates' log-probs, the reference's log-probs, or the generated text) is appended to
``OUT/progress.jsonl`` after every batch. A rerun with the same settings reads what is there
and computes only the rest; the values are stored exactly, so the result is the one an
uninterrupted run gives. The first line holds the settings (model, adapter hash, data, record ids,
prompts, precision, batch size): a journal written under other settings is started over. A line
cut off by a killed process is dropped. `Evaluation.save` removes the journal once metrics.json
and the predictions (predictions.jsonl, or .jsonl.gz in a pipeline) are written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpo.io import write_text_atomic

if TYPE_CHECKING:
    from sdpo.data.records import Record

JOURNAL_FILE = "progress.jsonl"


class Journal:
    """Raw per-record outputs by (kind, record id); kinds: logp, reference, text."""

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.done: dict[tuple[str, str], Any] = {}
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        if lines and self._header(lines[0]) != self.settings:
            print(f"[evaluate] {self.path} was written under other settings: starting over")
        elif lines:
            for line in lines[1:]:
                try:
                    entry = json.loads(line)
                    self.done[(entry["kind"], entry["id"])] = entry["value"]
                except (ValueError, KeyError, TypeError):
                    continue  # cut off by a kill
        # rewrite: the header, then only whole lines, so appending starts on a fresh line
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in self._rows()))

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
        """Append one batch's outputs and flush them to disk."""
        with open(self.path, "a", encoding="utf-8") as f:
            for record_id, value in outputs:
                f.write(json.dumps({"kind": kind, "id": record_id, "value": value}) + "\n")
                self.done[(kind, record_id)] = value
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
