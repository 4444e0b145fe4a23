"""Any dataset in the LLaRA layout: id2name.txt plus train/Val/Test_data.df pandas pickles.

Pickles run code when loaded, so each one is loaded only if its SHA-256 is on the pinned
list of known files (LastFM, the partial Steam split), or when the user vouches for it with
``trust_pickles``. Each pickle row is a window (``seq`` padded with the item count,
``len_seq``, ``next``); windows with at least 3 history items become records with 20
candidates, negatives seeded per record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdpo.data.candidates import record_rng, sample_candidates
from sdpo.data.records import Record
from sdpo.data.sources.fetch import DATASETS, sha256_of
from sdpo.data.sources.lastfm import MIN_HISTORY, N_CANDIDATES, read_id2name, read_llara_windows
from sdpo.errors import UserError

STEAM_PICKLES = {
    "2766b9faf90e3531a35207c01fbef2f655af97c21a6ba7d18581bbef2bc6ad59": "steam/Test_data.df",
    "84cd6a73ffea7e64e88e0c01357e01ffc7492fac3870dcccb417939c82fc764b": "steam/Val_data.df",
    "3175076a6e5fcd3e516b1e5dcf16d72af083baf0bd589d2bfac1c1682fefad5f": "steam/train_data.df1000 (a 1,000-row sample)",
}
KNOWN_PICKLES = {
    **{f.sha256: f"{name}/{f.name}" for name, files in DATASETS.items() for f in files if f.name.endswith(".df")},
    **STEAM_PICKLES,
}


def llara_files(folder: Path) -> dict[str, Path]:
    """The four files of a LLaRA folder (the train pickle may carry a suffix, e.g. train_data.df1000)."""
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder.")
    trains = sorted(folder.glob("train_data.df*"))
    if len(trains) != 1:
        raise UserError(f"{folder}: expected one train_data.df file, found {len(trains)}.")
    files = {"train": trains[0], "val": folder / "Val_data.df", "test": folder / "Test_data.df", "names": folder / "id2name.txt"}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise UserError(f"{folder}: missing {', '.join(missing)} (LLaRA layout: id2name.txt, train_data.df, Val_data.df, Test_data.df).")
    return files


def check_pickle(path: Path, trust: bool) -> str:
    """The pinned name of a known pickle, or 'trusted by user'; refuses unknown ones."""
    digest = sha256_of(path)
    if digest in KNOWN_PICKLES:
        return KNOWN_PICKLES[digest]
    if trust:
        return "unknown file, trusted by the user"
    raise UserError(
        f"{path}: unknown pickle (SHA-256 {digest}). Loading a pickle runs code it contains; "
        "if you trust this file, pass --trust-pickles."
    )


def window_records(windows, titles: list[str], split: str, seed: int, offset: int) -> list[Record]:
    """Records for the windows with >= MIN_HISTORY items (and the target not in the history)."""
    records = []
    for position, (history, target) in enumerate(windows):
        if len(history) < MIN_HISTORY or target in history:
            continue
        candidates = sample_candidates(record_rng(seed, offset + position), len(titles), target, history, N_CANDIDATES)
        records.append(Record(f"{split}-{position}", None, [titles[i] for i in history], [titles[i] for i in candidates], titles[target]))
    return records


def prepare_llara(folder: Path, domain: str, seed: int, trust_pickles: bool = False) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    files = llara_files(folder)
    provenance = {files[s].name: check_pickle(files[s], trust_pickles) for s in ("train", "val", "test")}
    titles = read_id2name(files["names"])
    splits, offset = {}, 0
    for split in ("train", "val", "test"):
        pad = len(titles)  # LLaRA pads `seq` with the item count; a few rows carry it inside len_seq too
        windows = [([i for i in history if i != pad], target) for history, target in read_llara_windows(files[split])]
        bad = [i for h, t in windows for i in (*h, t) if not 0 <= i < len(titles)]
        if bad:
            raise UserError(f"{files[split]}: item id {bad[0]} is not in id2name.txt (0..{len(titles) - 1}).")
        splits[split] = window_records(windows, titles, split, seed, offset)
        offset += len(windows)
    manifest = {
        "dataset": f"llara:{folder.name}",
        "domain": domain,
        "seed": seed,
        "n_items": len(titles),
        "sources": {p.name: {"sha256": sha256_of(p), "known_as": provenance.get(p.name, "item names")} for p in files.values()},
    }
    return splits, manifest
