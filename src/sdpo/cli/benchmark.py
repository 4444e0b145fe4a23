"""`sdpo benchmark step|precision|trunk|generate|baseline`: speed and memory, side by side in one run."""

from __future__ import annotations

from pathlib import Path

import typer

from sdpo.cli.app import bench_app
from sdpo.errors import UserError


def _show(table: str, json_out: Path) -> None:
    """Every benchmark ends the same way: its table, and where the result file went."""
    typer.echo(table)
    typer.echo(f"wrote {json_out}")


def _parse_ks(negatives: str) -> list[int]:
    try:
        return [int(k) for k in negatives.split(",")]
    except ValueError:
        raise UserError(f"--negatives must be comma-separated integers, got {negatives!r}.") from None


@bench_app.command("step")
def benchmark_step_cmd(
    model: str = typer.Option("tiny", help="alias, local HF folder or cached hub id"),
    negatives: str = typer.Option("1,3,7,15", help="comma-separated K values"),
    records: int = typer.Option(4, help="records in the step's batch"),
    data: Path = typer.Option(..., help="prepared dataset folder whose test records are used"),
    json_out: Path = typer.Option(..., "--json", help="result file to write"),
    repeats: int = typer.Option(3, help="timed repeats after one warm-up (the median is reported)"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    bf16: bool | None = typer.Option(None, "--bf16/--no_bf16", help="bf16 weights and matmuls (default: on where the hardware computes bf16 natively)"),
    attn_implementation: str = typer.Option("sdpa", "--attn_implementation", "--attn-implementation",
                                            help="sdpa, eager or flex_attention (the packed step's block mask as a FlexAttention BlockMask)"),
) -> None:
    """Time one S-DPO step (forward + backward + reference) the published way and the shared-prompt way."""
    from sdpo.benchmarks.step import benchmark_step, format_table, save_results
    from sdpo.data.datasets import load_split, read_manifest
    from sdpo.lm.precision import resolve_bf16

    ks = _parse_ks(negatives)
    if records < 1 or repeats < 1:
        raise UserError("--records and --repeats must be at least 1.")
    chosen = load_split(data, "test", limit=records)
    if any(not 1 <= k < len(r.candidates) for k in ks for r in chosen):
        raise UserError("--negatives: every K must be between 1 and the number of negatives per record (19).")
    bf16 = resolve_bf16(bf16, device)
    if attn_implementation not in ("sdpa", "eager", "flex_attention"):
        raise UserError(f"--attn_implementation {attn_implementation!r}: choose sdpa, eager or flex_attention.")
    results = benchmark_step(model, chosen, read_manifest(data).get("domain", "music"), ks, repeats, device, bf16, attn_implementation)
    save_results(json_out, model, device, results, repeats, bf16)
    _show(format_table(results), json_out)


@bench_app.command("collaborative")
def benchmark_collaborative_cmd(
    collaborative: Path = typer.Option(..., help="a trained sdpo baseline (sasrec, gru4rec, caser): the collaborative model"),
    data: Path = typer.Option(..., help="prepared dataset folder whose train records are used"),
    json_out: Path = typer.Option(..., "--json", help="result file to write"),
    model: str = typer.Option("smollm2-135m", help="alias, local HF folder or cached hub id"),
    negatives: str = typer.Option("19", help="comma-separated K values for the S-DPO steps (an SFT step is always timed)"),
    records: int = typer.Option(4, help="records per step"),
    repeats: int = typer.Option(5, help="timed repeats per way after one warm-up, the two ways alternating (medians reported)"),
    lora_layers: int | None = typer.Option(None, "--lora_layers", "--lora-layers", help="LoRA on the last N layers (default: all)"),
    bf16: bool | None = typer.Option(None, "--bf16/--no_bf16", help="bf16 weights and matmuls (default: on where the hardware computes bf16 natively)"),
) -> None:
    """Time a training step on text prompts and on collaborative prompts (soft tokens), side by side."""
    from sdpo.benchmarks.collaborative import benchmark_collaborative, format_table
    from sdpo.data.datasets import load_split, read_manifest
    from sdpo.io import write_json
    from sdpo.lm.precision import cpu_name, resolve_bf16

    ks = _parse_ks(negatives)
    if records < 1 or repeats < 1:
        raise UserError("--records and --repeats must be at least 1.")
    chosen = load_split(data, "train", limit=records)
    bf16 = resolve_bf16(bf16)
    results = benchmark_collaborative(model, chosen, read_manifest(data).get("domain", "music"), str(collaborative), ks, repeats, bf16,
                                      lora_layers)
    import torch

    write_json(json_out, {"model": model, "collaborative": str(collaborative), "precision": "bf16" if bf16 else "fp32", "cpu": cpu_name(),
                          "repeats": repeats, "torch_threads": torch.get_num_threads(), "results": results})
    _show(format_table(results), json_out)


@bench_app.command("unknown")
def benchmark_unknown_cmd(
    run: Path = typer.Option(..., help="a collaborative run folder (sdpo sft or align with --collaborative DIR)"),
    data: Path = typer.Option(..., help="prepared dataset folder"),
    json_out: Path = typer.Option(..., "--json", help="result file to write"),
    split: str = typer.Option("val", help="the split whose records are ranked"),
    limit: int = typer.Option(500, help="records drawn at random with --seed"),
    share: float = typer.Option(0.2, help="share of each history's titles replaced by made-up titles no catalogue holds"),
    seed: int = typer.Option(0, help="seed of the record draw and of the replaced titles"),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="records per forward pass"),
    ways: str = typer.Option("learned,zeros", help="learned, zeros, or both (comma-separated): the unknown vectors ranked with"),
) -> None:
    """Rank records with unseen history titles twice: the run's learned unknown vector against zeros, paired."""
    from sdpo.benchmarks.unknown_titles import WAYS, benchmark_unknown_titles, format_table
    from sdpo.io import write_json

    chosen = tuple(way.strip() for way in ways.split(","))
    if limit < 1 or batch_size < 1 or not 0 <= share <= 1 or not chosen or not set(chosen) <= set(WAYS):
        raise UserError("--limit and --batch_size must be at least 1, --share between 0 and 1, --ways learned, zeros or both.")
    result = benchmark_unknown_titles(run, data, split, limit, share, seed, batch_size, chosen)
    write_json(json_out, result)
    _show(format_table(result), json_out)


