"""Slices of the evaluated records where an LM may add what an ID model lacks (``sdpo report --slices``).

Published LM recommenders beat a tuned SASRec where the ID model has little to go on (A-LLMRec, LLM-ESR),
so the report splits the evaluated records by:

- **cold targets**: the target's training count (how often it is a training record's target) is at
  most the 35% quantile of the evaluated records' target counts;
- **warm targets**: at least the 65% quantile;
- **short histories**: 3 titles or fewer.

For each rank row, HR@1 on every slice with its 95% interval over records and, where records share
users, over users; then each row's paired difference against one stage (``--versus``; default the
ensemble of the ID models where the run has it, else SASRec), on every slice.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from sdpo.data.records import Record
from sdpo.evaluation.stats import bootstrap_ci, paired_difference
from sdpo.report.loading import Result, Run

COLD_SHARE = 0.35
SHORT_HISTORY = 3
SLICES = ("all", "cold targets", "warm targets", "short histories")


def slice_ids(records: list[Record], train: list[Record]) -> dict[str, set[str]]:
    """Record ids per slice (module docstring) of the evaluated `records`, by the training records' target counts."""
    counts = Counter(r.target for r in train)
    target_counts = np.array([counts.get(r.target, 0) for r in records])
    low, high = np.quantile(target_counts, COLD_SHARE), np.quantile(target_counts, 1 - COLD_SHARE)
    return {
        "all": {r.id for r in records},
        "cold targets": {r.id for r, n in zip(records, target_counts, strict=True) if n <= low},
        "warm targets": {r.id for r, n in zip(records, target_counts, strict=True) if n >= high},
        "short histories": {r.id for r in records if len(r.history) <= SHORT_HISTORY},
    }


def default_versus(run: Run) -> str | None:
    """The stage the slices compare with: the ensemble where the run has one, else SASRec, else none."""
    ranked = {r.stage for r in run.results if r.protocol == "rank"}
    return next((stage for stage in ("ensemble", "sasrec") if stage in ranked), None)


def _ranked(run: Run) -> list[Result]:
    return [r for r in run.results if r.protocol in ("rank", "rank-reward")]


def _hr1_cell(run: Run, result: Result, ids: list[str]) -> str:
    values = result.column("hr@1", ids)
    low, high = bootstrap_ci(values)
    cell = f"{sum(values) / len(values):.3f} [{low:.3f}, {high:.3f}]"
    if run.users is not None:
        cell += " [{:.3f}, {:.3f}]".format(*bootstrap_ci(values, groups=run.groups(ids)))
    return cell


def slice_rows(run: Run, slices: dict[str, set[str]], versus: str | None) -> list[dict[str, Any]]:
    """Per rank row and slice: n, HR@1 and its intervals; and against `versus` the paired difference (records, users)."""
    reference = next((r for r in run.results if r.stage == versus and r.protocol == "rank"), None)
    rows = []
    for result in _ranked(run):
        for name in SLICES:
            ids = [i for i in result.values if i in slices[name]]
            if not ids:
                continue
            row: dict[str, Any] = {"stage": result.stage, "protocol": result.protocol, "slice": name, "n": len(ids),
                                   "hr@1": sum(result.column("hr@1", ids)) / len(ids), "cell": _hr1_cell(run, result, ids)}
            if reference is not None and result is not reference:
                shared = [i for i in ids if i in reference.values]
                pair = result.column("hr@1", shared), reference.column("hr@1", shared)
                row["versus"] = paired_difference(*pair)
                if run.users is not None:
                    row["versus_users"] = paired_difference(*pair, groups=run.groups(shared))
            rows.append(row)
    return rows


def slice_tables(run: Run, slices: dict[str, set[str]], versus: str | None) -> str:
    """Markdown: HR@1 per rank row and slice; then the paired differences against `versus`."""
    rows = slice_rows(run, slices, versus)
    sizes = " · ".join(f"{name} {len(ids):,}" for name, ids in slices.items())
    per_user = " [per-user 95% CI]" if run.users is not None else ""
    by_key = {(r["stage"], r["protocol"], r["slice"]): r for r in rows}
    lines = [f"### {run.name}: slices", "",
             f"Records per slice ({sizes}). Cold targets: the target's training count at most the {COLD_SHARE:.0%} quantile of the "
             f"evaluated records'; warm: at least the {1 - COLD_SHARE:.0%} quantile; short histories: {SHORT_HISTORY} titles or fewer. "
             f"HR@1 [95% CI over records]{per_user}:", "",
             "| stage | protocol | " + " | ".join(SLICES) + " |", "|---|---|" + "---|" * len(SLICES)]
    for result in _ranked(run):
        cells = [by_key[(result.stage, result.protocol, name)]["cell"] if (result.stage, result.protocol, name) in by_key else "–"
                 for name in SLICES]
        lines.append(f"| {result.stage} | {result.protocol} | " + " | ".join(cells) + " |")
    if versus is None or not any("versus" in r for r in rows):
        return "\n".join(lines)
    lines += ["", f"Paired HR@1 differences against {versus} (same records), [95% CI over records]"
              + (" [over users]" if run.users is not None else "") + ":", "",
              "| stage | protocol | " + " | ".join(SLICES) + " |", "|---|---|" + "---|" * len(SLICES)]
    for result in _ranked(run):
        if result.stage == versus and result.protocol == "rank":
            continue
        cells = []
        for name in SLICES:
            row = by_key.get((result.stage, result.protocol, name))
            if row is None or "versus" not in row:
                cells.append("–")
                continue
            diff = row["versus"]
            cell = f"{diff['difference']:+.3f} [{diff['interval'][0]:+.3f}, {diff['interval'][1]:+.3f}]"
            if "versus_users" in row:
                cell += " [{:+.3f}, {:+.3f}]".format(*row["versus_users"]["interval"])
            cells.append(cell)
        lines.append(f"| {result.stage} | {result.protocol} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
