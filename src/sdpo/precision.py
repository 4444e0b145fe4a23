"""Numeric precision: bf16 where the hardware computes it natively, fp32 elsewhere.

"bf16" in sdpo means mixed precision done the usual way:

- the frozen base weights are *stored* in bf16 (loaded that way, never recast per step);
- LoRA weights, their gradients and the optimizer state stay in fp32 (PEFT upcasts adapter
  weights when it loads them onto a bf16 model);
- matmuls and attention run in bf16 under ``torch.autocast``, so the LoRA products run in
  bf16 too instead of upcasting every activation they touch to fp32;
- log-softmax, logsumexp and the losses are computed in fp32 (`scoring.answer_logprobs`
  upcasts the logits before normalising them).

Whether a run uses bf16 is decided once, by `resolve_bf16`: on by default where the device
computes bf16 natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX on x86, or
the BF16 extension on Arm), off elsewhere. A CPU without those instructions emulates bf16 and
is several times *slower* than fp32; asking for bf16 there still works, with a warning.
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from functools import lru_cache
from pathlib import Path

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
X86_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports in /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_bf16() -> bool:
    """True if the CPU has native bf16 arithmetic (AVX512-BF16 / AMX-BF16 on x86, BF16 on Arm)."""
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return bool(X86_BF16_FLAGS & flags)


def cpu_name() -> str:
    """The CPU model name, for benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_supported(device: str | torch.device | None = None) -> bool:
    """Whether `device` (default: CUDA if present, else the CPU) computes bf16 natively."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return cpu_has_bf16()
    return False


def resolve_bf16(requested: bool | None, device: str | torch.device | None = None) -> bool:
    """The precision a run uses: `requested` if given (warning where bf16 is emulated), else the hardware default."""
    if requested is None:
        return bf16_supported(device)
    if requested and not bf16_supported(device):
        warnings.warn(
            "bf16 was asked for, but this device has no native bf16 arithmetic (on a CPU: no AVX512-BF16/AMX); "
            "it is emulated and slower than fp32. Pass --no_bf16 for fp32.",
            stacklevel=2,
        )
    return bool(requested)


def model_dtype(bf16: bool) -> torch.dtype:
    """The dtype the frozen base weights are stored in."""
    return torch.bfloat16 if bf16 else torch.float32


def compute_context(weight: torch.Tensor):
    """``torch.autocast`` in the dtype of the base weights if they are low precision, else nothing.

    Called around every forward pass of a model whose frozen weights may be bf16, so the
    fp32 LoRA weights are used in bf16 too and the policy, the reference table and the
    evaluation all compute the same way.
    """
    if weight.dtype in LOW_PRECISION:
        return torch.autocast(device_type=weight.device.type, dtype=weight.dtype)
    return contextlib.nullcontext()
