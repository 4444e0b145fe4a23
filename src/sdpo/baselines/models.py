"""Compact sequential recommenders. Each maps a batch of histories to one vector per user;
an item's score is that vector's dot product with the item's embedding.

Histories are [B, L] item ids, left-padded with 0 (most recent item last).
"""

from __future__ import annotations

import torch
from torch import nn

from sdpo.baselines.items import PAD


class SequentialRecommender(nn.Module):
    def __init__(self, n_items: int, dim: int):
        super().__init__()
        self.item_embedding = nn.Embedding(n_items, dim, padding_idx=PAD)
        # Small scores at the start, as in Caser's code (PyTorch's N(0, 1) default gives
        # logits of size ~sqrt(dim) and killed Caser's ReLU units in the first steps).
        nn.init.normal_(self.item_embedding.weight, std=1.0 / dim)
        with torch.no_grad():
            self.item_embedding.weight[PAD].zero_()

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L, D]: a user state after every position (only the last is used by some)."""
        raise NotImplementedError

    def forward(self, histories: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, D]: the user's state after the most recent item."""
        return self.encode(histories)[:, -1]

    def score(self, histories: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of candidate items [B, C] for each history."""
        return torch.einsum("bd,bcd->bc", self(histories), self.item_embedding(items))

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., n_items]: scores of every item."""
        return states @ self.item_embedding.weight.T


class SASRec(SequentialRecommender):
    """Self-attentive sequential recommendation (Kang & McAuley, 2018): causal self-attention
    blocks over item + learned position embeddings, trained to predict the next item at every
    position."""

    predicts_every_position = True

    def __init__(self, n_items: int, max_len: int, dim: int = 64, blocks: int = 2, heads: int = 1, dropout: float = 0.2):
        super().__init__(n_items, dim)
        self.heads = heads
        self.position_embedding = nn.Embedding(max_len, dim)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim, dropout=dropout, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        length = histories.shape[1]
        positions = torch.arange(length, device=histories.device)
        x = self.item_embedding(histories) * self.item_embedding.embedding_dim**0.5 + self.position_embedding(positions)
        x = self.dropout(x) * (histories != PAD).unsqueeze(-1)
        x = self.blocks(x, mask=self.attention_mask(histories))
        return self.norm(x)

    def attention_mask(self, histories: torch.Tensor) -> torch.Tensor:
        """[B * heads, L, L] additive mask: causal, padding keys hidden; a padding query sees
        itself only (its output is never used, and no softmax row is empty)."""
        length = histories.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=histories.device).tril()
        key_is_item = (histories != PAD)[:, None, :]  # [B, 1, L]
        diagonal = torch.eye(length, dtype=torch.bool, device=histories.device)
        allowed = (causal & key_is_item) | diagonal  # [B, L, L]
        mask = torch.zeros(allowed.shape, device=histories.device).masked_fill(~allowed, float("-inf"))
        return mask.repeat_interleave(self.heads, dim=0)


class GRU4Rec(SequentialRecommender):
    """Session-based recommendation with a GRU over item embeddings (Hidasi et al., 2016)."""

    predicts_every_position = True

    def __init__(self, n_items: int, dim: int = 64, layers: int = 1, dropout: float = 0.2):
        super().__init__(n_items, dim)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers=layers, batch_first=True)

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.dropout(self.item_embedding(histories)))
        return states


class Caser(SequentialRecommender):
    """Convolutional sequence embedding (Tang & Wang, 2018): horizontal filters of heights 1..L
    (max-pooled over time) and vertical filters over the last L items."""

    predicts_every_position = False

    def __init__(self, n_items: int, window: int = 5, dim: int = 64, horizontal: int = 16, vertical: int = 4, dropout: float = 0.3):
        super().__init__(n_items, dim)
        self.window = window
        self.horizontal = nn.ModuleList(nn.Conv2d(1, horizontal, (h, dim)) for h in range(1, window + 1))
        self.vertical = nn.Conv2d(1, vertical, (window, 1))
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Linear(horizontal * window + vertical * dim, dim)

    def encode(self, histories: torch.Tensor) -> torch.Tensor:
        recent = histories[:, -self.window :]
        if recent.shape[1] < self.window:  # pad short histories on the left
            recent = nn.functional.pad(recent, (self.window - recent.shape[1], 0), value=PAD)
        x = self.item_embedding(recent).unsqueeze(1)  # [B, 1, L, D]
        pooled = [torch.relu(conv(x)).squeeze(3).max(dim=2).values for conv in self.horizontal]  # each [B, F]
        vertical = self.vertical(x).flatten(1)  # [B, V * D]
        state = torch.relu(self.project(self.dropout(torch.cat([*pooled, vertical], dim=1))))
        return state.unsqueeze(1)  # [B, 1, D]: one state, after the last item
