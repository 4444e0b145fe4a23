"""Numeric precision: bf16 where the hardware computes it natively and faster, fp32 elsewhere.

"bf16" in sdpo means mixed precision done the usual way:

- the frozen base weights are *stored* in bf16 (loaded that way, never recast per step);
- LoRA weights, their gradients and the optimizer state stay in fp32 (PEFT upcasts adapter
  weights when it loads them onto a bf16 model);
- the decoder's matmuls and attention run in bf16 under ``torch.autocast``, so the LoRA
  products run in bf16 too instead of upcasting every activation they touch to fp32;
- the LM head computes fp32 logits from the bf16 hidden states (`sdpo.lm.head`), and
  log-softmax, logsumexp and the losses are computed in fp32.

Whether a run uses bf16 is decided once, by `resolve_bf16`: on by default where the device
computes bf16 natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX on x86, or
the BF16 extension on Arm) and, on a CPU, a bf16 matrix product measures at least
`CPU_BF16_MIN_SPEEDUP` times as fast as an fp32 one; off elsewhere. The flags alone mislead:
an Intel Xeon that reports AVX512-BF16 multiplied bf16 matrices at 0.4-0.65x its fp32 speed.
A CPU without those instructions emulates bf16 and is several times *slower* than fp32.
Asking for bf16 where it is not the default still works, with a warning.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
X86_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
CPU_BF16_MIN_SPEEDUP = 1.5   # below this, bf16's rounding is not worth its speed on a CPU


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


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU model name, for benchmark records, with its family and model numbers where /proc/cpuinfo gives them.

    Virtual machines often name only the line ("AMD EPYC"); the family and model tell its generation
    (family 23 model 1: Zen 1; family 25 model 1: Zen 3), which sets its speed and its bf16 support.
    """
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip() and fields:
            break  # the first processor's block is enough
    name = fields.get("model name") or platform.processor() or platform.machine()
    if fields.get("cpu family") and fields.get("model"):
        return f"{name} (family {fields['cpu family']} model {fields['model']})"
    return name


@lru_cache(maxsize=1)
def cpu_bf16_matmul_speedup(rows: int = 512, inner: int = 576, cols: int = 1536, repeats: int = 5) -> float:
    """fp32 time over bf16 time of one matrix product on this CPU, measured once per process.

    A (rows x inner) @ (inner x cols) product, by default about the size of SmolLM2-135M's MLP
    on a batch of 512 tokens (0.9 GFLOP, a few ms), timed `repeats` times in each dtype after a
    warm-up, the dtypes alternating; the ratio of the medians (above 1: bf16 is faster).
    """
    timings: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    generator = torch.Generator().manual_seed(0)
    operands = {dtype: (torch.randn(rows, inner, generator=generator).to(dtype), torch.randn(inner, cols, generator=generator).to(dtype))
                for dtype in timings}
    for a, b in operands.values():  # warm-up
        a @ b
    for _ in range(repeats):
        for dtype, (a, b) in operands.items():
            start = time.perf_counter()
            a @ b
            timings[dtype].append(time.perf_counter() - start)
    return statistics.median(timings[torch.float32]) / statistics.median(timings[torch.bfloat16])


def _cpu_bf16_shortfall() -> str | None:
    """Why bf16 is not this CPU's default (None where it is)."""
    if not cpu_has_bf16():
        return "this CPU has no native bf16 arithmetic (no AVX512-BF16/AMX), so bf16 is emulated and slower than fp32"
    speedup = cpu_bf16_matmul_speedup()
    if speedup < CPU_BF16_MIN_SPEEDUP:
        return (f"this CPU, though it reports native bf16, multiplies bf16 matrices at {speedup:.2f}x its fp32 speed "
                f"(bf16 is the default from {CPU_BF16_MIN_SPEEDUP}x)")
    return None


def _bf16_shortfall(device: str | torch.device | None) -> str | None:
    """Why bf16 is not `device`'s default (None where it is)."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return None if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "this GPU has no bf16 support"
    if kind == "cpu":
        return _cpu_bf16_shortfall()
    return f"sdpo does not use bf16 on {kind}"


def bf16_supported(device: str | torch.device | None = None) -> bool:
    """Whether bf16 is `device`'s default (default device: CUDA if present, else the CPU).

    On a GPU: whether it computes bf16. On a CPU: whether it has native bf16 instructions and
    multiplies bf16 matrices at least `CPU_BF16_MIN_SPEEDUP` times as fast as fp32 ones.
    """
    return _bf16_shortfall(device) is None


def resolve_bf16(requested: bool | None, device: str | torch.device | None = None) -> bool:
    """The precision a run uses: `requested` if given (warning where bf16 is not the default), else the default."""
    if requested is None:
        return bf16_supported(device)
    shortfall = _bf16_shortfall(device) if requested else None
    if shortfall is not None:
        warnings.warn(f"bf16 was asked for, but {shortfall}. Pass --no_bf16 for fp32.", stacklevel=2)
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
