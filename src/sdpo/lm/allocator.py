"""Two glibc malloc settings, for speed and for honest memory measurements.

- `keep_freed_memory`: a training step of the ID baselines allocates and frees tensors of
  tens of MB (the score of every item at every history position). By default glibc hands
  that memory back to the kernel as soon as it is freed, so the next step page-faults it in
  again: on a 2-core CPU about half of GRU4Rec's step time went to the kernel. Keeping a pad
  of freed memory at the top of the heap (``M_TOP_PAD``) makes those steps about 2x faster
  (docs/benchmark.md, "Classic baselines"). It is not used for the LM stages: there it made
  a SmolLM2 S-DPO step slower (median 5.96 s against 4.79 s, benchmarks/lm_step_malloc.py).
- `return_freed_memory`: the opposite, for `sdpo benchmark step`, which reads peak memory
  from the process's resident size: every block over 1 MiB gets its own mapping, so freeing
  it lowers the resident size and one step's peak does not hide the next one's.

Elsewhere (macOS, musl, Windows) both do nothing and say so by returning False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TOP_PAD, M_MMAP_THRESHOLD = -2, -3  # mallopt parameters, from glibc's <malloc.h>


def _mallopt(parameter: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(parameter, value) == 1


def keep_freed_memory(pad_bytes: int = 1 << 30) -> bool:
    """Ask malloc to keep up to `pad_bytes` of freed memory for reuse; True if it agreed."""
    return _mallopt(M_TOP_PAD, pad_bytes)


def return_freed_memory(threshold_bytes: int = 1 << 20) -> bool:
    """Ask malloc to map blocks over `threshold_bytes` on their own; True if it agreed."""
    return _mallopt(M_MMAP_THRESHOLD, threshold_bytes)
