"""`sdpo report`: read pipeline run folders, write tables with intervals, paired comparisons, plots.

For every pipeline output folder given (``sdpo pipeline`` writes ``results.json``, its stages'
``eval/<stage>-<protocol>/predictions.jsonl``, ``baselines/<name>/predictions.jsonl`` and each
training stage's ``log.jsonl`` and ``sdpo_config.yaml``), the report holds:

- a table of every (stage, protocol) with every metric and its 95% bootstrap interval,
  recomputed from the per-record predictions;
- paired comparisons on the same records: each trained stage against the stage it started
  from, each S-DPO stage against each DPO stage and against the fewest-negatives S-DPO stage,
  and the most-negatives S-DPO stage against each classic baseline: the HR@1 difference, its
  paired bootstrap interval and the share of resamples in which it is at most 0 (a reward
  ranking is compared with the other stage's log-prob ranking, or the baseline's ranking);
- where the records share users (test records are windows over a few users' histories), a
  second interval beside each, from resampling users with all their records (`sdpo.stats`): the
  record bootstrap treats one user's records as independent and is too narrow there;
- ``<run>-records.csv.gz``: gzip-compressed CSV (a full study's rows exceed a megabyte as plain
  text), one row per (record id, stage, protocol) with the target's ``rank`` (rank protocols)
  or ``hit``/``valid`` (generate), and the record's ``user`` where users repeat: the input of
  every number in the tables;
- plots (PNG): training curves (loss, rewards, reward accuracy, chosen log-prob against step),
  validation HR@1 against step where it was logged, HR@1 per stage with intervals, HR@1 against K.

A records CSV can stand in for its run folder (`load_records_table`): with the pipeline config
that produced it, every table, interval and paired comparison comes out the same.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdpo.errors import UserError
from sdpo.io import replace_atomic, write_text_atomic
from sdpo.metrics import per_record_ranking
from sdpo.stats import bootstrap_ci, bootstrap_cis, paired_difference

CURVES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen")
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

    def groups(self, ids: list[str]) -> list[str] | None:
        """The users of records `ids` for a per-user bootstrap, or None where the records' users are unknown or all distinct."""
        return None if self.users is None else [self.users[i] for i in ids]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"{path}: missing. Rerun the pipeline (it reuses what is finished) to write it.")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError:
        raise UserError(f"{path}: not JSON lines. Rerun the pipeline stage that wrote it.") from None


def _rank_result(stage: str, protocol: str, rows: list[dict[str, Any]], key: str) -> Result:
    ranks = [int(row[key]) for row in rows]
    per_metric = per_record_ranking(ranks)
    values = {row["id"]: {m: per_metric[m][i] for m in RANK_METRICS} for i, row in enumerate(rows)}
    records = [{"id": row["id"], "protocol": protocol, "rank": rank, "hit": int(rank == 1), "valid": 1}
               for row, rank in zip(rows, ranks, strict=True)]
    return Result(stage, protocol, values, records)


def _generate_result(stage: str, rows: list[dict[str, Any]]) -> Result:
    """The paper's matcher (protocol generate) and the longest-match one (rows generate-strict in the CSV)."""
    values = {row["id"]: {"hr@1": float(row["hit"]), "valid_ratio": float(row["valid"]),
                          "strict_hr@1": float(row["strict_hit"]), "strict_valid_ratio": float(row["strict_valid"])} for row in rows}
    records = [{"id": row["id"], "protocol": "generate", "rank": "", "hit": int(row["hit"]), "valid": int(row["valid"])} for row in rows]
    records += [{"id": row["id"], "protocol": "generate-strict", "rank": "", "hit": int(row["strict_hit"]), "valid": int(row["strict_valid"])}
                for row in rows]
    return Result(stage, "generate", values, records)


