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
learned unknown vector. So that vector learns, training can hide a share of the known items
(``unknown_rate``, like dropout: in train mode only): they read the unknown vector as an unseen
item would.

By default soft tokens enter at the input. With late injection (``--collaborative_inject lora``) they
enter the first decoder layer that has LoRA instead (`injected_at`): the prompt runs the frozen layers
below as plain text (its placeholders as ordinary tokens), so those layers' states are the same for
every stage and are computed once (`sdpo.lm.trunk`, `sdpo.training.trunk_states`).

`CollaborativeTokens` holds the two projectors a run trains (items, and the user state) and is
attached to the base model as its ``collaborative_tokens`` module (`attach_collaborative_tokens`);
LoRA saves it beside the adapter (PEFT's ``modules_to_save``), so a checkpoint, a resumed run, a
best-model reload and a frozen reference copy (a second adapter) each carry their own projectors.
A batch that holds soft-token inputs (`SOFT_KEYS`, built by the prompts that place them) is
projected by the model's active copy in `packed_soft_tokens`; the scoring kernel calls it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# Soft-token inputs of a batch: positions [B, S] (-1: unused slot), raw vectors [B, S, D], whether a slot is the
# user token [B, S], whether its item has a vector [B, S], and the collaborative score of its item [B, S] (optional;
# [B, S, M] for a stack of M models).
SOFT_KEYS = ("soft_positions", "soft_vectors", "soft_user", "soft_known", "soft_scores")
MODULE = "collaborative_tokens"


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


@dataclass(frozen=True)
class SoftTokenSpec:
    """The shape of a run's projectors: the collaborative model's vector size, whether items carry their score, and how many
    scores (one per model of a stack, `sdpo.baselines.stack`)."""

    dim: int
    score_feature: bool = False
    seed: int = 0  # the projectors' initial weights are a function of it: the untrained reference is reproducible
    scores: int = 1
    layer: int = 0  # the decoder layer the soft tokens enter: 0 at the input, or the first layer with LoRA (late injection)


class CollaborativeTokens(nn.Module):
    """The item and user projectors of a run: raw collaborative inputs [B, S, ...] -> soft tokens [B, S, H]."""

    def __init__(self, spec: SoftTokenSpec, hidden_size: int, norm: float):
        super().__init__()
        self.score_feature = spec.score_feature
        self.layer = spec.layer  # 0: soft tokens replace input embeddings; L > 0: the states entering layer L (`injected_at`)
        self.unknown_rate = 0.0  # in train mode, the share of known items that read the unknown vector instead
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            self.items = Projector(spec.dim + spec.scores * int(spec.score_feature), hidden_size, norm)
            self.user = Projector(spec.dim, hidden_size, norm)

    def forward(self, vectors: torch.Tensor, is_user: torch.Tensor, known: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
        """`vectors` [B, S, D], `is_user` and `known` [B, S] bool, `scores` [B, S] or [B, S, M] (with the score feature) -> [B, S, H]."""
        items = vectors
        if self.score_feature:
            if scores is None:
                raise ValueError("these projectors read each item's collaborative score; the batch has none")
            items = torch.cat([vectors, (scores[..., None] if scores.dim() == 2 else scores).to(vectors.dtype)], dim=-1)
        if self.training and self.unknown_rate > 0:
            known = known & (torch.rand(known.shape, device=known.device) >= self.unknown_rate)
        return torch.where(is_user[..., None], self.user(vectors), self.items(items, known))


def set_unknown_rate(model, rate: float) -> None:
    """Give every copy of the model's projectors (PEFT keeps one per adapter) the training share of hidden known items."""
    for module in model.modules():
        if isinstance(module, CollaborativeTokens):
            module.unknown_rate = rate


def attach_collaborative_tokens(model, spec: SoftTokenSpec) -> CollaborativeTokens:
    """Give a base causal LM (not yet wrapped by PEFT) its fp32 projectors, as ``model.collaborative_tokens``."""
    device = model.get_input_embeddings().weight.device
    tokens = CollaborativeTokens(spec, model.config.hidden_size, token_embedding_norm(model)).to(device)
    setattr(model, MODULE, tokens)
    return tokens


def collaborative_tokens_of(model) -> nn.Module | None:
    """The model's projectors (through DDP and PEFT wrappers: PEFT's copy for the active adapter), or None."""
    from accelerate.utils import extract_model_from_parallel

    base = extract_model_from_parallel(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    return getattr(base, MODULE, None)


def packed_soft_tokens(model, packed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(positions [B, S], soft tokens [B, S, H]) of a batch holding soft-token inputs; None for a text-only batch."""
    if "soft_positions" not in packed:
        return None
    tokens = collaborative_tokens_of(model)
    if tokens is None:
        raise ValueError("the batch holds collaborative tokens, but the model has no projectors for them")
    vectors = tokens(packed["soft_vectors"], packed["soft_user"], packed["soft_known"], packed.get("soft_scores"))
    return packed["soft_positions"], vectors


def injection_layer(model) -> int:
    """The decoder layer the model's soft tokens enter (0: at the input; also for a model without them)."""
    tokens = collaborative_tokens_of(model)
    return 0 if tokens is None else tokens.layer


def inject(hidden: torch.Tensor, positions: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """`hidden` [B, L, H] with row b's position ``positions[b, s]`` replaced by ``soft[b, s]`` scaled to the norm it replaces.

    Late injection: the states entering a middle layer are far larger than token embeddings, so each
    soft token takes the norm of the state it replaces (its direction is the projector's).
    """
    used = positions >= 0  # [B, S]
    rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
    replaced = hidden[rows[used], positions[used]]  # [U, H]
    vectors = soft[used].to(hidden.dtype)
    vectors = vectors * (replaced.norm(dim=-1, keepdim=True) / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    return hidden.index_put((rows[used], positions[used]), vectors)


@contextmanager
def injected_at(layer: nn.Module, positions: torch.Tensor, soft: torch.Tensor):
    """While in the block, every call of `layer` over the whole prompt gets the soft tokens in its input states (`inject`).

    A call over fewer positions than the prompt holds (a generation step, the prompt in the key-value cache) is left as it is.
    """
    needed = int(positions.max()) + 1 if positions.numel() else 0

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if needed == 0 or hidden.shape[1] < needed:
            return None
        hidden = inject(hidden, positions.to(hidden.device), soft.to(hidden.device))
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def set_injection_layer(model, layer: int) -> None:
    """Make every copy of the model's projectors (PEFT keeps one per adapter) put its soft tokens into layer `layer`."""
    for module in model.modules():
        if isinstance(module, CollaborativeTokens):
            module.layer = layer
