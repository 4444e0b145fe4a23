"""The pipeline's results table: one row per stage and protocol, 95% intervals beside HR@1."""

from __future__ import annotations

from typing import Any

TABLE_COLUMNS = ("hr@1", "valid_ratio", "strict_hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr")


def reward_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """The rank metrics by reward, under the plain metric names, as a row of its own (protocol rank-reward)."""
    row = {k: v for k, v in metrics.items() if k not in TABLE_COLUMNS and not k.startswith("reward_") and k != "ci95"}
    row.update({k[len("reward_"):]: v for k, v in metrics.items() if k.startswith("reward_")})
    row["ci95"] = {k[len("reward_"):]: v for k, v in metrics["ci95"].items() if k.startswith("reward_")}
    row["protocol"] = "rank-reward"
    row["valid_ratio"] = 1.0
    return row


def format_metric(row: dict[str, Any], column: str) -> str:
    """A metric cell: the value, and its 95% interval for the HR@1 columns."""
    if column not in row:
        return "–"
    cell = f"{row[column]:.4f}"
    interval = row.get("ci95", {}).get(column)
    if interval is not None and column in ("hr@1", "strict_hr@1"):
        cell += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return cell


def results_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per (model, protocol), the metrics each protocol has, 95% intervals beside HR@1."""
    header = ["stage", "protocol", "n", *TABLE_COLUMNS, "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["stage"], row["protocol"], str(row["n_records"])]
        cells += [format_metric(row, c) for c in TABLE_COLUMNS]
        cells.append(f"{row.get('seconds', 0):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
