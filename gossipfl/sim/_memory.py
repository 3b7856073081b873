"""Keep freed memory in the process: the vectorised engine frees and re-allocates the same
megabyte-sized buffers every round (activations, gradients, gathered minibatches).

glibc's malloc returns such blocks to the kernel (``munmap`` above its dynamic mmap threshold,
``sbrk`` trimming above twice that), and the kernel then zero-fills every 4 KiB page again on first
touch: measured at N = 256 nodes (MLP, digits), about 1 200 page faults per round and a third of
the round's time. Raising both thresholds once keeps the blocks in the heap for reuse. Other
allocators (musl, jemalloc, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_MAX = 32 * 2**20  # glibc's ceiling for the mmap threshold on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM = 1 << 30  # return the heap's free top to the kernel only above 1 GiB
_done = False


def keep_freed_memory() -> bool:
    """Ask glibc (once per process) to keep freed blocks below 32 MiB; True if it took effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM))
    return _done
