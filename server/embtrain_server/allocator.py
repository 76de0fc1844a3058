"""The process's host memory allocator: keep freed memory for the next batch instead of giving it back to the kernel.

Every batch allocates and frees the same large temporaries: distance matrices, masks, gradients, the aligned copy
of the request's tensors and the encoded answer. glibc's malloc serves blocks above its mmap threshold (128 KiB at
first, raised as blocks are freed, never above 32 MiB) with a fresh ``mmap`` and returns them with ``munmap``, and
gives the top of a heap back as soon as more than the trim threshold is free there. So each batch faulted its
temporaries in again, page by page, zero-filled by the kernel. With both thresholds at ``malloc_retain_bytes`` the
blocks stay in the heap and are reused: a 1024 x 512 ``batch_hard_triplet`` batch on 2 cores took 20.4 ms with
6 ms of system time before, 15.1 ms with 1 ms after; a 4096 x 512 one 192 ms (61 ms system) before, 154 ms (17 ms)
after (``bench/allocator.py``).

The cost is resident memory: freed memory up to that amount stays with the process (the high-water mark of the
batches, not a leak). 0 leaves glibc's own dynamic thresholds. Set ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or ``glibc.malloc`` tunables in ``GLIBC_TUNABLES`` to choose
otherwise: glibc reads those at start, and the server then leaves the allocator alone. Other C libraries are left
alone too.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# mallopt takes an int.
MAX_RETAIN_BYTES = 2**31 - 1
_OLD_GLIBC_MAX_MMAP = 32 * 1024 * 1024
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def retain_freed_memory(retain_bytes: int, environ: Mapping[str, str] = os.environ) -> str:
    """Set glibc's trim and mmap thresholds to ``retain_bytes`` for this process; returns what was done, in words
    (for the start-up log). Nothing changes for 0, under another C library, or when the environment already sets
    the allocator."""
    if not 0 <= retain_bytes <= MAX_RETAIN_BYTES:
        raise ValueError(f"malloc_retain_bytes: expected 0..{MAX_RETAIN_BYTES}, got {retain_bytes}")
    if retain_bytes == 0:
        return "glibc's own thresholds (malloc_retain_bytes 0)"
    chosen = [k for k in _USER_SETTINGS if k in environ]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"left as the environment sets it ({', '.join(chosen)})"
    if platform.libc_ver()[0] != "glibc":
        return "left alone (not glibc)"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The mmap threshold first: a trim threshold alone keeps the heap's top but still maps each large block afresh
    # (measured slower than neither). Older glibc refuses an mmap threshold above 32 MiB: then that.
    mmap_bytes = next((b for b in (retain_bytes, min(retain_bytes, _OLD_GLIBC_MAX_MMAP))
                       if mallopt(M_MMAP_THRESHOLD, b)), 0)
    if not mmap_bytes or not mallopt(M_TRIM_THRESHOLD, retain_bytes):
        return "left alone (glibc refused the thresholds)"
    return (f"freed memory up to {retain_bytes} bytes is kept for reuse (glibc trim threshold; blocks up to "
            f"{mmap_bytes} bytes from the heap)")
