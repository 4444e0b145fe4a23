"""A pipeline run folder read for the report: per-record results, training logs, configs, users."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdpo.errors import UserError
from sdpo.evaluation.metrics import per_record_ranking
from sdpo.evaluation.results import predictions_file
from sdpo.io import read_jsonl

RANK_METRICS = ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr")


GENERATE_METRICS = ("hr@1", "valid_ratio", "strict_hr@1", "strict_valid_ratio")
PROTOCOL_ORDER = ("rank", "rank-reward", "generate")


@dataclass
class Result:
    """One (stage, protocol) of a run: its per-record values, keyed by record id."""

    stage: str
    protocol: str
    values: dict[str, dict[str, float]]  # record id -> metric -> value
    records: list[dict[str, Any]]  # the CSV rows: id, protocol, rank, hit, valid

    def column(self, metric: str, ids: list[str]) -> list[float]:
        return [self.values[i][metric] for i in ids]

    def metrics(self) -> list[str]:
        return list(next(iter(self.values.values())))


@dataclass
class Run:
    name: str
    folder: Path
    results: list[Result]
    logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # stage -> log entries
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> resolved run config
    starts: dict[str, str] = field(default_factory=dict)  # trained stage -> the stage it started from
    baselines: list[str] = field(default_factory=list)  # the classic recommenders' stages (popularity, sasrec, ...)
    users: dict[str, str] | None = None  # record id -> user, where the evaluated records share users
    table: Path | None = None  # the records CSV the run was rebuilt from (None: read from its folder)
    data: tuple[Path, str] | None = None  # (prepared data folder, split) it evaluated, where that folder is here (`run_data`)

    def groups(self, ids: list[str]) -> list[str] | None:
        """The users of records `ids` for a per-user bootstrap, or None where the records' users are unknown or all distinct."""
        return None if self.users is None else [self.users[i] for i in ids]


def _read_predictions(folder: Path) -> list[dict[str, Any]]:
    """The per-record predictions of an evaluation folder (predictions.jsonl.gz or predictions.jsonl)."""
    path = predictions_file(folder)
    if not path.is_file():
        raise UserError(f"{path}: missing. Rerun the pipeline (it reuses what is finished) to write it.")
    try:
        return read_jsonl(path)
    except (ValueError, OSError, EOFError):
        raise UserError(f"{path}: not JSON lines. Rerun the pipeline stage that wrote it.") from None


def rank_result(stage: str, protocol: str, rows: list[dict[str, Any]], key: str) -> Result:
    ranks = [int(row[key]) for row in rows]
    per_metric = per_record_ranking(ranks)
    values = {row["id"]: {m: per_metric[m][i] for m in RANK_METRICS} for i, row in enumerate(rows)}
    records = [{"id": row["id"], "protocol": protocol, "rank": rank, "hit": int(rank == 1), "valid": 1}
               for row, rank in zip(rows, ranks, strict=True)]
    return Result(stage, protocol, values, records)


def generate_result(stage: str, rows: list[dict[str, Any]]) -> Result:
    """The paper's matcher (protocol generate) and the longest-match one (rows generate-strict in the CSV)."""
    values = {row["id"]: {"hr@1": float(row["hit"]), "valid_ratio": float(row["valid"]),
                          "strict_hr@1": float(row["strict_hit"]), "strict_valid_ratio": float(row["strict_valid"])} for row in rows}
    records = [{"id": row["id"], "protocol": "generate", "rank": "", "hit": int(row["hit"]), "valid": int(row["valid"])} for row in rows]
    records += [{"id": row["id"], "protocol": "generate-strict", "rank": "", "hit": int(row["strict_hit"]), "valid": int(row["strict_valid"])}
                for row in rows]
    return Result(stage, "generate", values, records)


