"""glibc malloc tuning for a detection worker: keep the model's activation buffers mapped between batches.

A CPU forward pass of a batch allocates activations of several MiB (the small CNN at batch 64 on
32x32 images: 8 MiB per conv output) and frees them at the end of the batch. glibc serves
allocations above its mmap threshold with a fresh ``mmap`` and returns them to the kernel on
``free``; a heap of a thread other than the main one (the worker's batcher) also gives freed memory
at its top back with ``madvise(MADV_DONTNEED)`` once it exceeds the trim threshold. Either way the
next batch touches fresh pages: measured in the fleet benchmark, ~35 minor page faults per image and
0.09 ms of kernel time per image in the batcher thread, about 30% on top of the model's own CPU.

:func:`tune_malloc` raises the mmap threshold (so such buffers come from malloc's heaps, which reuse
them) and the trim threshold (so freed memory stays mapped for the next batch). The cost is resident
memory: up to ``trim_threshold`` bytes of freed memory per heap stay mapped instead of going back to
the kernel, steady from the first batch on (the benchmark's memory rows show it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: the largest mmap threshold glibc accepts on 64-bit systems (HEAP_MAX_SIZE / 2)
MAX_MMAP_THRESHOLD = 32 * 2**20


def tune_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds (bytes) for this process; True when both were taken.

    ``mmap_threshold`` is capped at :data:`MAX_MMAP_THRESHOLD` (glibc refuses more). Process-wide
    and immediate: it applies to every later allocation of every thread. Returns False, changing
    nothing, where the C library has no ``mallopt`` (musl, macOS) or refuses a value.
    """
    if mmap_threshold <= 0 or trim_threshold <= 0:
        raise ValueError(f"thresholds must be positive, got {mmap_threshold} and {trim_threshold}")
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("no mallopt in %s: malloc keeps its defaults", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, min(int(mmap_threshold), MAX_MMAP_THRESHOLD)) == 1
    ok = mallopt(M_TRIM_THRESHOLD, min(int(trim_threshold), 2**31 - 1)) == 1 and ok
    if not ok:
        log.warning("mallopt refused the thresholds (%d, %d): malloc keeps (some of) its defaults",
                    mmap_threshold, trim_threshold)
    return ok


def keep_freed_memory(mib: int) -> bool:
    """The worker's setting (``UMCD_WORKER_MALLOC_KEEP_MIB``) applied: allocations up to ``min(mib, 32)`` MiB
    come from malloc's heaps and up to ``mib`` MiB of freed memory stay mapped. 0 changes nothing (False)."""
    keep = int(mib) * 2**20
    if keep <= 0:
        return False
    return tune_malloc(mmap_threshold=min(keep, MAX_MMAP_THRESHOLD), trim_threshold=keep)
