"""The ``sdpo`` command: data, sft, align, baseline, evaluate, benchmark, pipeline.

User mistakes (bad files, bad options) end with one ``error:`` line and exit status 2;
no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from sdpo.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and evaluate LM recommenders with S-DPO.")
data_app = typer.Typer(no_args_is_help=True, help="Fetch raw datasets and prepare record folders.")
app.add_typer(data_app, name="data")
bench_app = typer.Typer(no_args_is_help=True, help="Measure speed and memory.")
app.add_typer(bench_app, name="benchmark")

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@data_app.command("fetch")
def data_fetch(
    dataset: str = typer.Argument(..., help="dataset name: lastfm or movielens-100k"),
    mirror: Optional[Path] = typer.Option(None, help="copy from this local mirror folder (default: $SDPO_MIRROR)"),
    raw_dir: Optional[Path] = typer.Option(None, "--raw_dir", "--raw-dir", help="where raw files are kept (default: $SDPO_HOME/raw)"),
) -> None:
    """Download a dataset's raw files (or copy them from a mirror), checking every SHA-256."""
    from sdpo.sources.fetch import fetch

    folder = fetch(dataset, raw_dir, mirror)
    typer.echo(f"{dataset}: raw files verified in {folder}")


@data_app.command("prepare")
def data_prepare(
    dataset: str = typer.Argument(..., help="lastfm, movielens-100k, interactions (your own logs) or llara (a LLaRA folder)"),
    out: Path = typer.Option(..., help="folder to write train/val/test.jsonl and manifest.json into"),
    seed: int = typer.Option(0, help="seed for user splits and negative candidates"),
    mirror: Optional[Path] = typer.Option(None, help="local mirror folder (default: $SDPO_MIRROR)"),
    raw_dir: Optional[Path] = typer.Option(None, "--raw_dir", "--raw-dir", help="where raw files are kept (default: $SDPO_HOME/raw)"),
    overwrite: bool = typer.Option(False, help="replace an existing prepared folder"),
    interactions: Optional[Path] = typer.Option(None, help="interactions: CSV/JSONL with user, item, timestamp[, rating]"),
    items: Optional[Path] = typer.Option(None, help="interactions: CSV/JSONL with item, title"),
    domain: Optional[str] = typer.Option(None, help="interactions/llara: music, movies, books or games"),
    min_rating: Optional[float] = typer.Option(None, "--min_rating", "--min-rating", help="interactions/movielens-100k: drop ratings below this"),
    dir: Optional[Path] = typer.Option(None, "--dir", help="llara: folder with id2name.txt and the *_data.df pickles"),
    trust_pickles: bool = typer.Option(False, "--trust_pickles", "--trust-pickles", help="llara: load pickles whose SHA-256 is not on the pinned list"),
) -> None:
    """Turn a dataset into a prepared record folder (fetching raw files first where needed)."""
    from sdpo.pipeline import prepare_dataset

    manifest = prepare_dataset(
        dataset, out, seed=seed, mirror=mirror, raw_dir=raw_dir, overwrite=overwrite, interactions=interactions,
        items=items, folder=dir, domain=domain, min_rating=min_rating, trust_pickles=trust_pickles,
    )
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    typer.echo(f"{dataset}: wrote {out} ({counts})")


def _config_from(ctx: typer.Context, config: Optional[Path], cls, name: str, aliases: dict[str, str] | None = None):
    """`cls` from an optional YAML file plus the command's pass-through flags (which win)."""
    from transformers import HfArgumentParser

    from sdpo.config import build_config, read_yaml

    args = [(aliases or {}).get(a, a) for a in ctx.args]
    if config is not None and str(config).startswith("-"):  # no YAML given: the first token is a flag
        args.insert(0, (aliases or {}).get(str(config), str(config)))
        config = None
    if {"--help", "-h"} & set(args):
        HfArgumentParser(cls, prog=f"sdpo {name} [CONFIG.yaml]").print_help()
        raise typer.Exit()
    return build_config(cls, read_yaml(config) if config else {}, args, where=str(config or name), prog=f"sdpo {name}")


