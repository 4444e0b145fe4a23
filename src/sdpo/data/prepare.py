"""`prepare_dataset`: a raw source (fetched, mirrored or the user's own files) into a prepared folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdpo.data.datasets import read_manifest
from sdpo.errors import UserError

PREPARERS = ("lastfm", "movielens-100k", "interactions", "llara")


def prepare_dataset(
    dataset: str,
    out: str | Path,
    seed: int = 0,
    mirror=None,
    raw_dir=None,
    overwrite: bool = False,
    *,
    interactions: str | Path | None = None,
    items: str | Path | None = None,
    folder: str | Path | None = None,
    domain: str | None = None,
    min_rating: float | None = None,
    trust_pickles: bool = False,
) -> dict[str, Any]:
    """Build the prepared folder `out` for `dataset`; returns its manifest.

    lastfm and movielens-100k are fetched (or copied from a mirror) first; ``interactions``
    reads the user's files `interactions` + `items`; ``llara`` reads the LLaRA `folder`.
    """
    from sdpo.data.datasets import write_prepared
    from sdpo.data.prompts import DOMAINS
    from sdpo.data.sources.fetch import fetch

    if dataset not in PREPARERS:
        raise UserError(f"unknown dataset {dataset!r}; known: {', '.join(PREPARERS)}.")
    if dataset in ("interactions", "llara") and domain not in DOMAINS:
        raise UserError(f"{dataset}: --domain must be one of {', '.join(DOMAINS)}.")
    if dataset == "lastfm":
        from sdpo.data.sources.lastfm import prepare_lastfm

        splits, manifest = prepare_lastfm(fetch(dataset, raw_dir, mirror), seed)
    elif dataset == "movielens-100k":
        from sdpo.data.sources.movielens import prepare_movielens

        splits, manifest = prepare_movielens(fetch(dataset, raw_dir, mirror), seed, min_rating)
    elif dataset == "interactions":
        from sdpo.data.sources.interactions import build_records, parse_interactions, parse_titles

        if not interactions or not items:
            raise UserError("interactions: give both --interactions FILE and --items FILE.")
        splits, info = build_records(parse_interactions(Path(interactions), min_rating), parse_titles(Path(items)), seed)
        manifest = {"dataset": "interactions", "domain": domain, "seed": seed, "min_rating": min_rating,
                    "sources": {"interactions": str(interactions), "items": str(items)}, **info}
    else:
        from sdpo.data.sources.llara import prepare_llara

        if not folder:
            raise UserError("llara: give the folder with --dir DIR.")
        splits, manifest = prepare_llara(Path(folder), domain, seed, trust_pickles)
    write_prepared(out, splits, manifest, overwrite=overwrite)
    return read_manifest(out)
