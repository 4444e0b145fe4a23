"""`sdpo evaluate`, `sdpo pipeline` and `sdpo report`: measuring models, alone or as a study."""

from __future__ import annotations

from pathlib import Path

import typer

from sdpo.cli.app import app
from sdpo.errors import UserError


@app.command("evaluate")
def evaluate_cmd(
    data: Path = typer.Option(..., help="prepared dataset folder"),
    split: str = typer.Option("test", help="train, val or test"),
    model: str | None = typer.Option(None, help="alias, local HF folder or cached hub id (default: the adapter's base model, else smollm2-135m)"),
    adapter: Path | None = typer.Option(None, help="LoRA adapter folder (output of sdpo sft or sdpo align)"),
    protocol: str = typer.Option("rank", help="generate (the paper's), rank (likelihood ranking) or rerank (the LM re-ranks a retriever's top items)"),
    score: str = typer.Option("logp", help="rank: order predictions by logp, log pi(c|x), or by reward, "
                              "log pi(c|x) - log pi_ref(c|x); both are in metrics.json"),
    reference_adapter: Path | None = typer.Option(
        None, "--reference_adapter", "--reference-adapter",
        help="rank: pi_ref for the reward, e.g. the SFT run an S-DPO adapter started from (default: the base model)"),
    limit: int | None = typer.Option(None, help="evaluate N records drawn at random with --subset_seed (default: all)"),
    subset_seed: int = typer.Option(0, "--subset_seed", "--subset-seed", help="seed of the --limit draw"),
    output_dir: Path = typer.Option(..., "--output_dir", "--output", help="folder for metrics.json and predictions.jsonl"),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="records per forward pass"),
    domain: str | None = typer.Option(None, help="prompt domain (default: the adapter's, else the manifest's)"),
    prompt_seed: int | None = typer.Option(None, "--prompt_seed", "--prompt-seed",
                                              help="seed fixing each record's prompt phrasing (default: the adapter's, else 0)"),
    bf16: bool | None = typer.Option(None, "--bf16/--no_bf16", help="bf16 weights and matmuls (default: on where the hardware computes bf16 natively)"),
    retriever: Path | None = typer.Option(None, help="rerank: a trained sdpo baseline (sasrec, gru4rec, caser) picking from its whole catalogue"),
    top: int = typer.Option(20, help="rerank: how many retrieved items the LM re-ranks"),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N (default: the GPU if there is one, else the CPU)"),
    trunk_cache: Path | None = typer.Option(
        None, "--trunk_cache", "--trunk-cache",
        help="a folder where what the layers below the adapter's compute is kept, so evaluating another adapter "
             "of the same base on the same records runs only its own layers (adapters trained with --lora_layers N)"),
) -> None:
    """Evaluate a model (optionally with a LoRA adapter) on a prepared split."""
    from sdpo.pipeline import evaluate_model

    if trunk_cache is not None and protocol == "rerank":
        raise UserError("--trunk_cache serves the rank and generate protocols, not rerank.")
    metrics = evaluate_model(data, split, model, adapter, protocol, limit, output_dir, batch_size, domain, prompt_seed,
                             subset_seed=subset_seed, bf16=bf16, score=score, reference_adapter=reference_adapter, retriever=retriever, top=top,
                             trunk_cache=trunk_cache, device=device)
    typer.echo(f"{protocol} on {metrics['n_records']} {split} records ({'bf16' if metrics['bf16'] else 'fp32'}):")
    intervals = metrics.get("ci95", {})
    for key, value in metrics.items():
        if isinstance(value, float) and key != "seconds":
            interval = intervals.get(key)
            typer.echo(f"  {key:<20} {value:.4f}" + (f"  95% CI [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""))
    typer.echo(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'predictions.jsonl'}")


@app.command("pipeline")
def pipeline_cmd(
    config: Path = typer.Argument(..., help="pipeline YAML (see configs/quickstart.yaml)"),
    output_dir: Path | None = typer.Option(None, "--output_dir", "--output-dir",
                                           help="where everything goes (default: the config's output_dir); "
                                                "e.g. studies/NAME, committed to git as it goes"),
) -> None:
    """Run the stages a pipeline config lists (data, sft, align, evaluate, baselines) and print the results table."""
    from sdpo.pipeline import run_pipeline

    run_pipeline(config, output_dir)


@app.command("report")
def report_cmd(
    runs: list[Path] = typer.Argument(..., help="pipeline output folders (results.json, eval/, stage folders), "
                                                "or per-record CSVs a report wrote (<run>-records.csv.gz)"),
    out: Path = typer.Option(..., "--out", help="folder for results.md, the per-record CSVs and the plots"),
    config: Path | None = typer.Option(None, help="for a records CSV: the pipeline config that produced it "
                                                     "(stage relations, for the paired comparisons and HR@1 against K)"),
    data: Path | None = typer.Option(None, help="for a records CSV without a user column, or a run folder without its "
                                                   "data/: the prepared dataset folder, for intervals over users (and for --slices)"),
    slices: bool = typer.Option(False, "--slices", help="HR@1 on cold and warm targets and short histories, with paired "
                                                         "differences against --versus"),
    versus: str | None = typer.Option(None, help="--slices: the stage every row is compared with (default: ensemble, else sasrec)"),
    compare: list[str] | None = typer.Option(None, help="RUN/STAGE,RUN/STAGE: also the paired HR@1 (and ValidRatio) difference A - B "
                                                         "between stages of two inputs, on the records both evaluated (repeatable)"),
) -> None:
    """Tables with 95% intervals, paired comparisons, per-record CSVs and plots from pipeline runs (or their records CSVs)."""
    from sdpo.report import write_report

    for path in write_report(runs, out, config, data, slices, versus, compare):
        typer.echo(f"wrote {path}")