CONFIG_ARGUMENT = typer.Argument(None, help="YAML config; flags override it")


@app.command("sft", context_settings=PASS_THROUGH)
def sft(ctx: typer.Context, config: Optional[Path] = CONFIG_ARGUMENT) -> None:
    """Supervised fine-tuning with LoRA. Options: every field of SFTConfig (sdpo sft --help)."""
    from sdpo.training.sft import SFTConfig, run_sft

    out = run_sft(_config_from(ctx, config, SFTConfig, "sft"))
    typer.echo(f"sft: adapter saved in {out}")


@app.command("align", context_settings=PASS_THROUGH)
def align(ctx: typer.Context, config: Optional[Path] = CONFIG_ARGUMENT) -> None:
    """S-DPO / DPO from an SFT run: --sft RUN_DIR --loss sdpo|dpo --negatives K --beta B (sdpo align --help)."""
    from sdpo.training.preference import AlignConfig, run_align

    out = run_align(_config_from(ctx, config, AlignConfig, "align"))
    typer.echo(f"align: adapter saved in {out}")


@app.command("baseline", context_settings=PASS_THROUGH)
def baseline(ctx: typer.Context, config: Optional[Path] = CONFIG_ARGUMENT) -> None:
    """Classic recommenders on the same records: --model sasrec|gru4rec|caser|popularity --data DIR --output_dir DIR."""
    from sdpo.baselines.train import BaselineConfig, run_baseline

    metrics = run_baseline(_config_from(ctx, config, BaselineConfig, "baseline", {"--output": "--output_dir"}))
    shown = {k: round(metrics[k], 4) for k in ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr")}
    typer.echo(f"{metrics['model']} on {metrics['n_records']} {metrics['split']} records: {shown}")


@app.command("evaluate")
def evaluate_cmd(
    data: Path = typer.Option(..., help="prepared dataset folder"),
    split: str = typer.Option("test", help="train, val or test"),
    model: Optional[str] = typer.Option(None, help="alias, local HF folder or cached hub id (default: the adapter's base model, else smollm2-135m)"),
    adapter: Optional[Path] = typer.Option(None, help="LoRA adapter folder (output of sdpo sft or sdpo align)"),
    protocol: str = typer.Option("rank", help="generate (the paper's), rank (likelihood ranking) or rerank (the LM re-ranks a retriever's top items)"),
    score: str = typer.Option("logp", help="rank: order predictions by logp, log pi(c|x), or by reward, "
                              "log pi(c|x) - log pi_ref(c|x); both are in metrics.json"),
    reference_adapter: Optional[Path] = typer.Option(
        None, "--reference_adapter", "--reference-adapter",
        help="rank: pi_ref for the reward, e.g. the SFT run an S-DPO adapter started from (default: the base model)"),
    limit: Optional[int] = typer.Option(None, help="evaluate N records drawn at random with --subset_seed (default: all)"),
    subset_seed: int = typer.Option(0, "--subset_seed", "--subset-seed", help="seed of the --limit draw"),
    output_dir: Path = typer.Option(..., "--output_dir", "--output", help="folder for metrics.json and predictions.jsonl"),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="records per forward pass"),
    domain: Optional[str] = typer.Option(None, help="prompt domain (default: the adapter's, else the manifest's)"),
    prompt_seed: Optional[int] = typer.Option(None, "--prompt_seed", "--prompt-seed",
                                              help="seed fixing each record's prompt phrasing (default: the adapter's, else 0)"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no_bf16", help="bf16 weights and matmuls (default: on where the hardware computes bf16 natively)"),
    retriever: Optional[Path] = typer.Option(None, help="rerank: a trained sdpo baseline (sasrec, gru4rec, caser) picking from its whole catalogue"),
    top: int = typer.Option(20, help="rerank: how many retrieved items the LM re-ranks"),
    trunk_cache: Optional[Path] = typer.Option(
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
                             trunk_cache=trunk_cache)
    typer.echo(f"{protocol} on {metrics['n_records']} {split} records ({'bf16' if metrics['bf16'] else 'fp32'}):")
    intervals = metrics.get("ci95", {})
    for key, value in metrics.items():
        if isinstance(value, float) and key != "seconds":
            interval = intervals.get(key)
            typer.echo(f"  {key:<20} {value:.4f}" + (f"  95% CI [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""))
    typer.echo(f"wrote {output_dir / 'metrics.json'} and {output_dir / 'predictions.jsonl'}")


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
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no_bf16", help="bf16 weights and matmuls (default: on where the hardware computes bf16 natively)"),
    attn_implementation: str = typer.Option("sdpa", "--attn_implementation", "--attn-implementation",
                                            help="sdpa, eager or flex_attention (the packed step's block mask as a FlexAttention BlockMask)"),
) -> None:
    """Time one S-DPO step (forward + backward + reference) the published way and the shared-prompt way."""
    from sdpo.benchmark import benchmark_step, format_table, save_results
    from sdpo.datasets import load_split, read_manifest
    from sdpo.precision import resolve_bf16

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
    typer.echo(format_table(results))
    typer.echo(f"wrote {json_out}")


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
) -> None:
    """fp32 against bf16, side by side: records/s of SFT and S-DPO steps and of ranking, log-prob gaps, top-1 agreement."""
    from sdpo.benchmark_precision import benchmark_precision, format_table

    ks = _parse_ks(negatives)
    if min(records, repeats, rank_records, batch_size) < 1:
        raise UserError("--records, --repeats, --rank_records and --batch_size must be at least 1.")
    result = benchmark_precision(model, data, ks, records, repeats, rank_records, batch_size, json_out)
    typer.echo(format_table(result))
    typer.echo(f"wrote {json_out}")


@bench_app.command("trunk")
def benchmark_trunk_cmd(
    data: Path = typer.Option(..., help="prepared dataset folder whose test records are ranked"),
    json_out: Path = typer.Option(..., "--json", help="result file to write"),
    model: str = typer.Option("smollm2-135m", help="alias, local HF folder or cached hub id"),
    protocol: str = typer.Option("rank", help="rank (score the candidates) or generate (greedy answers)"),
    lora_layers: int = typer.Option(8, "--lora_layers", "--lora-layers", help="the adapter's layers: the last N (the trunk is the rest)"),
    records: int = typer.Option(32, help="test records ranked (answered) in each way"),
    repeats: int = typer.Option(3, help="timed repeats of each way, alternating which goes first (medians reported)"),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="records per forward pass"),
) -> None:
    """Ranking or generating with the shared-trunk cache against the full computation: s/record, speedup, exactness, disk per record."""
    from sdpo.benchmark_trunk import benchmark_trunk, format_table

    if min(records, repeats, batch_size, lora_layers) < 1:
        raise UserError("--records, --repeats, --batch_size and --lora_layers must be at least 1.")
    result = benchmark_trunk(model, data, lora_layers, records, repeats, batch_size, json_out, protocol=protocol)
    typer.echo(format_table(result))
    typer.echo(f"wrote {json_out}")


@bench_app.command("baseline")
def benchmark_baseline_cmd(
    data: Path = typer.Option(..., help="prepared dataset folder whose train records are used"),
    json_out: Path = typer.Option(..., "--json", help="result file to write"),
    models: str = typer.Option("sasrec,gru4rec,caser", help="comma-separated baselines"),
    steps: int = typer.Option(20, help="timed training steps per child process (after 3 warm-up steps)"),
    repeats: int = typer.Option(3, help="child processes per setting (the median is reported)"),
) -> None:
    """Time a baseline training step with glibc's default malloc and with freed memory kept."""
    from sdpo.baselines.benchmark import benchmark_baselines, format_table, save_results
    from sdpo.baselines.train import MODELS
    from sdpo.datasets import load_split

    chosen = [m.strip() for m in models.split(",")]
    unknown = [m for m in chosen if m not in MODELS or m == "popularity"]
    if unknown:
        raise UserError(f"--models: {', '.join(unknown)} cannot be timed; choose from sasrec, gru4rec, caser.")
    load_split(data, "train", limit=1)  # a clear message for a wrong folder before any child starts
    results = benchmark_baselines(chosen, str(data), steps, repeats)
    save_results(json_out, str(data), steps, repeats, results)
    typer.echo(format_table(results))
    typer.echo(f"wrote {json_out}")


@app.command("recommend", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def recommend_cmd(
    ctx: typer.Context,
    run: Path = typer.Option(..., help="run folder of sdpo sft or sdpo align (adapter + sdpo_config.yaml)"),
    input_file: Optional[Path] = typer.Option(None, "--input", help="JSONL of queries: {\"id\", \"history\": [...], \"candidates\": [...]}"),
    output_file: Optional[Path] = typer.Option(None, "--output", help="JSONL to write, one ranked list per query (with --input)"),
    retriever: Optional[Path] = typer.Option(
        None, help="a trained sdpo baseline (sasrec, gru4rec, caser) that picks the candidates from its catalogue (or from --candidates)"),
    top: int = typer.Option(20, help="with --retriever: how many items it passes to the LM"),
    score: str = typer.Option("logp", help="logp, or reward (against the run's reference: its SFT run, or the base model)"),
    generate: bool = typer.Option(False, "--generate", help="answer by greedy generation (the paper's protocol) instead of ranking"),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="queries per forward pass"),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no_bf16", help="bf16 weights and matmuls (default: where the hardware has native bf16)"),
) -> None:
    """Rank candidates for a user's history: --history A B ... --candidates X Y ... (or --retriever DIR), or --input/--output JSONL."""
    from sdpo.recommend import Recommender, Retriever, make_record

    lists = _list_options(ctx.args, ("--history", "--candidates"))
    if (input_file is None) == (not lists.get("--history")):
        raise UserError("recommend: give either --history A B ... (one query) or --input FILE (many).")
    if input_file is not None and output_file is None:
        raise UserError("recommend: --input needs --output FILE for the ranked lists.")
    if generate and retriever is not None:
        raise UserError("recommend: --generate answers for given candidates; it does not take --retriever.")
    queries = _read_queries(input_file) if input_file else [{"id": None, "history": lists["--history"], "candidates": lists.get("--candidates")}]
    pick = Retriever.load(retriever) if retriever else None
    for number, query in enumerate(queries, start=1):
        if not query.get("history"):
            raise UserError(f"query {number}: the history is empty; give at least one item the user consumed.")
        if pick is None and not query.get("candidates"):
            raise UserError(f"query {number}: no candidates; give them, or --retriever DIR to pick them from the catalogue.")
    if pick is not None:  # the retriever picks from the given candidates, or from its whole catalogue
        retrieved = pick.top([q["history"] for q in queries], top, [q.get("candidates") for q in queries])
        for query, items in zip(queries, retrieved, strict=True):
            query["candidates"] = [t for t, _ in items]
    records = [make_record(q["history"], q["candidates"], q.get("id") and str(q["id"])) for q in queries]
    recommender = Recommender.load(run, bf16=bf16)
    if generate:
        answers = recommender.generate_records(records, batch_size, progress=input_file is not None)
        rows = [{"id": q.get("id"), **a} for q, a in zip(queries, answers, strict=True)]
    else:
        ranked = recommender.rank_records(records, score, batch_size, progress=input_file is not None)
        rows = [{"id": q.get("id"), "ranking": [{"title": t, "score": round(s, 4)} for t, s in ranking]}
                for q, ranking in zip(queries, ranked, strict=True)]
    if output_file is not None:
        from sdpo.io import write_jsonl

        write_jsonl(output_file, rows)
        typer.echo(f"wrote {len(rows)} ranked lists to {output_file}")
    elif generate:
        typer.echo(f"answer: {rows[0]['text']!r} -> {rows[0]['choice'] or 'no single candidate named'}")
    else:
        for place, entry in enumerate(rows[0]["ranking"], start=1):
            typer.echo(f"{place:>3}. {entry['title']}  ({score} {entry['score']:.3f})")


def _list_options(args: list[str], names: tuple[str, ...]) -> dict[str, list[str]]:
    """`--name v1 v2 ...` groups among extra arguments; anything else is a user error."""
    lists: dict[str, list[str]] = {}
    current = None
    for arg in args:
        if arg in names:
            current = lists.setdefault(arg, [])
        elif arg.startswith("--") or current is None:
            raise UserError(f"recommend: unknown option {arg!r}. See sdpo recommend --help.")
        else:
            current.append(arg)
    return lists


def _read_queries(path: Path) -> list[dict]:
    import json

    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc}).") from None
    queries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            query = json.loads(line)
        except ValueError:
            raise UserError(f"{path}:{number}: not valid JSON. Each line must be one query.") from None
        if not isinstance(query, dict) or not isinstance(query.get("history"), list) or not isinstance(query.get("candidates", []), list):
            raise UserError(f"{path}:{number}: a query is {{\"id\", \"history\": [titles], \"candidates\": [titles]}}.")
        queries.append(query)
    if not queries:
        raise UserError(f"{path}: holds no queries.")
    return queries


