"""The report's Markdown tables: every stage with its intervals, and the paired comparisons."""

from __future__ import annotations

from typing import Any

from sdpo.errors import UserError
from sdpo.evaluation.stats import bootstrap_ci, bootstrap_cis, paired_difference
from sdpo.report.loading import GENERATE_METRICS, PROTOCOL_ORDER, RANK_METRICS, Result, Run

METRIC_NAMES = {"hr@1": "HR@1", "valid_ratio": "ValidRatio"}


def common_ids(*results: Result) -> list[str]:
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
    """Paired HR@1 differences: each trained stage against its starting stage; within each family (the align stages
    of one SFT stage), each S-DPO stage against each DPO stage and against the S-DPO stage with the fewest negatives;
    each family's S-DPO stage with the most negatives against each baseline, against its late fusion row
    (``fusion-<stage>``) and against the other families' (a later family's first, e.g. collaborative minus text).

    Per protocol: rank against rank (log-probs), generate against generate, and a stage's
    reward ranking against the other stage's log-prob ranking (what that model ranks by itself;
    a baseline's own ranking).
    """
    by_key = {(r.stage, r.protocol): r for r in run.results}
    losses = {stage: config.get("loss") for stage, config in run.configs.items()}
    pairs = [(stage, start) for stage, start in run.starts.items()]
    families: dict[str, list[str]] = {}
    for stage, start in run.starts.items():
        if losses.get(stage) in ("dpo", "sdpo"):
            families.setdefault(start, []).append(stage)
    tops = []
    for members in families.values():
        dpo = [s for s in members if losses[s] == "dpo"]
        sdpo = sorted((s for s in members if losses[s] == "sdpo"), key=lambda s: run.configs[s].get("negatives") or 0)
        pairs += [(s, d) for s in sdpo for d in dpo]
        pairs += [(s, sdpo[0]) for s in sdpo[1:]]  # do more negatives help?
        tops += sdpo[-1:]
    for top in tops:
        pairs += [(top, b) for b in run.baselines]  # how far from the classic recommenders?
        pairs += [(top, f"fusion-{top}")] if (f"fusion-{top}", "rank") in by_key else []  # above LM score + w x baseline score?
    pairs += [(tops[j], tops[i]) for i in range(len(tops)) for j in range(i + 1, len(tops))]  # one family against another
    rows = []
    for a, b in pairs:
        for protocol in PROTOCOL_ORDER:
            if (a, protocol) not in by_key:
                continue
            # a reward ranking is compared with what the starting model ranks by itself: its log-probs
            reference = by_key.get((b, "rank" if protocol == "rank-reward" else protocol))
            if reference is None:
                continue
            rows.append(paired_row(a, by_key[(a, protocol)], b, reference, run.users))
    return rows


def paired_row(a: str, mine: Result, b: str, reference: Result, users: dict[str, str] | None, metric: str = "hr@1") -> dict[str, Any]:
    """metric(A) - metric(B) (HR@1, or a generation's ValidRatio) on the records both evaluated: the difference, its
    intervals (over records; over users where every shared record's user is known) and the share of resamples at most 0."""
    ids = common_ids(mine, reference)
    columns = mine.column(metric, ids), reference.column(metric, ids)
    row = {"a": a, "b": b, "protocol": mine.protocol, "b_protocol": reference.protocol, "metric": metric, "n": len(ids),
           **paired_difference(*columns)}
    if users is not None and all(i in users for i in ids):
        by_user = paired_difference(*columns, groups=[users[i] for i in ids])
        row.update(user_interval=by_user["interval"], user_p_le_0=by_user["p_le_0"])
    return row


def comparison_table(title: str, rows: list[dict[str, Any]], per_user: bool) -> str:
    """Markdown: one row per paired difference (`comparisons`, `across_runs`), with the per-user interval where known."""
    per_user = per_user and all("user_interval" in row for row in rows)
    metrics = any(row["metric"] != "hr@1" for row in rows)  # ValidRatio rows too: the metric joins the protocol column
    lines = [f"### {title}", "",
             f"| A | B | protocol | n | {'A - B' if metrics else 'HR@1(A) - HR@1(B)'} | 95% CI | share of resamples <= 0 |"
             + (" per-user 95% CI | per-user share <= 0 |" if per_user else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if per_user else "")]
    for row in rows:
        protocol = row["protocol"] if row["protocol"] == row["b_protocol"] else f"{row['protocol']} vs {row['b_protocol']}"
        if metrics:
            protocol += f", {METRIC_NAMES[row['metric']]}"
        low, high = row["interval"]
        line = f"| {row['a']} | {row['b']} | {protocol} | {row['n']} | {row['difference']:+.4f} | [{low:+.4f}, {high:+.4f}] | {row['p_le_0']:.3f} |"
        if per_user:
            line += " [{:+.4f}, {:+.4f}] |".format(*row["user_interval"]) + f" {row['user_p_le_0']:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def across_runs(runs: list[Run], specs: list[str]) -> list[dict[str, Any]]:
    """Paired HR@1 differences between stages of two runs, e.g. a new study's S-DPO against an older study's SFT,
    and for generations the paired ValidRatio difference too (the paper reports both).

    Each spec is ``RUN/STAGE,RUN/STAGE`` (A, then B; RUN a report input's name). Per protocol A has and B has too
    (a reward ranking against B's reward ranking, else B's log-prob ranking), on the records both evaluated; with an
    interval over users where a run knows its records' users. Every spec is checked before any is computed.
    """
    by_name = {run.name: run for run in runs}

    def stage_of(side: str, spec: str) -> tuple[Run, str]:
        run_name, _, stage = side.strip().rpartition("/")
        run = by_name.get(run_name)
        if run is None or not any(r.stage == stage for r in run.results):
            known = sorted({f"{r.name}/{result.stage}" for r in runs for result in r.results})
            raise UserError(f"report --compare {spec!r}: no stage {side.strip()!r} among the inputs; give RUN/STAGE,RUN/STAGE "
                            f"from {', '.join(known)}.")
        return run, stage

    pairs = []
    for spec in specs:
        sides = spec.split(",")
        if len(sides) != 2:
            raise UserError(f"report --compare {spec!r}: give two stages as RUN/STAGE,RUN/STAGE (A, then B).")
        pairs.append((spec, stage_of(sides[0], spec), stage_of(sides[1], spec)))
    rows = []
    for spec, (run_a, a), (run_b, b) in pairs:
        mine = {r.protocol: r for r in run_a.results if r.stage == a}
        theirs = {r.protocol: r for r in run_b.results if r.stage == b}
        found = 0
        for protocol in PROTOCOL_ORDER:
            reference = theirs.get(protocol) or (theirs.get("rank") if protocol == "rank-reward" else None)
            if protocol not in mine or reference is None:
                continue
            if not common_ids(mine[protocol], reference):
                continue
            found += 1
            for metric in ("hr@1", "valid_ratio") if protocol == "generate" else ("hr@1",):
                rows.append(paired_row(f"{run_a.name}/{a}", mine[protocol], f"{run_b.name}/{b}", reference, run_a.users or run_b.users, metric))
        if not found:
            raise UserError(f"report --compare {spec!r}: the two stages share no protocol on common records; compare stages "
                            "evaluated on the same split and records.")
    return rows
