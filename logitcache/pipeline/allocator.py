"""Keep freed CPU memory in the process instead of handing it back to the kernel after every step.

Why: on CPU, a training step allocates and frees the same large tensors every step (the logits,
[batch x length, vocabulary], are hundreds of MB at V=32k). glibc serves any allocation above
its mmap threshold (at most 32 MiB by default) with a fresh ``mmap`` and unmaps it on free, so
every step faults in and zeroes those pages again. Measured on the quality benchmark's 32k
student on 2 CPU cores: 45% of the training time was kernel time, and a step took 0.70 s
instead of 0.47 s; the full-logit teacher row 2.9 s instead of 1.5 s (benchmarks/RESULTS.md).
Raising the thresholds makes freed blocks reusable from the heap. The price is that the
process keeps its peak memory until it exits, which suits a command-line run (and is what a
GPU caching allocator does anyway); a program that uses the API calls ``retain_freed_memory()`` itself if it wants the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest one it can hold
TOP_PAD = 64 << 20  # grow the heap in 64 MiB steps, not page by page

# A user who tuned glibc's malloc through the environment keeps their settings.
_USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def retain_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks for reuse; True if it was changed.

    A no-op (False) off Linux, on another C library (musl has no mallopt), when the user set
    glibc's malloc variables, or with ``LOGITCACHE_RETAIN_MEMORY=0``.
    """
    if not sys.platform.startswith("linux") or os.environ.get("LOGITCACHE_RETAIN_MEMORY", "1") == "0":
        return False
    if any(v in os.environ for v in _USER_VARS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Order matters: setting the mmap threshold first also turns off glibc's dynamic adjustment.
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))
