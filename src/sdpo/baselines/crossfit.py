"""Out-of-fold collaborative signals for training windows: each record read by the fold model that never saw its user.

`CrossFitted` stands where a `CollaborativeModel` encodes a batch of training records
(`sdpo.baselines.prompts.CollaborativePrompts`): a record of user u gets the user state, item vectors
and scores of the fold model trained without u's fold (`sdpo.baselines.folds`). Val, test and
``sdpo recommend`` keep reading the model trained on all training users.

Each model learns its own vector space: the same item sits at unrelated coordinates in two models.
The LM's projectors, trained on fold vectors, then read the main model's at test time. So each
fold model's space is turned into the main model's by the orthogonal map that best carries its
item vectors onto the main model's (orthogonal Procrustes over every item id; the map is
R = U V^T for U S V^T = svd(E_fold^T E_main)). User states and item vectors are both turned by R,
so every score (their dot product) stays the fold model's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdpo.baselines.collaborative import CollaborativeBatch, CollaborativeModel
from sdpo.baselines.folds import fold_of, read_folds
from sdpo.baselines.items import UNKNOWN
from sdpo.data.records import Record
from sdpo.errors import UserError


def procrustes(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[D, D] the orthogonal R minimising ||source @ R - target|| (source, target [N, D])."""
    u, _, vh = torch.linalg.svd(source.double().T @ target.double())
    return (u @ vh).to(source.dtype)


class CrossFitted:
    """A main collaborative model with its fold models: `encode` reads each record with its user's out-of-fold model."""

    def __init__(self, main: CollaborativeModel, folds: list[CollaborativeModel], fold_seed: int, training_ids: set[str] | None = None):
        self.main, self.folds, self.fold_seed = main, folds, fold_seed
        self.training_ids = training_ids  # the records read out of fold (None: every record); the others read the main model
        table = main.model.item_embedding.weight.detach()[UNKNOWN + 1:]  # every item id, not padding or unknown
        fold_tables = [f.model.item_embedding.weight.detach()[UNKNOWN + 1:] for f in folds]
        self.rotations = [procrustes(fold_table, table) for fold_table in fold_tables]
        self.alignment_error = [float((fold_table @ r - table).norm() / table.norm())
                                for fold_table, r in zip(fold_tables, self.rotations, strict=True)]

    @classmethod
    def load(cls, main: CollaborativeModel, recorded: list[str] | None = None) -> CrossFitted:
        """The fold models trained beside `main` (its folds.json); with `recorded` fingerprints, only if they are those."""
        folds = read_folds(main.folder)
        if folds is None:
            raise UserError(f"{main.folder}: no fold models (folds.json). Train the model again with them (sdpo baseline --model "
                            f"{main.name} --data DIR --folds 5), or leave --collaborative_folds out.")
        models = [CollaborativeModel.load(Path(main.folder) / entry["path"], entry["sha256"], role="fold model")
                  for entry in folds["models"]]
        if recorded is not None and [m.sha256 for m in models] != list(recorded):
            raise UserError(f"{main.folder}: its fold models are not the ones this run was trained with (their fingerprints "
                            "differ). Give the collaborative model, with its folds, that the run was trained with.")
        if any(m.items.titles != main.items.titles for m in models):
            raise UserError(f"{main.folder}: a fold model has another item table than the main model. Train the folds again "
                            "with sdpo baseline --folds K.")
        return cls(main, models, folds["fold_seed"])

    def for_training(self, records: list[Record]) -> CrossFitted:
        """This cross-fitting applied to `records` only (a run's training records); every other record reads the main model."""
        fitted = CrossFitted.__new__(CrossFitted)
        fitted.__dict__.update(self.__dict__, training_ids={r.id for r in records})
        return fitted

    def fold_of(self, record: Record) -> int:
        """The record's out-of-fold model, or -1 for the main model (a record outside `training_ids`)."""
        if self.training_ids is not None and record.id not in self.training_ids:
            return -1
        if record.user in (None, ""):
            raise UserError(f"record {record.id} has no user id: out-of-fold signals need one (prepare the data again).")
        return fold_of(record.user, len(self.folds), self.fold_seed)

    def describe(self) -> list[dict[str, Any]]:
        """What a run records of the fold models: their fingerprints and how far their spaces were from the main one's."""
        return [{"sha256": f.sha256, "alignment_error": round(e, 4)} for f, e in zip(self.folds, self.alignment_error, strict=True)]

    @torch.no_grad()
    def encode(self, records: list[Record]) -> CollaborativeBatch:
        """As `CollaborativeModel.encode`, each record's row from its user's out-of-fold model, in the main model's space."""
        owners = torch.tensor([self.fold_of(r) for r in records])  # [B]
        rows: dict[str, torch.Tensor] | None = None
        for fold in owners.unique().tolist():
            if fold < 0:
                batch = self.main.encode(records)
                turned = {name: getattr(batch, name) for name in ("user", "history", "candidates", "scores", "history_known", "candidate_known")}
            else:
                batch, rotation = self.folds[fold].encode(records), self.rotations[fold]
                turned = {"user": batch.user @ rotation, "history": batch.history @ rotation, "candidates": batch.candidates @ rotation,
                          "scores": batch.scores, "history_known": batch.history_known, "candidate_known": batch.candidate_known}
            if rows is None:
                rows = turned
            mine = owners == fold
            for name, value in turned.items():
                rows[name] = torch.where(mine.view(-1, *[1] * (value.dim() - 1)), value, rows[name])
        return CollaborativeBatch(**rows)
