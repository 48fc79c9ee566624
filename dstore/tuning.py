"""Process-wide tuning applied when a server starts.

glibc's malloc serves blocks above a dynamic threshold with mmap and gives freed heap
back to the kernel eagerly. Our hot paths allocate a fresh 64–256 KiB buffer per socket
read; with the defaults that churns mmap/munmap or heap trimming and page faults on every
read (measured: ~1 s of kernel time per GiB received on a storage node). A fixed 64 MiB
mmap threshold and a 256 MiB trim threshold let those buffers be reused from the heap.
Elsewhere (not glibc) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """True if the allocator was tuned."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_threshold)
    )
