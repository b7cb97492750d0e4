"""Fig. 6: plain retrieval (embed + top-k) against full detection (embed x and t(x) + top-k + C1/C2/C3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umcd.bench.common import machine_info, real_codes, tile_codes, timeit_paired, torch_threads, trained_model, write_json


def run_overhead(
    artifacts: Path,
    out_dir: Path,
    *,
    batch_sizes=(1, 8, 32, 128, 256),
    db_size: int = 100_000,
    device: str = "cpu",
    repeat: int = 9,
    top_k: int = 10,
    threads: int | None = 1,
    min_time: float = 4.0,
) -> dict:
    """Measures per-batch times and writes overhead.json and overhead.png; returns the results.

    threads: torch/FAISS threads while timing (1 by default: on a small shared CPU two threads make
    every timing erratic, and one worker process per core is how the fleet runs); min_time: seconds
    of interleaved rounds per batch size (at least `repeat` rounds).
    """
    with torch_threads(threads if device != "cuda" else None):
        return _run_overhead(artifacts, out_dir, batch_sizes=batch_sizes, db_size=db_size, device=device,
                             repeat=repeat, top_k=top_k, min_time=min_time)


def _run_overhead(artifacts, out_dir, *, batch_sizes, db_size, device, repeat, top_k, min_time) -> dict:
    import torch

    from core.detector import Detector
    from core.index import HammingIndex
    from core.models import sign_codes

    ck = trained_model(artifacts, device)
    model = ck.model.to(device).eval()
    codes = tile_codes(real_codes(model, 20_000, device=device), db_size, flip_bits=2)
    index = HammingIndex(ck.meta.bits, "gpu" if device == "cuda" else "cpu")
    index.add(codes, np.arange(db_size))
    det = Detector(model, index, None, top_k=top_k, device=device)
    from core.datasets import load_dataset

    queries = load_dataset("digits").query.get()
    det.calibrate(queries[:500], 0.05)
    sync = torch.cuda.synchronize if device == "cuda" else None
    rows = []
    for bs in batch_sizes:
        x = queries[:bs].to(device) if bs <= len(queries) else queries.repeat((bs // len(queries)) + 1, 1, 1, 1)[:bs].to(device)
        with torch.no_grad():
            f_codes = sign_codes(model(x)).cpu()
        with torch.no_grad():
            t = timeit_paired(
                {
                    "forward": lambda: model(x),
                    "search": lambda: index.search(f_codes, top_k),
                    "retrieval": lambda: det.retrieve(x),
                    "detection": lambda: det.score_batch(x),
                },
                repeat=repeat,
                sync=sync,
                min_time=min_time,
            )
        retrieval, detection = t["retrieval"], t["detection"]
        F, S = t["forward"]["median"], t["search"]["median"]
        floor = (2 * F + S) / (F + S)
        ratio = detection["median"] / retrieval["median"]
        rows.append(
            {
                "batch_size": bs,
                "forward_s": F,
                "search_s": S,
                "retrieval_s": retrieval["median"],
                "detection_s": detection["median"],
                "retrieval_ms_per_image": 1e3 * retrieval["median"] / bs,
                "detection_ms_per_image": 1e3 * detection["median"] / bs,
                "rounds": detection["runs"],
                "overhead_ratio": ratio,
                "floor_ratio": floor,
                "ratio_over_floor": ratio / floor,
            }
        )
    result = {
        "benchmark": "overhead",
        "machine": machine_info(device),
        "settings": {"db_size": db_size, "bits": ck.meta.bits, "top_k": top_k, "repeat": repeat, "model": ck.version,
                      "transform": "meanblur3", "min_time_s": min_time, "max_forward": det.max_forward,
                      "timing": "median of interleaved rounds (forward, search, retrieval, detection)"},
        "rows": rows,
    }
    write_json(out_dir / "overhead.json", result)
    plot_overhead(result, out_dir / "overhead.png")
    return result


def plot_overhead(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    bs = [r["batch_size"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(bs, [r["retrieval_ms_per_image"] for r in rows], "o-", label="retrieval")
    ax[0].plot(bs, [r["detection_ms_per_image"] for r in rows], "s-", label="retrieval + detection")
    ax[0].set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per image", title="(a) per sample")
    ax[1].plot(bs, [1e3 * r["retrieval_s"] for r in rows], "o-", label="retrieval")
    ax[1].plot(bs, [1e3 * r["detection_s"] for r in rows], "s-", label="retrieval + detection")
    ax[1].plot(bs, [1e3 * r["retrieval_s"] * r["floor_ratio"] for r in rows], "k:", label="floor (2F+S)/(F+S)")
    ax[1].set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per batch", title="(b) per batch")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    m = result["machine"]
    fig.suptitle(f"Detection overhead ({m['device']}, {m['cpu_count']} cores, {result['settings']['db_size']:,} codes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
