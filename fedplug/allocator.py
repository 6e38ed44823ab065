"""Make the C allocator give large freed blocks back to the kernel at once (glibc; a no-op elsewhere).

glibc serves a large ``malloc`` with its own ``mmap`` and unmaps it on ``free``
-- but after each such free it raises its threshold to the freed size (up to
32 MiB), so the next tensors of that size come from the heap, and a heap keeps
what it is given.  A server that allocates a model-sized accumulator every
round then grows by the model each round it cannot trim.  Fixing the
threshold (``mallopt(M_MMAP_THRESHOLD)``) switches that adjustment off: every
block of at least ``mmap_threshold`` bytes is the kernel's again when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def return_freed_memory_promptly(mmap_threshold: int = 1 << 20, trim_threshold: int = 8 << 20) -> bool:
    """Whether the thresholds were set (False off glibc, where nothing is changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                    int(trim_threshold)))
