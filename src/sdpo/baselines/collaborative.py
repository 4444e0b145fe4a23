"""A trained ``sdpo baseline`` (SASRec, GRU4Rec, Caser) read as the source of an LM's collaborative tokens.

The model stays frozen. For a batch of records it gives, in its own scoring space (a candidate's
score is the dot product of the user state and the candidate's vector):

- ``user`` [B, D]: the model's state after the record's history (its last ``max_len`` items);
- ``history`` [B, H, D]: the vector of each history title, H the batch's longest history;
- ``candidates`` [B, C, D]: the vector of each candidate title;
- ``scores`` [B, C]: each candidate's score, the model's own ranking (what ``sdpo baseline`` evaluates;
  -inf past a record's last candidate, where C pads to the batch's most);
- ``history_known`` [B, H] and ``candidate_known`` [B, C]: False where a title has no id in the
  model's item table (or at padding): there the LM reads its learned unknown vector.

A run names the model by its folder and its SHA-256 (`describe`): the fingerprint of all three
files of the folder (`model_sha256`: the weights, the title-to-id table, the config's model entries
with its ``max_len``), so a changed item table or config is refused like changed weights.
``CollaborativeModel.load(folder, sha256=...)`` refuses a folder that does not match; a run that
recorded the older fingerprint, of the weights alone, still loads its model.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdpo.baselines.fingerprint import WEIGHTS, model_sha256
from sdpo.baselines.items import PAD, UNKNOWN, ItemTable
from sdpo.baselines.models import SequentialRecommender
from sdpo.data.records import Record
from sdpo.data.sources.fetch import sha256_of
from sdpo.errors import UserError

FILES = ("config.json", "items.json", WEIGHTS)


@dataclass
class CollaborativeBatch:
    """What the collaborative model knows about a batch of records (shapes in the module docstring)."""

    user: torch.Tensor
    history: torch.Tensor
    history_known: torch.Tensor
    candidates: torch.Tensor
    candidate_known: torch.Tensor
    scores: torch.Tensor


class CollaborativeModel:
    """A frozen sequential recommender with its item table, named by folder and fingerprint (`model_sha256`)."""

    def __init__(self, model: SequentialRecommender, items: ItemTable, max_len: int, name: str, folder: Path, sha256: str,
                 weights_sha256: str | None = None):
        self.model, self.items, self.max_len, self.name = model.eval().requires_grad_(False), items, max_len, name
        self.folder, self.sha256, self.weights_sha256 = folder, sha256, weights_sha256

    def matches(self, recorded: str | None) -> bool:
        """Whether `recorded` (a run's ``collaborative_sha256``) names this model: its fingerprint, or its weights' alone (older runs)."""
        return recorded is not None and recorded in (self.sha256, self.weights_sha256)

    @classmethod
    def load(cls, folder: str | Path, sha256: str | None = None, role: str = "collaborative model") -> CollaborativeModel:
        """The trained model in `folder` (an ``sdpo baseline`` output); with `sha256`, only if it names this model (`matches`).

        `role` names what the model is used as in the messages (a retriever, say).
        """
        from safetensors.torch import load_file

        from sdpo.baselines.train import BaselineConfig, build_model

        folder = Path(folder)
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            raise UserError(f"{folder}: not a trained {role} ({', '.join(missing)} missing). Give the output folder "
                            "of sdpo baseline --model sasrec|gru4rec|caser.")
        try:
            found, weights = model_sha256(folder), sha256_of(folder / WEIGHTS)
        except (OSError, ValueError) as exc:
            raise UserError(f"{folder}: unreadable as a {role} ({type(exc).__name__}: {exc}). "
                            "Train it again with sdpo baseline --model sasrec|gru4rec|caser.") from None
        if sha256 is not None and sha256 not in (found, weights):
            raise UserError(f"{folder}: its files (weights, item table, config) have SHA-256 {found[:12]}..., not the {sha256[:12]}... "
                            "this run was trained with. Give the collaborative model that run was trained with.")
        try:
            values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            items = ItemTable.load(folder / "items.json")
            state = load_file(str(folder / WEIGHTS))
            config = BaselineConfig(**{k: v for k, v in values.items() if k in BaselineConfig.__dataclass_fields__})
            if config.model == "popularity":
                raise ValueError("popularity has no item vectors or user states")
            model = build_model(config.model, len(items), config)
            model.load_state_dict(state)
        except UserError:
            raise
        except Exception as exc:  # damaged or foreign files of any kind
            raise UserError(f"{folder}: unreadable as a {role} ({type(exc).__name__}: {exc}). "
                            "Train it again with sdpo baseline --model sasrec|gru4rec|caser.") from None
        return cls(model, items, config.max_len, config.model, folder, found, weights)

    @property
    def dim(self) -> int:
        return self.model.item_embedding.embedding_dim

    def files(self) -> list[Path]:
        """The model's files, relative to its folder (what an export or an import copies)."""
        return [Path(name) for name in FILES]

    def describe(self) -> dict[str, Any]:
        """What a run records of the model it read."""
        return {"path": str(self.folder), "sha256": self.sha256, "model": self.name, "dim": self.dim}

    def unknown_titles(self, records: list[Record]) -> Counter[str]:
        """How often each history or candidate title of `records` has no id in the item table (it reads the unknown vector)."""
        return Counter(self.items.coverage(records)["unknown_titles"])

    def ids(self, titles: list[str]) -> list[int]:
        """Item ids of `titles` (UNKNOWN where the table has none)."""
        return [self.items.id_of(t) for t in titles]

    @torch.no_grad()
    def encode(self, records: list[Record]) -> CollaborativeBatch:
        """The user states, item vectors and scores of a batch of records (no gradients: the model is frozen)."""
        longest = max(len(r.history) for r in records)
        history_ids = [[PAD] * (longest - len(r.history)) + self.ids(r.history) for r in records]  # left-padded, as the model reads
        widest = max(len(r.candidates) for r in records)
        candidate_ids = torch.tensor([self.ids(r.candidates) + [PAD] * (widest - len(r.candidates)) for r in records])  # [B, C]
        history_ids = torch.tensor(history_ids)  # [B, H]
        recent = history_ids[:, -self.max_len:]
        if recent.shape[1] < self.max_len:
            recent = torch.nn.functional.pad(recent, (self.max_len - recent.shape[1], 0), value=PAD)
        user = self.model(recent)  # [B, D]
        vectors = self.model.item_embedding
        candidates = vectors(candidate_ids)  # [B, C, D]
        return CollaborativeBatch(
            user=user,
            history=vectors(history_ids),
            history_known=history_ids > UNKNOWN,
            candidates=candidates,
            candidate_known=candidate_ids > UNKNOWN,
            scores=torch.einsum("bd,bcd->bc", user, candidates).masked_fill(candidate_ids == PAD, float("-inf")),
        )
