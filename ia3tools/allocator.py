"""glibc's allocator, tuned for streaming: the commands work in cache- and block-sized numpy
temporaries (256 KB to 4 MB), just above glibc's default mmap threshold (128 KB, raised only as
mapped blocks are freed) and its trim threshold. Left alone, many of them are mapped, page-faulted
in and unmapped again on every block: measured, a third of ``extract``'s time on a 2 GB fp16 pair
went to the kernel. Called by the command line only: an importing program keeps its allocator."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 16 << 20  # blocks below this come from the heap, and are reused
TRIM_THRESHOLD = 64 << 20  # freed memory kept at the heap's top before it is returned


def tune() -> bool:
    """Set the thresholds; False where the C library is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
