"""`sdpo sft`, `sdpo align`, `sdpo baseline` and `sdpo export`: training runs and what they leave."""

from __future__ import annotations

from pathlib import Path

import typer

from sdpo.cli.app import CONFIG_ARGUMENT, PASS_THROUGH, app, config_from


@app.command("sft", context_settings=PASS_THROUGH)
def sft(ctx: typer.Context, config: Path | None = CONFIG_ARGUMENT) -> None:
    """Supervised fine-tuning with LoRA. Options: every field of SFTConfig (sdpo sft --help)."""
    from sdpo.training.sft import SFTConfig, run_sft

    out = run_sft(config_from(ctx, config, SFTConfig, "sft"))
    typer.echo(f"sft: adapter saved in {out}")


@app.command("align", context_settings=PASS_THROUGH)
def align(ctx: typer.Context, config: Path | None = CONFIG_ARGUMENT) -> None:
    """S-DPO / DPO from an SFT run: --sft RUN_DIR --loss sdpo|dpo --negatives K --beta B (sdpo align --help)."""
    from sdpo.training.preference import AlignConfig, run_align

    out = run_align(config_from(ctx, config, AlignConfig, "align"))
    typer.echo(f"align: adapter saved in {out}")


@app.command("baseline", context_settings=PASS_THROUGH)
def baseline(ctx: typer.Context, config: Path | None = CONFIG_ARGUMENT) -> None:
    """Classic recommenders on the same records: --model sasrec|gru4rec|caser|popularity --data DIR --output_dir DIR."""
    from sdpo.baselines.train import BaselineConfig, run_baseline

    metrics = run_baseline(config_from(ctx, config, BaselineConfig, "baseline", {"--output": "--output_dir"}))
    shown = {k: round(metrics[k], 4) for k in ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr")}
    typer.echo(f"{metrics['model']} on {metrics['n_records']} {metrics['split']} records: {shown}")


@app.command("stack")
def stack(
    models: list[Path] = typer.Argument(..., help="trained sdpo baseline folders (sasrec, gru4rec, caser) of one prepared dataset"),
    output_dir: Path = typer.Option(..., "--output_dir", "--output-dir", help="the new stack folder"),
) -> None:
    """Several ID models as one collaborative model (--collaborative STACK): each title carries all their vectors and scores."""
    from sdpo.baselines.stack import make_stack

    typer.echo(f"stack: {make_stack(models, output_dir)}")


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="run folder of sdpo sft or sdpo align"),
    out: Path = typer.Option(..., "--out", help="new folder for the exported adapter"),
    reference: Path | None = typer.Option(
        None, help="for an align run: the exported folder of the SFT run it was trained against (its reward's reference)"),
    dtype: str = typer.Option("bf16", help="bf16 (half the size) or fp32 (the trained weights exactly)"),
) -> None:
    """Export a run's adapter (weights, adapter and run config, training log) as a small folder to share or commit."""
    from sdpo.lm.adapters import ADAPTER_WEIGHTS
    from sdpo.training.export import export_adapter

    folder = export_adapter(run, out, reference, dtype)
    size = (folder / ADAPTER_WEIGHTS).stat().st_size / 1e6
    typer.echo(f"exported {run} to {folder} ({dtype} weights, {size:.1f} MB)")
