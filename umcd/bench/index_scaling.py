"""Top-k search time of our HammingIndex against raw FAISS IndexBinaryFlat, 10^4 .. 10^7 codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umcd.bench.common import machine_info, real_codes, tile_codes, timeit, timeit_paired, trained_model, write_json


def hamming_rate(bits: int = 64, n: int = 1_000_000, q: int = 64) -> float:
    """Hamming distances per second of FAISS's brute-force binary scan on this machine."""
    import faiss

    rng = np.random.default_rng(0)
    db = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    qs = rng.integers(0, 256, (q, bits // 8), dtype=np.uint8)
    index = faiss.IndexBinaryFlat(bits)
    index.add(db)
    t = timeit(lambda: index.search(qs, 1), repeat=3, warmup=1)
    return n * q / t["median"]


def run_index_scaling(
    artifacts: Path,
    out_dir: Path,
    *,
    sizes=(10_000, 100_000, 1_000_000, 10_000_000),
    queries: int = 100,
    top_k: int = 10,
    device: str = "cpu",
    min_time: float = 1.0,
) -> dict:
    """Top-k search time per size and kind of codes, ours against raw FAISS (interleaved rounds, at least
    ``min_time`` seconds of them per row); writes index_scaling.json and index_scaling.png."""
    import faiss

    from core.index import HammingIndex, pack_codes

    ck = trained_model(artifacts, device)
    bits = ck.meta.bits
    base = real_codes(ck.model.to(device).eval(), 50_000, device=device)
    qcodes = real_codes(ck.model, queries, seed=99, device=device)
    qpacked = pack_codes(qcodes)
    rate = hamming_rate(bits)
    rows = []
    for n in sizes:
        for kind in ("real", "random"):
            if kind == "real":
                codes = base[:n] if n <= len(base) else tile_codes(base, n, flip_bits=2, seed=n)
            else:
                codes = np.random.default_rng(n).choice(np.array([-1, 1], np.int8), (n, bits))
            packed = pack_codes(codes)
            ours = HammingIndex(bits, "gpu" if device == "cuda" else "cpu")
            ours.add(packed, np.arange(n))
            raw = faiss.IndexBinaryFlat(bits)
            raw.add(packed)
            # interleaved (ours, raw, ours, ...) so that the shared machine's drifting load hits both alike:
            # timed one after the other, the ratio of two medians had scattered between 0.59 and 2.15
            t = timeit_paired({"ours": lambda: ours.search(qpacked, top_k), "raw": lambda: raw.search(qpacked, top_k)},
                              repeat=5, warmup=1, min_time=min_time)
            t_ours, t_raw = t["ours"], t["raw"]
            rows.append(
                {
                    "codes": n,
                    "kind": kind,
                    "ours_s": t_ours["median"],
                    "faiss_raw_s": t_raw["median"],
                    "wrapper_overhead": t_ours["median"] / t_raw["median"],
                    "ms_per_query": 1e3 * t_ours["median"] / queries,
                    "distances_per_s": n * queries / t_raw["median"],
                    "fraction_of_machine_rate": (n * queries / t_raw["median"]) / rate,
                }
            )
            del ours, raw, packed, codes
    result = {
        "benchmark": "index_scaling",
        "machine": machine_info(device),
        "settings": {"bits": bits, "queries": queries, "top_k": top_k, "model": ck.version, "min_time_s": min_time,
                      "timing": "median of interleaved rounds (ours, raw FAISS)",
                      "real_codes": "trained digits model on shifted/noised digits; above 50k, tiled with 2 bit flips"},
        "machine_hamming_rate_per_s": rate,
        "rows": rows,
    }
    write_json(out_dir / "index_scaling.json", result)
    _plot(result, out_dir / "index_scaling.png")
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, m in (("real", "o"), ("random", "s")):
        rs = [r for r in result["rows"] if r["kind"] == kind]
        ax.plot([r["codes"] for r in rs], [r["ms_per_query"] for r in rs], m + "-", label=f"HammingIndex ({kind} codes)")
        ax.plot([r["codes"] for r in rs], [1e3 * r["faiss_raw_s"] / result["settings"]["queries"] for r in rs], m + ":",
                label=f"raw IndexBinaryFlat ({kind})")
    ax.set(xscale="log", yscale="log", xlabel="database codes", ylabel="ms per query (top-10)", title="Index scaling, 64 bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