def _recorded_evaluations(folder: Path) -> list[dict[str, Any]]:
    """The metrics.json of a run's evaluations and baselines (a damaged one skipped): what each recorded of its data."""
    infos = []
    for metrics_path in sorted(folder.glob("eval/*/metrics.json")) + sorted(folder.glob("baselines/*/metrics.json")):
        try:
            info = json.loads(metrics_path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if isinstance(info, dict):
            infos.append(info)
    return infos


def _is_recorded_data(data: Path, split: str, info: dict[str, Any], fingerprints: dict[Path, str]) -> bool:
    """Whether `data` holds the split an evaluation read: its file is there, and its fingerprint is the recorded one
    (`fingerprints`: those computed so far in this look-up, each folder hashed once)."""
    from sdpo.data.datasets import data_fingerprint

    if not (data / f"{split}.jsonl").is_file():
        return False
    if not info.get("data_sha256"):
        return True
    if data not in fingerprints:
        fingerprints[data] = data_fingerprint(data)
    return fingerprints[data] == info["data_sha256"]


def _split_users(data: Path, split: str) -> dict[str, str | None]:
    """Record id -> user (None where the data names none) of a prepared split."""
    from sdpo.data.datasets import load_split

    return {r.id: r.user for r in load_split(data, split)}


def run_data(folder: Path) -> tuple[Path, str] | None:
    """(the prepared data folder, the split) a run evaluated: named by an evaluation's (or a baseline's) metrics.json, read
    from the data folder it names (relative to the run, as a study records it, or to the working folder, as older runs
    did) or from the run's own ``data``, where the recorded data fingerprint matches; None when none is here."""
    fingerprints: dict[Path, str] = {}
    for info in _recorded_evaluations(folder):
        split, named = info.get("split"), info.get("data")
        places = [folder / named, Path(named)] if named and not Path(named).is_absolute() else [Path(named)] if named else []
        for data in (*places, folder / "data"):
            if split and _is_recorded_data(data, split, info, fingerprints):
                return data, split
    return None


def finished_evaluations(folder: Path) -> list[dict[str, str]]:
    """The (stage, protocol) rows a pipeline's results.json will list, from the evaluations finished so far: each
    ``eval/<stage>-<rank|generate>`` with its predictions (and a rank-reward row where it ranked by reward too), then
    each baseline with its test predictions. Fusion weights' val rankings (``-rank-val``) are not results rows."""
    rows = []
    for metrics_path in sorted(folder.glob("eval/*/metrics.json")):
        stage, _, protocol = metrics_path.parent.name.rpartition("-")
        if not stage or protocol not in ("rank", "generate") or not any(metrics_path.parent.glob("predictions.jsonl*")):
            continue
        rows.append({"stage": stage, "protocol": protocol})
        try:
            if protocol == "rank" and "reward_hr@1" in json.loads(metrics_path.read_text(encoding="utf-8")):
                rows.append({"stage": stage, "protocol": "rank-reward"})
        except ValueError:
            continue
    rows += [{"stage": path.parent.name, "protocol": "rank"} for path in sorted(folder.glob("baselines/*/metrics.json"))
             if any(path.parent.glob("predictions.jsonl*"))]
    return rows


def load_run(folder: str | Path) -> Run:
    """A pipeline output folder's results, per-record predictions, training logs and configs; from a pipeline that has
    not finished (no results.json yet), the evaluations it has finished (`finished_evaluations`)."""
    folder = Path(folder)
    summary = folder / "results.json"
    if summary.is_file():
        try:
            rows = json.loads(summary.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{summary}: not JSON. Rerun the pipeline to write it again.") from None
    else:
        rows = finished_evaluations(folder)
        if not rows:
            raise UserError(f"{folder}: no results.json and no finished evaluation; give the output folder of an sdpo pipeline run.")
        print(f"[report] {folder.name}: no results.json (its pipeline has not finished): the {len(rows)} evaluations finished so far")
    run = Run(folder.name, folder, [])
    for row in rows:
        stage, protocol = row["stage"], row["protocol"]
        if protocol == "rank-reward":
            predictions = _read_predictions(folder / "eval" / f"{stage}-rank")
            run.results.append(rank_result(stage, protocol, predictions, "reward_rank"))
        elif protocol == "rank":
            is_baseline = (folder / "baselines" / stage).is_dir() and not (folder / "eval" / f"{stage}-rank").is_dir()
            predictions = _read_predictions(folder / ("baselines" if is_baseline else "eval") / (stage if is_baseline else f"{stage}-rank"))
            if is_baseline:
                run.baselines.append(stage)
            run.results.append(rank_result(stage, protocol, predictions, "logp_rank" if "logp_rank" in predictions[0] else "rank"))
        elif protocol == "generate":
            predictions = _read_predictions(folder / "eval" / f"{stage}-generate")
            run.results.append(generate_result(stage, predictions))
        stage_dir = folder / stage
        if (stage_dir / "sdpo_config.yaml").is_file() and stage not in run.configs:
            run.configs[stage] = yaml.safe_load((stage_dir / "sdpo_config.yaml").read_text(encoding="utf-8")) or {}
            from sdpo.training.logs import read_log

            run.logs[stage] = read_log(stage_dir)
    run.data = run_data(folder)
    users = _split_users(*run.data) if run.data is not None else None
    evaluated = evaluated_ids(run)
    if users is not None and None not in users.values() and evaluated <= users.keys():
        run.users = shared_users(users, evaluated)
    for stage, config in run.configs.items():
        if config.get("sft"):
            run.starts[stage] = Path(config["sft"]).name
        else:
            run.starts[stage] = "zero-shot"
    return run


def users_from_data(run: Run, data: str | Path) -> None:
    """Give a run folder whose own prepared data is not here (a study's ``data/`` is rebuilt, not committed) its records'
    users from `data`, where `data` is the folder it evaluated: its fingerprint is the one the run's evaluations
    recorded (runs older than the fingerprint recorded none: then only that every evaluated record is in it can be
    checked, and record ids such as ``test-0`` are alike across datasets). Otherwise a note says why not."""
    infos = [info for info in _recorded_evaluations(run.folder) if info.get("split")]
    if not infos:
        return
    fingerprints: dict[Path, str] = {}
    recorded = any(_is_recorded_data(Path(data), info["split"], info, fingerprints) for info in infos)
    users = _split_users(Path(data), infos[0]["split"]) if recorded else {}
    evaluated = evaluated_ids(run)
    if not users or not evaluated <= users.keys():
        print(f"[report] {run.name}: --data {data} is not the prepared data it evaluated (no {infos[0]['split']} split there, "
              "another data fingerprint, or records it lacks); its intervals are over records only.")
    elif None not in users.values():
        run.users = shared_users(users, evaluated)


def evaluated_ids(run: Run) -> set[str]:
    return {i for result in run.results for i in result.values}


def shared_users(users: dict[str, str | None], evaluated: set[str]) -> dict[str, str] | None:
    """The evaluated records' users where every one is known and some user has several records, else None."""
    if any(users[i] is None for i in evaluated) or len({users[i] for i in evaluated}) == len(evaluated):
        return None
    return {i: users[i] for i in sorted(evaluated)}
