"""Shared pieces of the benchmarks: machine description, timing, a trained model, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np


def machine_info(device: str = "cpu") -> dict:
    import faiss
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # pragma: no cover
        pass
    return info


def timeit(fn: Callable[[], object], *, repeat: int = 7, warmup: int = 2, sync: Callable[[], None] | None = None) -> dict:
    """Median / min / p90 seconds of `fn` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "p90": float(np.percentile(times, 90)), "runs": repeat}


def timeit_paired(fns: dict[str, Callable[[], object]], *, repeat: int = 9, warmup: int = 2,
                  sync: Callable[[], None] | None = None, min_time: float = 0.0,
                  max_repeat: int = 10_000) -> dict[str, dict]:
    """Times several functions interleaved (A B C, A B C, ...) so that drifting machine load hits all alike.

    At least `repeat` rounds, and more until `min_time` seconds have passed (at most `max_repeat`
    rounds): cheap calls (batch size 1) get hundreds of rounds, so their medians are stable.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            if sync:
                sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeat or (time.perf_counter() - start < min_time and rounds < max_repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    return {
        k: {"median": statistics.median(v), "min": min(v), "p90": float(np.percentile(v, 90)), "runs": rounds}
        for k, v in times.items()
    }


class torch_threads:
    """Context manager: run torch (and FAISS's OpenMP) on `n` threads, restoring the previous count."""

    def __init__(self, n: int | None) -> None:
        self.n = n

    def __enter__(self) -> "torch_threads":
        import faiss
        import torch

        self.before = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(int(self.n))
            faiss.omp_set_num_threads(int(self.n))
        return self

    def __exit__(self, *exc) -> None:
        import faiss
        import torch

        if self.n:
            torch.set_num_threads(self.before)
            faiss.omp_set_num_threads(self.before)


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float))
    return path


def trained_model(artifacts: Path, device: str = "cpu", bits: int = 64):
    """The digits checkpoint from `umcd train` if present, else a freshly trained one (saved there)."""
    from core.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
    from core.datasets import load_dataset
    from core.pipeline import checkpoint_path
    from core.training import train_and_evaluate

    path = checkpoint_path(artifacts, "digits", bits, "smallcnn")
    if not path.is_file():
        splits = load_dataset("digits")
        r = train_and_evaluate(splits, bits=bits, epochs=30, progress=True)
        meta = CheckpointMeta("smallcnn", bits, "digits", 0, 10, 32, r.map_score, None, 30, r.seconds)
        save_checkpoint(path, r.model, r.centers, meta)
    ck = load_checkpoint(path, device=device)
    return ck


def real_codes(model, n: int, seed: int = 0, device: str = "cpu", batch: int = 1024) -> np.ndarray:
    """±1 codes (n, K) of the trained model on digits images, shifted and noised to make n distinct inputs."""
    import torch

    from core.datasets import load_dataset
    from core.models import sign_codes
    from core.training import random_shift

    base = load_dataset("digits").query.get()
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, n, batch):
            m = min(batch, n - start)
            idx = torch.randint(0, len(base), (m,), generator=gen)
            x = random_shift(base[idx], 2, gen)
            x = (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
            out.append(sign_codes(model(x.to(device))).cpu().numpy().astype(np.int8))
    return np.concatenate(out)


def tile_codes(codes: np.ndarray, n: int, flip_bits: int = 2, seed: int = 0) -> np.ndarray:
    """n codes made from real ones by tiling and flipping `flip_bits` random bits of each copy."""
    rng = np.random.default_rng(seed)
    reps = int(np.ceil(n / len(codes)))
    out = np.tile(codes, (reps, 1))[:n].copy()
    if flip_bits:
        cols = rng.integers(0, codes.shape[1], (n, flip_bits))
        rows = np.repeat(np.arange(n), flip_bits)
        out[rows, cols.reshape(-1)] *= -1
    return out