def _record_users(folder: Path) -> dict[str, str] | None:
    """Record id -> user over the split the run evaluated, if every record of it names a user.

    The split is the one an evaluation's (or a baseline's) metrics.json names, read from the data
    folder it names or from the run's own ``data``; None when neither is here.
    """
    from sdpo.datasets import load_split

    for metrics_path in sorted(folder.glob("eval/*/metrics.json")) + sorted(folder.glob("baselines/*/metrics.json")):
        try:
            info = json.loads(metrics_path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        split = info.get("split")
        for data in (info.get("data"), folder / "data"):
            if split and data and (Path(data) / f"{split}.jsonl").is_file():
                users = {r.id: r.user for r in load_split(data, split)}
                return None if None in users.values() else users
    return None


def load_run(folder: str | Path) -> Run:
    """A pipeline output folder's results, per-record predictions, training logs and configs."""
    folder = Path(folder)
    summary = folder / "results.json"
    if not summary.is_file():
        raise UserError(f"{folder}: no results.json; give the output folder of a finished sdpo pipeline run.")
    try:
        rows = json.loads(summary.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{summary}: not JSON. Rerun the pipeline to write it again.") from None
    run = Run(folder.name, folder, [])
    for row in rows:
        stage, protocol = row["stage"], row["protocol"]
        if protocol == "rank-reward":
            predictions = _read_jsonl(folder / "eval" / f"{stage}-rank" / "predictions.jsonl")
            run.results.append(_rank_result(stage, protocol, predictions, "reward_rank"))
        elif protocol == "rank":
            is_baseline = (folder / "baselines" / stage).is_dir() and not (folder / "eval" / f"{stage}-rank").is_dir()
            path = folder / ("baselines" if is_baseline else "eval") / (stage if is_baseline else f"{stage}-rank") / "predictions.jsonl"
            predictions = _read_jsonl(path)
            if is_baseline:
                run.baselines.append(stage)
            run.results.append(_rank_result(stage, protocol, predictions, "logp_rank" if "logp_rank" in predictions[0] else "rank"))
        elif protocol == "generate":
            predictions = _read_jsonl(folder / "eval" / f"{stage}-generate" / "predictions.jsonl")
            run.results.append(_generate_result(stage, predictions))
        stage_dir = folder / stage
        if (stage_dir / "sdpo_config.yaml").is_file() and stage not in run.configs:
            run.configs[stage] = yaml.safe_load((stage_dir / "sdpo_config.yaml").read_text(encoding="utf-8")) or {}
            from sdpo.training.logs import read_log

            run.logs[stage] = read_log(stage_dir)
    users = _record_users(folder)
    evaluated = _evaluated_ids(run)
    if users is not None and evaluated <= users.keys():
        run.users = _shared_users(users, evaluated)
    for stage, config in run.configs.items():
        if config.get("sft"):
            run.starts[stage] = Path(config["sft"]).name
        else:
            run.starts[stage] = "zero-shot"
    return run


def _evaluated_ids(run: Run) -> set[str]:
    return {i for result in run.results for i in result.values}


def _shared_users(users: dict[str, str | None], evaluated: set[str]) -> dict[str, str] | None:
    """The evaluated records' users where every one is known and some user has several records, else None."""
    if any(users[i] is None for i in evaluated) or len({users[i] for i in evaluated}) == len(evaluated):
        return None
    return {i: users[i] for i in sorted(evaluated)}


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
                results.append(_rank_result(stage, protocol, group, "rank"))
            elif protocol == "generate":
                strict = {row["id"]: row for row in grouped.get((stage, "generate-strict"), [])}
                if set(strict) != {row["id"] for row in group}:
                    raise UserError(f"{path}: stage {stage!r} has generate rows without the same records' generate-strict rows.")
                results.append(_generate_result(stage, [{**row, "strict_hit": strict[row["id"]]["hit"], "strict_valid": strict[row["id"]]["valid"]}
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
    from sdpo.datasets import load_split

    path = Path(path)
    rows = _read_records_csv(path)
    name = path.name.removesuffix(".gz").removesuffix(".csv").removesuffix("-records")
    run = Run(name, path.parent, _results_from_table(path, rows), table=path)
    pipeline = read_yaml(config) if config is not None else {}
    if config is not None:
        from sdpo.pipeline import _training_stages

        sft_stages, align_stages = _training_stages(pipeline, Path(config))
        evaluated_stages = {r.stage for r in run.results}
        for stage, options, start in [(stage, options, "zero-shot") for stage, options in sft_stages] + align_stages:
            if stage in evaluated_stages:
                run.configs[stage], run.starts[stage] = options, start
        run.baselines = [r.stage for r in run.results if r.protocol == "rank" and r.stage not in (*run.configs, "zero-shot")]
    users = {row["id"]: row["user"] for row in rows} if rows[0].get("user") else None
    if users is None and data is not None:
        users = {r.id: r.user for r in load_split(data, (pipeline.get("evaluate") or {}).get("split", "test"))}
    if users is not None:
        evaluated = _evaluated_ids(run)
        unknown = evaluated - users.keys()
        if unknown:
            raise UserError(f"{path}: {len(unknown)} record(s) have no user in {data or path} (e.g. {sorted(unknown)[0]}); "
                            "give the prepared dataset folder the run evaluated.")
        run.users = _shared_users(users, evaluated)
    return run


def _common_ids(*results: Result) -> list[str]:
    ids = [i for i in results[0].values if all(i in r.values for r in results[1:])]
    return ids


def summary_table(run: Run) -> str:
    """Markdown: every (stage, protocol) with every metric and its 95% interval."""
    per_user = run.users is not None
    lines = [f"### {run.name}: every stage", "", "| stage | protocol | n | metric | value | 95% CI |" + (" per-user 95% CI |" if per_user else ""),
             "|---|---|---|---|---|---|" + ("---|" if per_user else "")]
    for result in run.results:
        ids = list(result.values)
        columns = {m: result.column(m, ids) for m in result.metrics()}
        intervals = bootstrap_cis(columns)
        by_user = bootstrap_cis(columns, groups=run.groups(ids)) if per_user else {}
        for metric, values in columns.items():
            low, high = intervals[metric]
            line = f"| {result.stage} | {result.protocol} | {len(ids)} | {metric} | {sum(values) / len(values):.4f} | [{low:.4f}, {high:.4f}] |"
            if per_user:
                line += " [{:.4f}, {:.4f}] |".format(*by_user[metric])
            lines.append(line)
    return "\n".join(lines)


def wide_table(run: Run) -> str:
    """Markdown: one row per (stage, protocol), HR@1 with its interval and the other metrics."""
    per_user = run.users is not None
    header = "| stage | protocol | n | HR@1 [95% CI] |" + (" per-user 95% CI |" if per_user else "") + \
        " HR@5 | NDCG@5 | NDCG@10 | MRR | ValidRatio | strict HR@1 |"
    lines = [f"### {run.name}", "", header, "|" + "---|" * (11 if per_user else 10)]
    for result in run.results:
        ids = list(result.values)
        columns = {m: result.column(m, ids) for m in result.metrics()}
        low, high = bootstrap_cis({"hr@1": columns["hr@1"]})["hr@1"]
        user_cell = " [{:.3f}, {:.3f}] |".format(*bootstrap_ci(columns["hr@1"], groups=run.groups(ids))) if per_user else ""
        cell = {m: f"{sum(columns[m]) / len(ids):.4f}" if m in columns else "–" for m in (*RANK_METRICS, *GENERATE_METRICS)}
        lines.append(f"| {result.stage} | {result.protocol} | {len(ids)} | {cell['hr@1']} [{low:.3f}, {high:.3f}] |{user_cell} {cell['hr@5']} | "
                     f"{cell['ndcg@5']} | {cell['ndcg@10']} | {cell['mrr']} | {cell['valid_ratio']} | {cell['strict_hr@1']} |")
    return "\n".join(lines)


def comparisons(run: Run) -> list[dict[str, Any]]:
    """Paired HR@1 differences: each trained stage against its starting stage, each S-DPO stage against each DPO stage
    and against the S-DPO stage with the fewest negatives, and the one with the most negatives against each baseline.

    Per protocol: rank against rank (log-probs), generate against generate, and a stage's
    reward ranking against the other stage's log-prob ranking (what that model ranks by itself;
    a baseline's own ranking).
    """
    by_key = {(r.stage, r.protocol): r for r in run.results}
    losses = {stage: config.get("loss") for stage, config in run.configs.items()}
    pairs = [(stage, start) for stage, start in run.starts.items()]
    dpo = [s for s, loss in losses.items() if loss == "dpo"]
    sdpo = sorted((s for s, loss in losses.items() if loss == "sdpo"), key=lambda s: run.configs[s].get("negatives") or 0)
    pairs += [(s, d) for s in sdpo for d in dpo]
    pairs += [(s, sdpo[0]) for s in sdpo[1:]]  # do more negatives help?
    pairs += [(sdpo[-1], b) for b in run.baselines] if sdpo else []  # how far from the classic recommenders?
    rows = []
    for a, b in pairs:
        for protocol in PROTOCOL_ORDER:
            if (a, protocol) not in by_key:
                continue
            # a reward ranking is compared with what the starting model ranks by itself: its log-probs
            reference = by_key.get((b, "rank" if protocol == "rank-reward" else protocol))
            if reference is None:
                continue
            ids = _common_ids(by_key[(a, protocol)], reference)
            columns = by_key[(a, protocol)].column("hr@1", ids), reference.column("hr@1", ids)
            row = {"a": a, "b": b, "protocol": protocol, "b_protocol": reference.protocol, "n": len(ids), **paired_difference(*columns)}
            if run.users is not None:
                by_user = paired_difference(*columns, groups=run.groups(ids))
                row.update(user_interval=by_user["interval"], user_p_le_0=by_user["p_le_0"])
            rows.append(row)
    return rows


def comparison_table(run: Run, rows: list[dict[str, Any]]) -> str:
    per_user = run.users is not None
    lines = [f"### {run.name}: paired HR@1 differences (same records)", "",
             "| A | B | protocol | n | HR@1(A) - HR@1(B) | 95% CI | share of resamples <= 0 |"
             + (" per-user 95% CI | per-user share <= 0 |" if per_user else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if per_user else "")]
    for row in rows:
        protocol = row["protocol"] if row["protocol"] == row["b_protocol"] else f"{row['protocol']} vs {row['b_protocol']}"
        low, high = row["interval"]
        line = f"| {row['a']} | {row['b']} | {protocol} | {row['n']} | {row['difference']:+.4f} | [{low:+.4f}, {high:+.4f}] | {row['p_le_0']:.3f} |"
        if per_user:
            line += " [{:+.4f}, {:+.4f}] |".format(*row["user_interval"]) + f" {row['user_p_le_0']:.3f} |"
        lines.append(line)
    return "\n".join(lines)


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


def _figure(rows: int = 1, cols: int = 1, size=(6.4, 4.2)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return plt, fig, axes


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_training_curves(run: Run, path: Path) -> bool:
    """Train-log curves of every trained stage against step; False if no stage logged any."""
    stages = {s: [e for e in log if "loss" in e] for s, log in run.logs.items()}
    stages = {s: entries for s, entries in stages.items() if entries}
    if not stages:
        return False
    plt, fig, axes = _figure(2, 3, (13, 7))
    colors = {stage: f"C{i % 10}" for i, stage in enumerate(stages)}  # one colour per stage in every panel
    for ax, key in zip(axes.flat, CURVES, strict=True):
        for stage, entries in stages.items():
            points = [(e["step"], e[key]) for e in entries if key in e]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=stage, color=colors[stage])
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key.split("/")[-1])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{run.name}: training curves")
    _save(plt, fig, path)
    return True


def plot_val_hr(run: Run, path: Path) -> bool:
    """Validation HR@1 against step for the stages that logged it; False if none did."""
    stages = {s: [(e["step"], e["eval_hr@1"]) for e in log if "eval_hr@1" in e] for s, log in run.logs.items()}
    stages = {s: p for s, p in stages.items() if p}
    if not stages:
        return False
    plt, fig, axes = _figure()
    ax = axes[0, 0]
    for stage, points in stages.items():
        ax.plot(*zip(*points, strict=True), marker="o", label=stage)
    ax.set(title=f"{run.name}: validation HR@1 during training", xlabel="optimizer step", ylabel="val HR@1")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(plt, fig, path)
    return True


def _hr_with_interval(run: Run, result: Result) -> tuple[float, float, float]:
    """HR@1 and its 95% interval: per user where the records share users, else per record."""
    ids = list(result.values)
    values = result.column("hr@1", ids)
    low, high = bootstrap_ci(values, groups=run.groups(ids))
    return sum(values) / len(values), low, high


def _interval_kind(run: Run) -> str:
    return "95% intervals, resampling users" if run.users is not None else "95% bootstrap intervals"


def plot_stage_hr(run: Run, path: Path) -> None:
    """HR@1 of every stage with its 95% interval, one bar group per protocol."""
    import numpy as np

    stages = list(dict.fromkeys(r.stage for r in run.results))
    protocols = [p for p in PROTOCOL_ORDER if any(r.protocol == p for r in run.results)]
    by_key = {(r.stage, r.protocol): r for r in run.results}
    plt, fig, axes = _figure(size=(max(6.4, 1.1 * len(stages) + 2), 4.4))
    ax = axes[0, 0]
    width = 0.8 / len(protocols)
    for k, protocol in enumerate(protocols):
        xs, hrs, errors = [], [], [[], []]
        for i, stage in enumerate(stages):
            if (stage, protocol) in by_key:
                hr, low, high = _hr_with_interval(run, by_key[(stage, protocol)])
                xs.append(i + (k - (len(protocols) - 1) / 2) * width)
                hrs.append(hr)
                errors[0].append(hr - low)
                errors[1].append(high - hr)
        ax.bar(xs, hrs, width, yerr=np.array(errors), capsize=3, label=protocol)
    ax.set_xticks(range(len(stages)), stages, rotation=20)
    ax.set(title=f"{run.name}: HR@1 per stage ({_interval_kind(run)})", xlabel="stage", ylabel="HR@1")
    ax.axhline(0.05, color="grey", linestyle=":", linewidth=1, label="chance (1 of 20)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_hr_vs_k(run: Run, path: Path) -> bool:
    """HR@1 against K (negatives per record) for the preference stages; False if fewer than two K."""
    stages = {s: c.get("negatives") for s, c in run.configs.items() if c.get("loss") in ("sdpo", "dpo")}
    if len(set(stages.values())) < 2:
        return False
    by_key = {(r.stage, r.protocol): r for r in run.results}
    plt, fig, axes = _figure()
    ax = axes[0, 0]
    for protocol in PROTOCOL_ORDER:
        points = sorted((k, _hr_with_interval(run, by_key[(s, protocol)])) for s, k in stages.items() if (s, protocol) in by_key)
        if not points:
            continue
        ks = [k for k, _ in points]
        hrs = [v[0] for _, v in points]
        errors = [[v[0] - v[1] for _, v in points], [v[2] - v[0] for _, v in points]]
        ax.errorbar(ks, hrs, yerr=errors, marker="o", capsize=3, label=protocol)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(stages.values())), [str(k) for k in sorted(set(stages.values()))])
    ax.set(title=f"{run.name}: HR@1 against the number of negatives K" + (f"\n({_interval_kind(run)})" if run.users is not None else ""),
           xlabel="K (K=1: DPO)", ylabel="HR@1")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(plt, fig, path)
    return True


def write_report(run_dirs: list[str | Path], out: str | Path, config: str | Path | None = None,
                 data: str | Path | None = None) -> list[Path]:
    """Write results.md, one CSV per run and the plots into `out`; returns the files written.

    Each of `run_dirs` is a pipeline output folder or a records CSV (`load_records_table`, which
    reads `config` and `data`).
    """
    if not run_dirs:
        raise UserError("report: give at least one pipeline output folder.")
    # every input is checked before anything is written
    runs = [load_records_table(source, config, data) if is_records_table(source) else load_run(source) for source in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise UserError(f"report: run folders must have distinct names, got {names}.")
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
        sections += [wide_table(run), ""] + ([comparison_table(run, rows), ""] if rows else [])
        plots = [(out / f"{run.name}-hr1.png", lambda p, r=run: plot_stage_hr(r, p) or True),
                 (out / f"{run.name}-training.png", lambda p, r=run: plot_training_curves(r, p)),
                 (out / f"{run.name}-val-hr1.png", lambda p, r=run: plot_val_hr(r, p)),
                 (out / f"{run.name}-hr1-vs-k.png", lambda p, r=run: plot_hr_vs_k(r, p))]
        for path, draw in plots:
            if draw(path):
                written.append(path)
                sections.append(f"![{path.stem}]({path.name})")
        sections += ["", summary_table(run), ""]
    results = out / "results.md"
    write_text_atomic(results, "\n".join(sections) + "\n")
    return [results, *written]
