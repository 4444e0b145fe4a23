"""What an evaluation leaves: its metrics and per-record predictions, and where they lie in its folder."""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpo.data.records import Record
from sdpo.evaluation.journal import JOURNAL_FILE, PLAIN_JOURNAL_FILE, float32_compact
from sdpo.io import read_jsonl, write_json, write_jsonl

PREDICTIONS = "predictions.jsonl"


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]

    def save(self, out_dir: str | Path, compress: bool = False) -> None:
        """predictions.jsonl (predictions.jsonl.gz with `compress`), then metrics.json: metrics.json means both are whole.

        Scores in the predictions are written as their shortest float32 decimals (`float32_compact`), in about half
        the bytes (a study commits these files): log-probs, which the kernel computes in float32, exactly; rewards and
        other derived scores to float32 precision (ranks and metrics are computed before, from the exact values)."""
        out_dir = Path(out_dir)
        written, other = (PREDICTIONS + ".gz", PREDICTIONS) if compress else (PREDICTIONS, PREDICTIONS + ".gz")
        write_jsonl(out_dir / written, (float32_compact(row) for row in self.predictions))
        (out_dir / other).unlink(missing_ok=True)  # an earlier evaluation's, in the other form: never read in place of these
        write_json(out_dir / "metrics.json", self.metrics)
        for journal in (JOURNAL_FILE, PLAIN_JOURNAL_FILE):  # the raw outputs they held are in the files above
            (out_dir / journal).unlink(missing_ok=True)


def predictions_file(out_dir: str | Path) -> Path:
    """The per-record predictions an evaluation wrote into `out_dir`: predictions.jsonl.gz, else predictions.jsonl."""
    compressed = Path(out_dir) / (PREDICTIONS + ".gz")
    return compressed if compressed.is_file() else Path(out_dir) / PREDICTIONS


def read_whole_evaluation(out_dir: str | Path, records: list[Record]) -> tuple[dict[str, Any] | None, str | None]:
    """(metrics, None) of a finished evaluation in `out_dir` whose files are whole, one prediction per record of `records`;
    (None, what is wrong) where they are unreadable or cut short."""
    out_dir = Path(out_dir)
    try:
        metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
        predictions = read_jsonl(predictions_file(out_dir))
    except (OSError, ValueError, EOFError, zlib.error) as exc:  # gzip raises EOFError for a file cut short
        return None, f"its files are damaged ({type(exc).__name__}: {exc})"
    ids = [row.get("id") for row in predictions if isinstance(row, dict)]
    if len(ids) != metrics.get("n_records") or sorted(ids) != sorted(r.id for r in records):
        return None, f"{predictions_file(out_dir).name} holds {len(ids)} predictions, not one per each of the {len(records)} records"
    return metrics, None
