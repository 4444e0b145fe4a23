"""The report's PNG plots (matplotlib, Agg): training curves, val HR@1, HR@1 per stage and against K."""

from __future__ import annotations

from pathlib import Path

from sdpo.evaluation.stats import bootstrap_ci
from sdpo.io import replace_atomic
from sdpo.report.loading import PROTOCOL_ORDER, Result, Run

CURVES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
          "loss/sft")  # loss/sft: the positive's NLL per token, logged by align runs since it was added


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
    plt, fig, axes = _figure(2, 4, (17, 7))
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
