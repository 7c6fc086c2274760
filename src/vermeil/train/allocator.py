"""Keep freed memory in the process heap (glibc), so CPU training steps stop re-faulting their big tensors.

glibc's malloc serves every block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh
`mmap` and unmaps it on free, so a CPU training step page-faults its large tensors in again every step.
Measured on a 2-core machine, bench/llm.py's config (dim 512, 8 layers, vocab 32000, batch 4 x 512), three
steps interleaved in one process, median of 5:

    glibc default            transformers fp32 3.99 s   Vermeil fp32 4.28 s   Vermeil bf16 autocast 2.09 s
    keep_freed_memory()      transformers fp32 2.93 s   Vermeil fp32 3.01 s   Vermeil bf16 autocast 1.15 s

Raising both thresholds to their maximum keeps freed blocks in the heap for the next step (what jemalloc and
tcmalloc, which PyTorch's CPU performance guide recommends, do by design). The price: resident memory stays at
its peak. Small models gain nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Ask glibc's malloc (process-wide, not undone) to keep freed memory; False where that does not apply
    (not Linux, or not glibc). `vermeil train` calls it unless given `--default-malloc`."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success. Both are needed: the mmap threshold alone still lets glibc trim the top of
    # the heap, the trim threshold alone leaves big blocks to mmap.
    return bool(mallopt(_M_MMAP_THRESHOLD, _INT_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
