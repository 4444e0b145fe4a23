"""Out-of-fold collaborative models (cross-fitting): one model per user fold, each trained without that fold's users.

A collaborative LM trains on windows of the training split. The model trained on all training
users has seen those very windows, so its vectors and scores there are in-sample: cleaner than on
val and test, and an LM learns to copy them. Cross-fitting gives each training window the signal of
a model that never saw its user (`sdpo.baselines.crossfit.CrossFitted` reads them).

``sdpo baseline --folds k`` (after the model on all training users, in the same output folder):

- users are split into k folds by ``sha256(f"{fold_seed}:{user}") mod k``: stable across runs,
  machines and Python's hash seed;
- fold i's model trains on the training records of the users outside fold i, with the main model's
  item table (so ids line up), its L2 weight and every other option; early stopping on val as usual;
- it is saved as a collaborative model folder of its own, ``OUT/folds/<i>/`` (weights, items.json,
  config.json with ``fold``), and ``OUT/folds.json`` lists every fold: its path, its fingerprint,
  its users and records, its val HR@1.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from sdpo.baselines.fingerprint import model_sha256
from sdpo.baselines.items import ItemTable
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.io import replace_atomic, write_json

FOLDS_DIR = "folds"
FOLDS_FILE = "folds.json"
FOLD_RULE = "sha256(f'{fold_seed}:{user}') mod folds"


def fold_of(user: str, folds: int, seed: int) -> int:
    """The fold of `user`: SHA-256 of the seed and the user id, modulo `folds`."""
    return int(hashlib.sha256(f"{seed}:{user}".encode()).hexdigest(), 16) % folds


def check_users(records: list[Record], what: str) -> None:
    """A user error when a record has no user id: folds are made of users."""
    missing = [r.id for r in records if r.user in (None, "")]
    if missing:
        raise UserError(f"--folds splits users into folds, but {len(missing):,} {what} have no user id (record {missing[0]}, say). "
                        "Prepare the data again with sdpo data prepare, which records users, or leave --folds out.")


def train_folds(config, train_records: list[Record], items: ItemTable, l2: float,
                train_model: Callable[[list[Record]], tuple[dict, float, list[float]]]) -> list[dict[str, Any]]:
    """Train the `config.folds` fold models into OUT/folds/<i>/ (a finished one is kept) and write OUT/folds.json; returns its entries.

    `train_model(records)` trains one model on `records` as the main one was trained: (its weights, val HR@1, val HR@1 per epoch).
    """
    check_users(train_records, "training records")
    out = Path(config.output_dir)
    entries = []
    for fold in range(config.folds):
        folder = out / FOLDS_DIR / str(fold)
        held_out = {r.user for r in train_records if fold_of(r.user, config.folds, config.fold_seed) == fold}
        kept = [r for r in train_records if r.user not in held_out]
        if not kept:
            raise UserError(f"--folds {config.folds}: fold {fold} holds every training user. Use fewer folds.")
        summary_path = folder / "fold.json"
        if not summary_path.is_file():
            print(f"[baseline] fold {fold + 1}/{config.folds}: {len(kept):,} training records of the users outside it", flush=True)
            if folder.exists():
                shutil.rmtree(folder)  # a fold that stopped before its summary: trained again whole
            folder.mkdir(parents=True)
            state, hr, curve = train_model(kept)
            weights = {k: v.contiguous() for k, v in state.items()}
            replace_atomic(folder / "model.safetensors", lambda tmp, weights=weights: save_file(weights, str(tmp)))
            items.save(folder / "items.json")
            write_json(folder / "config.json", {**vars(config), "l2": str(l2), "fold": fold, "folds": 0})
            write_json(summary_path, {"fold": fold, "held_out_users": len(held_out), "training_records": len(kept),
                                      "val_hr@1": hr, "epochs": len(curve), "val_hr@1_by_epoch": curve})
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        entries.append({**summary, "path": f"{FOLDS_DIR}/{fold}", "sha256": model_sha256(folder)})
    write_json(out / FOLDS_FILE, {"folds": config.folds, "fold_seed": config.fold_seed, "rule": FOLD_RULE, "l2": l2, "models": entries})
    return entries


def read_folds(folder: str | Path) -> dict[str, Any] | None:
    """OUT/folds.json of a collaborative model folder, or None when it was trained without folds."""
    path = Path(folder) / FOLDS_FILE
    if not path.is_file():
        return None
    try:
        folds = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(folds.get("models"), list) or len(folds["models"]) != folds["folds"]:
            raise ValueError("its models do not match its number of folds")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: unreadable ({exc}). Train the model again with sdpo baseline --folds K.") from None
    return folds
