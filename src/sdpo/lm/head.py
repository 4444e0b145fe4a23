"""The LM head in fp32 on a bf16 model: logits fine enough to tell near-equal scores apart.

With bf16 base weights the decoder layers run under bf16 autocast, and so, before this module,
did the LM head: its logits came out in bf16, whose 8-bit mantissa resolves steps of 0.125 at a
magnitude of 16-32. Summed over an answer's tokens, that rounding moved log-probs by up to 0.6
nats between two computations of the same answer, and swapped near-tied first choices.

`fp32_head` makes the head compute in fp32 while in the block: it takes the hidden states
``.float()`` and multiplies them by its weight ``.float()`` with autocast disabled, so the
logits are fp32 products of the bf16 hidden states and the bf16 weights. The decoder
layers stay in bf16. The head's weight may be tied to the input embeddings (SmolLM2); the fp32
copy is made per call (V x H x 4 bytes, 113 MB for SmolLM2-135M, kept for backward while
training), and gradients reach the hidden states, and the weight if it trains, through it.

Which layer is "plain": the head itself when it is an ``nn.Linear`` with a bf16 or fp16 weight,
or the base layer of a PEFT wrapper around it (LoRA on ``lm_head``: the wrapper then runs with
autocast off too, and adds its fp32 update to the fp32 product). A head with fp32 weights (an fp32 run, or QLoRA training, where PEFT casts
the head to fp32) and a quantised one (4-bit or 8-bit bitsandbytes layers, whose weights are
packed integers) run as they are: fp32 runs compute exactly what they computed before.

`low_precision_head` turns this off inside its block, so `sdpo benchmark precision` can set
the fp32 head against the all-bf16 computation it replaced, in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from sdpo.lm.precision import LOW_PRECISION

_FP32_HEAD: ContextVar[bool] = ContextVar("sdpo_fp32_head", default=True)


@contextmanager
def low_precision_head() -> Iterator[None]:
    """Inside the block, a bf16 model's LM head runs in bf16 as the decoder does (sdpo's computation before the fp32 head).

    For `sdpo benchmark precision`, which measures the fp32 head against it; nothing else uses it.
    """
    token = _FP32_HEAD.set(False)
    try:
        yield
    finally:
        _FP32_HEAD.reset(token)


def low_precision_linear(lm_head: torch.nn.Module) -> torch.nn.Linear | None:
    """The plain linear layer of `lm_head` (itself, or the base layer of a PEFT wrapper) if its weight is bf16 or fp16, else None.

    None for fp32 weights and for quantised layers (their weights are integer tensors), and
    inside `low_precision_head`: those heads run as they are.
    """
    linear = lm_head.get_base_layer() if hasattr(lm_head, "get_base_layer") else lm_head
    if not _FP32_HEAD.get() or not isinstance(linear, torch.nn.Linear) or linear.weight.dtype not in LOW_PRECISION:
        return None
    return linear


def fp32_linear(linear: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """[..., V] fp32 logits of hidden states [..., H] (any dtype): hidden and weight upcast, autocast off."""
    bias = None if linear.bias is None else linear.bias.float()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), linear.weight.float(), bias)


@contextmanager
def _forward_replaced(module: torch.nn.Module, forward: Callable[..., torch.Tensor]) -> Iterator[None]:
    """`module` calls `forward` while in the block; a forward it had of its own (an accelerate hook, say) is back after it."""
    own = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        del module.forward
        if own is not None:
            module.forward = own


def _without_autocast(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`forward` called on fp32 hidden states with autocast off: a PEFT wrapper's own update (LoRA on the head) in fp32 too."""
    def run(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return forward(hidden.float(), *args, **kwargs)

    return run


@contextmanager
def fp32_head(lm_head: torch.nn.Module) -> Iterator[None]:
    """While in the block, every call of `lm_head` (from `head_logits`, the model's forward or ``generate``) computes in fp32.

    The head's plain linear layer (`low_precision_linear`) computes as `fp32_linear`; a PEFT
    wrapper around it runs with autocast off on fp32 hidden states. Nothing changes for an fp32
    or quantised head.
    """
    linear = low_precision_linear(lm_head)
    if linear is None:
        yield
        return
    with _forward_replaced(linear, lambda hidden: fp32_linear(linear, hidden)):
        if lm_head is linear:
            yield
            return
        with _forward_replaced(lm_head, _without_autocast(lm_head.forward)):
            yield


def head_logits(lm_head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[N, V] fp32 logits of hidden states [N, H]: the head in fp32 on a bf16 model (`fp32_head`), as it is on an fp32 one.

    Called where the model's compute context (bf16 autocast, or none) is on, as the decoder was:
    an fp32 head gives the same values as calling it directly, bit for bit.
    """
    with fp32_head(lm_head):
        return lm_head(hidden).float()


def head_precision_key(lm_head: torch.nn.Module, dtype: torch.dtype) -> str:
    """The precision as the key of a cache of scores records it: the base weights' `dtype`, and that `lm_head` computes in fp32 where it does.

    A reference table made with the all-bf16 head is then not reused by a bf16 run; the keys of
    fp32 runs (and of heads `fp32_head` leaves as they are) stay ``str(dtype)``, as they were.
    """
    return f"{dtype}, fp32 lm_head" if low_precision_linear(lm_head) is not None else str(dtype)
