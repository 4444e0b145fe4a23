"""The per-record table (``<run>-records.csv.gz``): written from a run, and read back in its place."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

from sdpo.errors import UserError
from sdpo.io import replace_atomic
from sdpo.report.loading import Result, Run, evaluated_ids, generate_result, rank_result, shared_users

RECORDS_SUFFIXES = (".csv", ".csv.gz")


def is_records_table(path: str | Path) -> bool:
    """Whether `path` names a per-record CSV (what the report writes as ``<run>-records.csv.gz``) rather than a run folder."""
    return str(path).endswith(RECORDS_SUFFIXES)


def _read_records_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserError(f"{path}: no such records table; give a <run>-records.csv.gz that sdpo report wrote.")
    try:
        with (gzip.open(path, "rt", encoding="utf-8", newline="") if path.suffix == ".gz" else open(path, encoding="utf-8", newline="")) as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: not a readable CSV ({exc}).") from None
    missing = {"id", "stage", "protocol", "rank", "hit", "valid"} - set(rows[0] if rows else {})
    if missing:
        raise UserError(f"{path}: no rows or no column(s) {', '.join(sorted(missing))}; give a records table that sdpo report wrote.")
    return rows


def _results_from_table(path: Path, rows: list[dict[str, str]]) -> list[Result]:
    """The (stage, protocol) results of a records table, in the order the table first names them."""
    grouped: dict[tuple[str, str], list[dict[str, str]]] = {}
    for row in rows:
        grouped.setdefault((row["stage"], row["protocol"]), []).append(row)
    results = []
    try:
        for (stage, protocol), group in grouped.items():
            if protocol in ("rank", "rank-reward"):
                results.append(rank_result(stage, protocol, group, "rank"))
            elif protocol == "generate":
                strict = {row["id"]: row for row in grouped.get((stage, "generate-strict"), [])}
                if set(strict) != {row["id"] for row in group}:
                    raise UserError(f"{path}: stage {stage!r} has generate rows without the same records' generate-strict rows.")
                results.append(generate_result(stage, [{**row, "strict_hit": strict[row["id"]]["hit"], "strict_valid": strict[row["id"]]["valid"]}
                                                        for row in group]))
            elif protocol != "generate-strict":
                raise UserError(f"{path}: unknown protocol {protocol!r} (stage {stage!r}); known: rank, rank-reward, generate, generate-strict.")
    except ValueError as exc:
        raise UserError(f"{path}: a rank, hit or valid value is not a number ({exc}).") from None
    return results


def load_records_table(path: str | Path, config: str | Path | None = None, data: str | Path | None = None) -> Run:
    """A run rebuilt from its per-record CSV: every table and the HR@1 plots, without the run folder.

    `config`, the pipeline config that produced the run, says how its stages relate (which SFT
    stage each align stage started from, each one's loss and K): without it there are no paired
    comparisons and no HR@1-against-K plot. The records' users come from the table's ``user``
    column, or else from `data`, the prepared dataset folder (the split the config evaluated).
    Training curves need the run's logs and are not drawn.
    """
    from sdpo.config import read_yaml
    from sdpo.data.datasets import load_split

    path = Path(path)
    rows = _read_records_csv(path)
    name = path.name.removesuffix(".gz").removesuffix(".csv").removesuffix("-records")
    run = Run(name, path.parent, _results_from_table(path, rows), table=path)
    pipeline = read_yaml(config) if config is not None else {}
    if config is not None:
        from sdpo.pipeline.config import parse_training_stages

        sft_stages, align_stages = parse_training_stages(pipeline, Path(config))
        evaluated_stages = {r.stage for r in run.results}
        for stage, options, start in [(stage, options, "zero-shot") for stage, options in sft_stages] + align_stages:
            if stage in evaluated_stages:
                run.configs[stage], run.starts[stage] = options, start
        run.baselines = [r.stage for r in run.results if r.protocol == "rank" and r.stage not in (*run.configs, "zero-shot")]
    users = {row["id"]: row["user"] for row in rows} if rows[0].get("user") else None
    if users is None and data is not None:
        users = {r.id: r.user for r in load_split(data, (pipeline.get("evaluate") or {}).get("split", "test"))}
    if users is not None:
        evaluated = evaluated_ids(run)
        unknown = evaluated - users.keys()
        if unknown:
            raise UserError(f"{path}: {len(unknown)} record(s) have no user in {data or path} (e.g. {sorted(unknown)[0]}); "
                            "give the prepared dataset folder the run evaluated.")
        run.users = shared_users(users, evaluated)
    return run


def write_records_csv(run: Run, path: Path) -> None:
    """One row per (record id, stage, protocol): id, stage, protocol, rank, hit, valid (and user, where records share users)."""
    rows = [{"stage": r.stage, **rec} for r in run.results for rec in r.records]
    fields = ["id", "stage", "protocol", "rank", "hit", "valid"]
    if run.users is not None:
        fields.append("user")
        rows = [{**row, "user": run.users[row["id"]]} for row in rows]

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as packed, \
                io.TextIOWrapper(packed, encoding="utf-8", newline="") as out:  # mtime 0: the same rows give the same bytes
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    replace_atomic(path, write)
