"""Keep freed memory in the process on CPU training (glibc): fewer page faults per step.

Why: every training step frees and re-allocates the same activation buffers (megabytes each). With glibc's
defaults, buffers above a (dynamic) mmap threshold are returned to the kernel when freed and a shrinking heap is
trimmed, so the next step faults the same pages back in, zero-filled by the kernel: about 8-11k page faults per
step for the tiny test model (a quarter of its step time) and ~24k per MiniLM step, measured with /usr/bin/time
(docs/benchmarks.md). Here allocations up to 32 MB (glibc's maximum threshold) come from the heap and freed heap
memory is kept for reuse. The process's peak memory hardly changes (the peak recurs every step anyway); it just
is not handed back between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free memory at the top of the heap


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring). True if glibc accepted both; False on
    other C libraries (musl, macOS), where nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
