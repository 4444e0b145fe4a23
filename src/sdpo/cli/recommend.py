"""`sdpo recommend`: rank (or answer) for one history, or for a JSONL file of queries."""

from __future__ import annotations

from pathlib import Path

import typer

from sdpo.cli.app import app
from sdpo.errors import UserError


@app.command("recommend", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def recommend_cmd(
    ctx: typer.Context,
    run: Path = typer.Option(..., help="run folder of sdpo sft or sdpo align (adapter + sdpo_config.yaml)"),
    input_file: Path | None = typer.Option(None, "--input", help="JSONL of queries: {\"id\", \"history\": [...], \"candidates\": [...]}"),
    output_file: Path | None = typer.Option(None, "--output", help="JSONL to write, one ranked list per query (with --input)"),
    retriever: Path | None = typer.Option(
        None, help="a trained sdpo baseline (sasrec, gru4rec, caser) that picks the candidates from its catalogue (or from --candidates)"),
    top: int = typer.Option(20, help="with --retriever: how many items it passes to the LM"),
    score: str = typer.Option("logp", help="logp, or reward (against the run's reference: its SFT run, or the base model)"),
    generate: bool = typer.Option(False, "--generate", help="answer by greedy generation (the paper's protocol) instead of ranking"),
    batch_size: int = typer.Option(8, "--batch_size", "--batch-size", help="queries per forward pass"),
    bf16: bool | None = typer.Option(None, "--bf16/--no_bf16", help="bf16 weights and matmuls (default: where the hardware has native bf16)"),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N (default: the GPU if there is one, else the CPU)"),
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
    recommender = Recommender.load(run, bf16=bf16, device=device)
    unknown = [recommender.unknown_titles(record) for record in records]
    if recommender.collaborative is not None:
        named = f" ({', '.join(map(repr, unknown[0][:5]))})" if len(records) == 1 and unknown[0] else ""
        typer.echo(f"[collaborative] {sum(map(len, unknown))} titles of {len(records)} queries have no id in "
                   f"{recommender.collaborative.folder}: they read the learned unknown vector{named}", err=True)
    if generate:
        answers = recommender.generate_records(records, batch_size, progress=input_file is not None)
        rows = [{"id": q.get("id"), **a} for q, a in zip(queries, answers, strict=True)]
    else:
        ranked = recommender.rank_records(records, score, batch_size, progress=input_file is not None)
        rows = [{"id": q.get("id"), "ranking": [{"title": t, "score": round(s, 4)} for t, s in ranking]}
                for q, ranking in zip(queries, ranked, strict=True)]
    if output_file is not None:
        from sdpo.io import write_jsonl

        if recommender.collaborative is not None:
            rows = [{**row, "unknown_titles": titles} for row, titles in zip(rows, unknown, strict=True)]
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
