"""Several ID models as one collaborative source: each title carries all their vectors, each candidate all their scores.

A stack folder (``sdpo stack``, or ``stack: true`` in a pipeline's baselines section) holds copies of
its members (``members/<name>/``: config, item table, weights) and ``stack.json`` naming them with
their fingerprints, so it travels and exports as one folder. `StackedCollaborative` reads it where a
`CollaborativeModel` is read (``--collaborative STACK``): one soft token per title, whose vector is
the members' vectors side by side ([..., D_1 + ... + D_M]), with the user token likewise, and with
the score feature each member's own score of the candidate (``segments`` tells the prompts where
one member's vector ends), so the projectors see M scores beside the concatenated vector.

The members must share their item table (models trained on one prepared dataset do); the stack's
fingerprint is a SHA-256 over its members' fingerprints.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from sdpo.baselines.collaborative import FILES, CollaborativeBatch, CollaborativeModel
from sdpo.data.records import Record
from sdpo.errors import UserError
from sdpo.io import write_folder_atomic, write_json

STACK_FILE = "stack.json"
MEMBERS = "members"


def is_stack(folder: str | Path) -> bool:
    return (Path(folder) / STACK_FILE).is_file()


def make_stack(members: list[str | Path], out: str | Path) -> Path:
    """Copy the trained models `members` into a new stack folder `out` and name them in its stack.json."""
    if len(members) < 2:
        raise UserError("a stack needs two or more trained models (sasrec, gru4rec, caser).")
    models = [CollaborativeModel.load(folder) for folder in members]
    names = [m.name if [x.name for x in models].count(m.name) == 1 else f"{m.name}-{i}" for i, m in enumerate(models)]
    if any(m.items.titles != models[0].items.titles for m in models[1:]):
        raise UserError(f"{', '.join(str(m) for m in members)}: these models have different item tables; a stack needs models "
                        "trained on one prepared dataset.")

    def fill(staging: Path) -> None:
        for name, model in zip(names, models, strict=True):
            (staging / MEMBERS / name).mkdir(parents=True)
            for file in FILES:
                shutil.copy2(model.folder / file, staging / MEMBERS / name / file)
        write_json(staging / STACK_FILE, {"members": [{"name": n, "model": m.name, "sha256": m.sha256}
                                                      for n, m in zip(names, models, strict=True)]})

    return write_folder_atomic(Path(out), fill)


class StackedCollaborative:
    """A stack of trained ID models read as one collaborative model (module docstring); the interface of `CollaborativeModel`."""

    def __init__(self, members: list[CollaborativeModel], folder: Path):
        self.members, self.folder = members, folder
        self.items, self.name = members[0].items, "stack"
        self.max_len = max(m.max_len for m in members)
        self.sha256 = hashlib.sha256("".join(f"{m.sha256}\n" for m in members).encode()).hexdigest()
        self.weights_sha256 = None

    @classmethod
    def load(cls, folder: str | Path, sha256: str | None = None) -> StackedCollaborative:
        folder = Path(folder)
        try:
            listed = json.loads((folder / STACK_FILE).read_text(encoding="utf-8"))["members"]
            entries = [(entry["name"], entry["sha256"]) for entry in listed]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{folder / STACK_FILE}: unreadable ({exc}). Make the stack again with sdpo stack.") from None
        stack = cls([CollaborativeModel.load(folder / MEMBERS / name, member_sha, role="stack member") for name, member_sha in entries],
                    folder)
        if sha256 is not None and sha256 != stack.sha256:
            raise UserError(f"{folder}: this stack has SHA-256 {stack.sha256[:12]}..., not the {sha256[:12]}... this run was trained "
                            "with. Give the stack the run was trained with.")
        return stack

    def matches(self, recorded: str | None) -> bool:
        return recorded == self.sha256

    @property
    def dim(self) -> int:
        return sum(m.dim for m in self.members)

    @property
    def segments(self) -> list[int]:
        """Each member's share of the stacked vector, in order."""
        return [m.dim for m in self.members]

    def files(self) -> list[Path]:
        """The stack's files, relative to its folder (what an export or an import copies)."""
        return [Path(STACK_FILE), *(Path(MEMBERS) / m.folder.name / file for m in self.members for file in FILES)]

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.folder), "sha256": self.sha256, "model": self.name, "dim": self.dim,
                "members": [m.describe() for m in self.members]}

    def unknown_titles(self, records: list[Record]) -> Counter[str]:
        return self.members[0].unknown_titles(records)

    def ids(self, titles: list[str]) -> list[int]:
        return self.members[0].ids(titles)

    @torch.no_grad()
    def encode(self, records: list[Record]) -> CollaborativeBatch:
        """The members' batches side by side: vectors and user states concatenated, one score per member [B, C, M]."""
        batches = [m.encode(records) for m in self.members]
        return CollaborativeBatch(
            user=torch.cat([b.user for b in batches], dim=-1),
            history=torch.cat([b.history for b in batches], dim=-1),
            history_known=batches[0].history_known,
            candidates=torch.cat([b.candidates for b in batches], dim=-1),
            candidate_known=batches[0].candidate_known,
            scores=torch.stack([b.scores for b in batches], dim=-1),
        )
