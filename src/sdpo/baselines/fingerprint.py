"""The fingerprint of a trained ID model's folder: its weights, its item table and its config's model entries."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sdpo.data.sources.fetch import sha256_of

WEIGHTS = "model.safetensors"


# config.json entries that say where and how the model was trained and reported, not what it is: a study rewrites its
# paths relative to itself (sdpo.pipeline.study), which must not change the model's fingerprint
RUN_ENTRIES = ("data", "output_dir", "progress", "resume", "overwrite", "compress_predictions", "eval_split", "eval_limit", "subset_seed",
               "folds", "fold_seed")  # the fold models trained beside it do not change it


def model_sha256(folder: str | Path) -> str:
    """The collaborative model's fingerprint: SHA-256 over the SHA-256 of its weights, of its item table, and of its config's
    model entries (all but `RUN_ENTRIES`: the architecture, ``max_len`` and the training settings)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_entries = json.dumps({k: v for k, v in config.items() if k not in RUN_ENTRIES}, sort_keys=True).encode()
    digest = hashlib.sha256()
    digest.update(f"config.json {hashlib.sha256(model_entries).hexdigest()}\n".encode())
    for name in ("items.json", WEIGHTS):
        digest.update(f"{name} {sha256_of(folder / name)}\n".encode())
    return digest.hexdigest()