@bench_app.command("precision")
def benchmark_precision_cmd(
    data: Path = typer.Option(..., help="prepared dataset folder (train records for the steps, test records for ranking)"),
    json_out: Path = typer.Option(..., "--json", help="result file to write"),
    model: str = typer.Option("smollm2-135m", help="alias, local HF folder or cached hub id"),
    records: int = typer.Option(4, help="records per training step"),
    negatives: str = typer.Option("3,15", help="comma-separated K values for the S-DPO steps"),
    repeats: int = typer.Option(3, help="timed repeats per step after one warm-up, the precisions alternating (medians reported)"),
    rank_records: int = typer.Option(200, "--rank_records", "--rank-records",
                                     help="test records ranked in each precision (speed, log-prob gap and top-1 agreement)"),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="records per forward pass when ranking"),
    sft: bool = typer.Option(True, "--sft/--no_sft", help="time an SFT step besides the S-DPO steps"),
    exact_records: int = typer.Option(2, "--exact_records", "--exact-records",
                                      help="test records whose target and K random negatives (each K of --negatives) are scored packed "
                                           "and one sequence per answer in each precision, as `sdpo benchmark step` does; 0 skips it"),
) -> None:
    """fp32 against bf16 (fp32 LM head) against bf16_all (bf16 head, as before), side by side: records/s of SFT and S-DPO steps and of
    ranking, log-prob gaps and top-1 agreement against fp32, packed against one sequence per answer."""
    from sdpo.benchmarks.precision import benchmark_precision, format_table
    from sdpo.data.datasets import load_split

    ks = _parse_ks(negatives)
    if min(records, repeats, rank_records, batch_size) < 1:
        raise UserError("--records, --repeats, --rank_records and --batch_size must be at least 1.")
    if exact_records < 0:
        raise UserError("--exact_records must be 0 (skip) or more.")
    if exact_records and any(not 1 <= k < len(r.candidates) for k in ks for r in load_split(data, "test", limit=exact_records)):
        raise UserError("--negatives: with --exact_records, every K must be between 1 and the number of negatives per record (19).")
    result = benchmark_precision(model, data, ks, records, repeats, rank_records, batch_size, json_out, exact_records, sft)
    _show(format_table(result), json_out)


@bench_app.command("trunk")
def benchmark_trunk_cmd(
    data: Path = typer.Option(..., help="prepared dataset folder whose test records are ranked"),
    json_out: Path = typer.Option(..., "--json", help="result file to write"),
    model: str = typer.Option("smollm2-135m", help="alias, local HF folder or cached hub id"),
    protocol: str = typer.Option("rank", help="rank (score the candidates), generate (greedy answers) or train (S-DPO steps of an align run)"),
    negatives: int = typer.Option(19, help="train: K, negatives per record in each step"),
    bf16: bool | None = typer.Option(None, "--bf16/--no_bf16", help="train: bf16 weights and matmuls (default: on where the hardware "
                                     "computes bf16 natively); the exactness of the shared trunk is to fp32's 1e-5 in fp32"),
    lora_layers: int = typer.Option(8, "--lora_layers", "--lora-layers", help="the adapter's layers: the last N (the trunk is the rest)"),
    records: int = typer.Option(32, help="test records ranked (answered) in each way; train: train records per step"),
    repeats: int = typer.Option(3, help="timed repeats of each way, alternating which goes first (medians reported)"),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="records per forward pass"),
) -> None:
    """Ranking, generating or training with the shared trunk against the full computation: time, speedup, exactness, size."""
    from sdpo.benchmarks.trunk import benchmark_trunk, format_table

    if min(records, repeats, batch_size, lora_layers) < 1:
        raise UserError("--records, --repeats, --batch_size and --lora_layers must be at least 1.")
    if protocol == "train":
        from sdpo.benchmarks import train_trunk

        result = train_trunk.benchmark_train_trunk(model, data, lora_layers, records, negatives, repeats, json_out, bf16)
        _show(train_trunk.format_table(result), json_out)
        return
    result = benchmark_trunk(model, data, lora_layers, records, repeats, batch_size, json_out, protocol=protocol)
    _show(format_table(result), json_out)