@app.command("report")
def report_cmd(
    runs: list[Path] = typer.Argument(..., help="pipeline output folders (results.json, eval/, stage folders), "
                                                "or per-record CSVs a report wrote (<run>-records.csv.gz)"),
    out: Path = typer.Option(..., "--out", help="folder for results.md, the per-record CSVs and the plots"),
    config: Optional[Path] = typer.Option(None, help="for a records CSV: the pipeline config that produced it "
                                                     "(stage relations, for the paired comparisons and HR@1 against K)"),
    data: Optional[Path] = typer.Option(None, help="for a records CSV without a user column: the prepared dataset "
                                                   "folder, for intervals over users"),
) -> None:
    """Tables with 95% intervals, paired comparisons, per-record CSVs and plots from pipeline runs (or their records CSVs)."""
    from sdpo.report import write_report

    for path in write_report(runs, out, config, data):
        typer.echo(f"wrote {path}")


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="run folder of sdpo sft or sdpo align"),
    out: Path = typer.Option(..., "--out", help="new folder for the exported adapter"),
    reference: Optional[Path] = typer.Option(
        None, help="for an align run: the exported folder of the SFT run it was trained against (its reward's reference)"),
    dtype: str = typer.Option("bf16", help="bf16 (half the size) or fp32 (the trained weights exactly)"),
) -> None:
    """Export a run's adapter (weights, adapter and run config, training log) as a small folder to share or commit."""
    from sdpo.export import export_adapter
    from sdpo.runs import ADAPTER_WEIGHTS

    folder = export_adapter(run, out, reference, dtype)
    size = (folder / ADAPTER_WEIGHTS).stat().st_size / 1e6
    typer.echo(f"exported {run} to {folder} ({dtype} weights, {size:.1f} MB)")


@app.command("pipeline")
def pipeline_cmd(config: Path = typer.Argument(..., help="pipeline YAML (see configs/quickstart.yaml)")) -> None:
    """Run the stages a pipeline config lists (data, sft, evaluate) and print the results table."""
    from sdpo.pipeline import run_pipeline

    run_pipeline(config)


def main() -> None:
    try:
        app()  # typer reports a bad flag or value itself: usage line, the problem, exit status 2
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # python -m sdpo.cli, e.g. under accelerate launch -m
    main()
