"""Prompts with collaborative tokens, and the inputs of their soft tokens from a frozen sequential model.

`CollaborativePrompts` is what SFT, align, evaluation and the recommender use in place of
`sdpo.data.prompts.TextPrompts` when a run reads a collaborative model (``--collaborative DIR``):
the same phrasing with a placeholder beside every history and candidate title and on a user line
(`sdpo.data.collaborative_prompts`), and for a batch the raw inputs the LM's projectors turn into
soft tokens (`sdpo.lm.soft_tokens.SOFT_KEYS`):

- ``soft_positions`` [B, S]: the placeholders' positions in each prompt (-1 pads to S, the most slots);
- ``soft_vectors`` [B, S, D]: the item vector of each history and candidate title, then the user state;
- ``soft_user`` [B, S]: True at the user slot; ``soft_known`` [B, S]: False where a title has no id;
- ``soft_scores`` [B, S] (with the score feature): the model's score of the slot's item, the dot product
  of the user state and its vector, minus the record's best score of a known candidate (0 for the model's top pick);
  ``soft_scores`` [B, S, M] for a stack of M models (`sdpo.baselines.stack`), each member's own.
"""

from __future__ import annotations

import torch

from sdpo.baselines.collaborative import CollaborativeBatch, CollaborativeModel
from sdpo.data.collaborative_prompts import collaborative_prompt_ids, placeholder_token
from sdpo.data.records import Record


class CollaborativePrompts:
    """Records -> prompt ids with placeholders, and batches -> the soft-token inputs of those placeholders."""

    def __init__(self, tokenizer, domain: str, seed: int, model: CollaborativeModel, place: str = "before", score: bool = False):
        self.tokenizer, self.domain, self.seed, self.model, self.place, self.score = tokenizer, domain, seed, model, place, score
        self.marker_id = placeholder_token(tokenizer)[1]

    def ids(self, record: Record) -> list[int]:
        """The prompt ids of `record`, a placeholder beside every title and one for the user."""
        return collaborative_prompt_ids(self.tokenizer, record, self.domain, self.seed, self.place)[0]

    def soft_inputs(self, records: list[Record], prompt_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """The soft-token inputs (shapes in the module docstring) of a batch whose prompts `ids` built."""
        batch = self.model.encode(records)
        slots = max(len(r.history) + len(r.candidates) + 1 for r in records)
        size, dim = len(records), batch.user.shape[-1]
        positions = torch.full((size, slots), -1, dtype=torch.long)
        vectors = torch.zeros(size, slots, dim)
        is_user = torch.zeros(size, slots, dtype=torch.bool)
        known = torch.zeros(size, slots, dtype=torch.bool)
        for b, (record, ids) in enumerate(zip(records, prompt_ids, strict=True)):
            found = [i for i, token in enumerate(ids) if token == self.marker_id]
            start = batch.history.shape[1] - len(record.history)  # histories are left-padded
            n_candidates = len(record.candidates)
            rows = torch.cat([batch.history[b, start:], batch.candidates[b, :n_candidates], batch.user[b, None]])
            if len(found) != len(rows):
                raise ValueError(f"record {record.id}: {len(found)} placeholders in its prompt for {len(rows)} soft tokens")
            n = len(rows)
            positions[b, :n] = torch.tensor(found)
            vectors[b, :n] = rows
            is_user[b, n - 1] = True
            known[b, :n] = torch.cat([batch.history_known[b, start:], batch.candidate_known[b, :n_candidates], torch.ones(1, dtype=torch.bool)])
        inputs = {"soft_positions": positions, "soft_vectors": vectors, "soft_user": is_user, "soft_known": known}
        if self.score:
            segments = getattr(self.model, "segments", None)
            inputs["soft_scores"] = (self._scores(batch, vectors) if segments is None else
                                     torch.stack([self._scores(part, part_vectors) for part, part_vectors in _members(batch, vectors, segments)],
                                                 dim=-1))  # a stack: [B, S, M], one score per member
            unused = is_user | (positions < 0)
            inputs["soft_scores"] = inputs["soft_scores"].masked_fill(unused if segments is None else unused[..., None], 0.0)
        return inputs

    @staticmethod
    def _scores(batch: CollaborativeBatch, vectors: torch.Tensor) -> torch.Tensor:
        """[B, S]: each slot's score (user state . vector) minus the record's best score of a known candidate."""
        best = batch.scores.masked_fill(~batch.candidate_known, float("-inf")).max(dim=-1).values  # [B], over known candidates
        best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
        return torch.einsum("bd,bsd->bs", batch.user, vectors) - best[:, None]


def _members(batch: CollaborativeBatch, vectors: torch.Tensor, segments: list[int]):
    """A stack's batch and slot vectors [B, S, sum D] cut into its members' ([B, S, D_m] each, their scores [B, C])."""
    start = 0
    for m, width in enumerate(segments):
        part = CollaborativeBatch(user=batch.user[..., start:start + width], history=batch.history[..., start:start + width],
                                  history_known=batch.history_known, candidates=batch.candidates[..., start:start + width],
                                  candidate_known=batch.candidate_known, scores=batch.scores[..., m])
        yield part, vectors[..., start:start + width]
        start += width
