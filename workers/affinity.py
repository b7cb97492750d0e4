"""Pinning a detection worker to its CPUs (``UMCD_WORKER_CPUS``).

Two detection workers on two cores, each free to run anywhere, shared both cores with each other's
threads, the producer and Redis; pinned one to a core, they answered ~10% more images per second in the
fleet bench (README, Performance). Celery starts its pool threads before the runtime starts, so every
thread the process already has is pinned, and the threads started later inherit the main thread's CPUs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from umcd.settings import format_cpu_list, parse_cpu_list

log = logging.getLogger(__name__)


def pin_process(cpus_text: str) -> frozenset[int]:
    """Pin every thread of this process to the CPUs of ``cpus_text`` (a Linux CPU list) and size torch's and
    FAISS's thread pools to them unless ``OMP_NUM_THREADS`` is set. Returns the CPUs.

    Raises ValueError for a bad list or for CPUs this process may not use, RuntimeError where the OS has
    no CPU affinity (not Linux)."""
    cpus = parse_cpu_list(cpus_text)
    if not hasattr(os, "sched_setaffinity"):
        raise RuntimeError(f"UMCD_WORKER_CPUS={cpus_text!r}: this OS has no CPU affinity (Linux only)")
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ValueError(f"UMCD_WORKER_CPUS={cpus_text!r} names CPUs {format_cpu_list(cpus - allowed)} that this "
                         f"process may not use (it may use {format_cpu_list(allowed)})")
    tasks = Path("/proc/self/task")
    threads = [int(t) for t in os.listdir(tasks)] if tasks.is_dir() else [0]
    for tid in threads:  # this thread among them: the threads it starts later inherit its CPUs
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    if "OMP_NUM_THREADS" not in os.environ:
        import faiss
        import torch

        torch.set_num_threads(len(cpus))
        faiss.omp_set_num_threads(len(cpus))
    log.info("pinned to CPUs %s (%d threads)", format_cpu_list(cpus), len(threads))
    return cpus

