"""Soft tokens: collaborative vectors projected into the LM's input embedding space, placed at prompt positions.

A soft token is a prompt position whose input embedding is a projected vector instead of its
token's embedding (LLaRA, CoLLM, A-LLMRec feed a sequential model's vectors this way). The
prompt keeps an ordinary token id there, a placeholder, so tokenising, packing and padding are
unchanged; `embed_with_soft_tokens` swaps the embeddings at the given positions, and the model
runs on ``inputs_embeds``.

`Projector` maps one kind of vector (item vectors, or user states) to the LM's hidden size: two
linear layers with a GELU between, each output rescaled to the mean norm of the LM's token
embeddings (`token_embedding_norm`), so a soft token enters the first decoder layer at the scale
that layer was trained on. An item the collaborative model has no id for gets the projector's
learned unknown vector.
"""

from __future__ import annotations

import torch
from torch import nn


def token_embedding_norm(model) -> float:
    """The mean L2 norm of the rows of the LM's input embedding matrix."""
    weight = model.get_input_embeddings().weight
    return float(weight.detach().float().norm(dim=-1).mean())


class Projector(nn.Module):
    """Vectors [..., D] -> input embeddings [..., H], each of norm `norm`; rows marked unknown use a learned vector."""

    def __init__(self, in_dim: int, hidden_size: int, norm: float, width: int | None = None):
        super().__init__()
        width = width or hidden_size
        self.unknown = nn.Parameter(torch.zeros(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, hidden_size))
        self.register_buffer("norm", torch.tensor(float(norm)))

    def forward(self, vectors: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """`vectors` [..., D] (and `known` [...], False where the item has no vector) -> [..., H]."""
        if known is not None:
            vectors = torch.where(known[..., None], vectors, self.unknown.to(vectors.dtype))
        out = self.net(vectors)
        return out * (self.norm / out.norm(dim=-1, keepdim=True).clamp_min(1e-6))


def embed_with_soft_tokens(model, input_ids: torch.Tensor, positions: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Input embeddings [B, L, H] of `input_ids` [B, L], with row b's position ``positions[b, s]`` replaced by ``soft[b, s]``.

    `positions` [B, S] holds prompt positions (-1: no soft token in that slot); `soft` [B, S, H]
    the projected vectors. Differentiable in `soft` (the projector trains through it) and in the
    embedding matrix elsewhere; the result is in the embeddings' dtype.
    """
    embeds = model.get_input_embeddings()(input_ids)  # [B, L, H]
    used = positions >= 0  # [B, S]
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
    return embeds.index_put((rows[used], positions[used]), soft[used].to(embeds.dtype))
