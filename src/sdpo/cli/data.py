"""`sdpo data fetch` and `sdpo data prepare`."""

from __future__ import annotations

from pathlib import Path

import typer

from sdpo.cli.app import data_app


@data_app.command("fetch")
def data_fetch(
    dataset: str = typer.Argument(..., help="dataset name: lastfm or movielens-100k"),
    mirror: Path | None = typer.Option(None, help="copy from this local mirror folder (default: $SDPO_MIRROR)"),
    raw_dir: Path | None = typer.Option(None, "--raw_dir", "--raw-dir", help="where raw files are kept (default: $SDPO_HOME/raw)"),
) -> None:
    """Download a dataset's raw files (or copy them from a mirror), checking every SHA-256."""
    from sdpo.data.sources.fetch import fetch

    folder = fetch(dataset, raw_dir, mirror)
    typer.echo(f"{dataset}: raw files verified in {folder}")


@data_app.command("prepare")
def data_prepare(
    dataset: str = typer.Argument(..., help="lastfm, movielens-100k, interactions (your own logs) or llara (a LLaRA folder)"),
    out: Path = typer.Option(..., help="folder to write train/val/test.jsonl and manifest.json into"),
    seed: int = typer.Option(0, help="seed for user splits and negative candidates"),
    mirror: Path | None = typer.Option(None, help="local mirror folder (default: $SDPO_MIRROR)"),
    raw_dir: Path | None = typer.Option(None, "--raw_dir", "--raw-dir", help="where raw files are kept (default: $SDPO_HOME/raw)"),
    overwrite: bool = typer.Option(False, help="replace an existing prepared folder"),
    interactions: Path | None = typer.Option(None, help="interactions: CSV/JSONL with user, item, timestamp[, rating]"),
    items: Path | None = typer.Option(None, help="interactions: CSV/JSONL with item, title"),
    domain: str | None = typer.Option(None, help="interactions/llara: music, movies, books or games"),
    min_rating: float | None = typer.Option(None, "--min_rating", "--min-rating", help="interactions/movielens-100k: drop ratings below this"),
    dir: Path | None = typer.Option(None, "--dir", help="llara: folder with id2name.txt and the *_data.df pickles"),
    trust_pickles: bool = typer.Option(False, "--trust_pickles", "--trust-pickles", help="llara: load pickles whose SHA-256 is not on the pinned list"),
) -> None:
    """Turn a dataset into a prepared record folder (fetching raw files first where needed)."""
    from sdpo.data.prepare import prepare_dataset

    manifest = prepare_dataset(
        dataset, out, seed=seed, mirror=mirror, raw_dir=raw_dir, overwrite=overwrite, interactions=interactions,
        items=items, folder=dir, domain=domain, min_rating=min_rating, trust_pickles=trust_pickles,
    )
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    typer.echo(f"{dataset}: wrote {out} ({counts})")