@bench_app.command("inject")
def benchmark_inject_cmd(
    collaborative: Path = typer.Option(..., help="a trained sdpo baseline (sasrec, gru4rec, caser): the collaborative model"),
    data: Path = typer.Option(..., help="prepared dataset folder: train records step, test records are ranked"),
    json_out: Path = typer.Option(..., "--json", help="result file to write"),
    model: str = typer.Option("smollm2-135m", help="alias, local HF folder or cached hub id"),
    lora_layers: int = typer.Option(8, "--lora_layers", "--lora-layers", help="LoRA on the last N layers; late injection enters the first of them"),
    negatives: int = typer.Option(19, help="K, negatives per record in each S-DPO step"),
    records: int = typer.Option(4, help="train records per step"),
    repeats: int = typer.Option(3, help="timed steps of each way, the order rotating (medians reported)"),
    rank_records: int = typer.Option(24, "--rank_records", "--rank-records", help="test records ranked in each way"),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="records per ranking pass"),
    bf16: bool | None = typer.Option(None, "--bf16/--no_bf16", help="bf16 weights and matmuls (default: on where the hardware computes bf16 natively)"),
) -> None:
    """Collaborative tokens entering at the input against late injection (with and without the shared trunk): S-DPO step and ranking."""
    from sdpo.benchmarks.injection import benchmark_injection, format_table

    if min(records, repeats, rank_records, batch_size, negatives) < 1:
        raise UserError("--records, --repeats, --rank_records, --batch_size and --negatives must be at least 1.")
    result = benchmark_injection(model, data, collaborative, lora_layers, records, negatives, repeats, rank_records, batch_size, json_out, bf16)
    _show(format_table(result), json_out)


@bench_app.command("generate")
def benchmark_generate_cmd(
    adapter: Path = typer.Option(..., help="a text sdpo sft or align run folder (adapters/lastfm-sft-smollm2-135m, say)"),
    data: Path = typer.Option(..., help="prepared dataset folder"),
    json_out: Path = typer.Option(..., "--json", help="result file to write"),
    model: str = typer.Option("smollm2-135m", help="alias, local HF folder or cached hub id"),
    split: str = typer.Option("test", help="the split whose records answer"),
    records: int = typer.Option(48, help="records drawn at random with --seed"),
    seed: int = typer.Option(0, help="seed of the record draw"),
    repeats: int = typer.Option(2, help="timed repeats of each way, the order rotating (medians reported)"),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="records per generate call"),
) -> None:
    """Greedy generation today against batching by prompt length, stopping after the longest title, merged LoRA, and all three."""
    from sdpo.benchmarks.generation import benchmark_generation, format_table

    if min(records, repeats, batch_size) < 1:
        raise UserError("--records, --repeats and --batch_size must be at least 1.")
    result = benchmark_generation(model, adapter, data, records, repeats, batch_size, json_out, split, seed)
    _show(format_table(result), json_out)


@bench_app.command("baseline")
def benchmark_baseline_cmd(
    data: Path = typer.Option(..., help="prepared dataset folder whose train records are used"),
    json_out: Path = typer.Option(..., "--json", help="result file to write"),
    models: str = typer.Option("sasrec,gru4rec,caser", help="comma-separated baselines"),
    steps: int = typer.Option(20, help="timed training steps per child process (after 3 warm-up steps)"),
    repeats: int = typer.Option(3, help="child processes per setting (the median is reported)"),
) -> None:
    """Time a baseline training step with glibc's default malloc and with freed memory kept."""
    from sdpo.baselines.train import MODELS
    from sdpo.benchmarks.baseline import benchmark_baselines, format_table, save_results
    from sdpo.data.datasets import load_split

    chosen = [m.strip() for m in models.split(",")]
    unknown = [m for m in chosen if m not in MODELS or m == "popularity"]
    if unknown:
        raise UserError(f"--models: {', '.join(unknown)} cannot be timed; choose from sasrec, gru4rec, caser.")
    load_split(data, "train", limit=1)  # a clear message for a wrong folder before any child starts
    results = benchmark_baselines(chosen, str(data), steps, repeats)
    save_results(json_out, str(data), steps, repeats, results)
    _show(format_table(results), json_out)
