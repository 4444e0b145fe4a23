"""`sdpo report`: read pipeline run folders, write tables with intervals, paired comparisons, plots.

For every pipeline output folder given (``sdpo pipeline`` writes ``results.json``, its stages'
``eval/<stage>-<protocol>/predictions.jsonl.gz``, ``baselines/<name>/predictions.jsonl.gz`` (plain
``.jsonl`` in folders an older sdpo wrote) and each training stage's ``log.jsonl`` and
``sdpo_config.yaml``), the report holds:

- a table of every (stage, protocol) with every metric and its 95% bootstrap interval,
  recomputed from the per-record predictions;
- paired comparisons on the same records: each trained stage against the stage it started
  from, each S-DPO stage against each DPO stage and against the fewest-negatives S-DPO stage,
  and the most-negatives S-DPO stage against each classic baseline: the HR@1 difference, its
  paired bootstrap interval and the share of resamples in which it is at most 0 (a reward
  ranking is compared with the other stage's log-prob ranking, or the baseline's ranking);
- where the records share users (test records are windows over a few users' histories), a
  second interval beside each, from resampling users with all their records (`sdpo.evaluation.stats`): the
  record bootstrap treats one user's records as independent and is too narrow there;
- ``<run>-records.csv.gz``: gzip-compressed CSV (a full study's rows exceed a megabyte as plain
  text), one row per (record id, stage, protocol) with the target's ``rank`` (rank protocols)
  or ``hit``/``valid`` (generate), and the record's ``user`` where users repeat: the input of
  every number in the tables;
- with ``--compare RUN/STAGE,RUN/STAGE``: paired differences between stages of two inputs, e.g. a new
  study's stage against an older study's on the same test records;
- with ``--slices``: HR@1 on cold targets, warm targets and short histories, with intervals over
  records and users, and paired differences against one stage (`sdpo.report.slices`);
- plots (PNG): training curves (loss, rewards, reward accuracy, chosen log-prob against step),
  validation HR@1 against step where it was logged, HR@1 per stage with intervals, HR@1 against K.

A records CSV can stand in for its run folder (`load_records_table`): with the pipeline config
that produced it, every table, interval and paired comparison comes out the same.

Layer 8: reads what `sdpo.pipeline` writes (it imports `sdpo.pipeline.config` for the stages' relations) and uses
`sdpo.evaluation` for the metrics and intervals.
"""

from __future__ import annotations

from pathlib import Path

from sdpo.errors import UserError
from sdpo.io import write_text_atomic
from sdpo.report.loading import evaluated_ids, load_run, users_from_data
from sdpo.report.plots import plot_hr_vs_k, plot_stage_hr, plot_training_curves, plot_val_hr
from sdpo.report.records import is_records_table, load_records_table, write_records_csv
from sdpo.report.slices import default_versus, slice_ids, slice_tables
from sdpo.report.tables import across_runs, comparison_table, comparisons, summary_table, wide_table

__all__ = ["comparisons", "load_records_table", "load_run", "write_report"]


def _run_slices(run, config: str | Path | None, data: str | Path | None) -> dict[str, set[str]]:
    """The slices of the run's evaluated records, from the prepared data it evaluated (its own, or `data`)."""
    from sdpo.config import read_yaml
    from sdpo.data.datasets import load_split

    found = run.data if run.table is None else None
    if found is None and data is not None:
        found = (Path(data), ((read_yaml(config) if config else {}).get("evaluate") or {}).get("split", "test"))
    if found is None:
        raise UserError(f"report --slices: the prepared data {run.name} evaluated is not here; give it with --data DIR.")
    evaluated = evaluated_ids(run)
    records = [r for r in load_split(*found) if r.id in evaluated]
    if len(records) != len(evaluated):
        raise UserError(f"report --slices: {len(evaluated) - len(records)} evaluated record(s) of {run.name} are not in "
                        f"{found[0]} ({found[1]}); give the prepared data the run evaluated with --data DIR.")
    return slice_ids(records, load_split(found[0], "train"))


def write_report(run_dirs: list[str | Path], out: str | Path, config: str | Path | None = None,
                 data: str | Path | None = None, slices: bool = False, versus: str | None = None,
                 compare: list[str] | None = None) -> list[Path]:
    """Write results.md, one CSV per run and the plots into `out`; returns the files written.

    Each of `run_dirs` is a pipeline output folder or a records CSV (`load_records_table`, which
    reads `config` and `data`); a run folder whose own prepared data is not here reads its users from `data`.
    With `slices`, each run's rank rows are also split into cold and warm targets and short histories
    (`sdpo.report.slices`), compared with `versus` (default: the ensemble, else SASRec).
    Each of `compare` (``RUN/STAGE,RUN/STAGE``) adds a paired difference between stages of two inputs (`across_runs`).
    """
    if not run_dirs:
        raise UserError("report: give at least one pipeline output folder.")
    # every input is checked before anything is written
    runs = [load_records_table(source, config, data) if is_records_table(source) else load_run(source) for source in run_dirs]
    for run in runs:
        if run.table is None and run.users is None and data is not None and run.data is None:
            users_from_data(run, data)
    sliced = {run.name: _run_slices(run, config, data) for run in runs} if slices else {}
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise UserError(f"report: run folders must have distinct names, got {names}.")
    crossed = across_runs(runs, compare) if compare else []
    out = Path(out)
    written: list[Path] = []
    sections = ["# Results", "", "Every number is recomputed from the per-record predictions; intervals are 95% percentile "
                "bootstrap intervals over records (2,000 resamples); differences are paired on the same records.", ""]
    for run in runs:
        csv_path = out / f"{run.name}-records.csv.gz"
        write_records_csv(run, csv_path)
        written.append(csv_path)
        if run.table is not None:
            sections += [f"{run.name}: rebuilt from its per-record table ({run.table.name}); training curves need the run folder's logs.", ""]
        if run.users is not None:
            sections += [f"{run.name}: the {len(run.users):,} evaluated records come from {len(set(run.users.values())):,} users, "
                         "so beside each interval over records stands one over users (each resample draws users with all their "
                         "records; the plots show it). One user's records are not independent: the per-user interval is the one "
                         "to read.", ""]
        rows = comparisons(run)
        title = f"{run.name}: paired HR@1 differences (same records)"
        sections += [wide_table(run), ""] + ([comparison_table(title, rows, run.users is not None), ""] if rows else [])
        if slices:
            sections += [slice_tables(run, sliced[run.name], versus or default_versus(run)), ""]
        plots = [(out / f"{run.name}-hr1.png", lambda p, r=run: plot_stage_hr(r, p) or True),
                 (out / f"{run.name}-training.png", lambda p, r=run: plot_training_curves(r, p)),
                 (out / f"{run.name}-val-hr1.png", lambda p, r=run: plot_val_hr(r, p)),
                 (out / f"{run.name}-hr1-vs-k.png", lambda p, r=run: plot_hr_vs_k(r, p))]
        for path, draw in plots:
            if draw(path):
                written.append(path)
                sections.append(f"![{path.stem}]({path.name})")
        sections += ["", summary_table(run), ""]
    if crossed:
        sections += [comparison_table("Across runs: paired differences (the records both evaluated)", crossed, True), ""]
    results = out / "results.md"
    write_text_atomic(results, "\n".join(sections) + "\n")
    return [results, *written]
