"""Keep freed buffers for reuse under glibc, so repeated network fusions do not page-fault them anew.

Why: a 2-D network fusion of a 256² pair allocates about 20 MB of short-lived intermediates. glibc's malloc
raises its mmap threshold (and with it the trim threshold, twice as large) only as far as the largest block
it has freed so far; for these few-MB tensors the trim threshold stays near 10 MB, so at the end of every
call the top of the heap is handed back to the kernel, and the next call touches fresh zeroed pages. That
was about 4,400 minor page faults per call, 8-18 ms of a 25-38 ms call on the 2-core test machine
(docs/network.md, "Thirteenth round"). PyTorch's CPU tuning guide recommends a caching allocator (jemalloc,
tcmalloc) for the same reason; this module gets the same effect without a preload.

:func:`keep_freed_memory` sets the two thresholds once per process to the ceiling glibc's own dynamic rule
can reach on 64-bit (mmap threshold 32 MiB, trim threshold twice that). The cost: up to 64 MiB of freed
memory stays with the process instead of going back to the system. It is a no-op on other C libraries
(macOS, Windows, musl) and when ``MEDFUSE_MALLOC_TUNING=0`` is set.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "ENV"]

#: glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where its dynamic threshold stops rising.
MMAP_THRESHOLD = 32 << 20
#: glibc's dynamic rule keeps the trim threshold at twice the mmap threshold.
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
#: Set to 0 to leave the C library's allocator settings alone.
ENV = "MEDFUSE_MALLOC_TUNING"

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_LOCK = threading.Lock()
_STATE: dict = {}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are set (now or before)."""
    with _LOCK:
        if "done" not in _STATE:
            _STATE["done"] = _apply()
        return _STATE["done"]


def _apply() -> bool:
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # Setting either one turns glibc's dynamic adjustment off, so both are set.
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # pragma: no cover - an unusual libc
        return False
