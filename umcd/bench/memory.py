"""Resident memory of a detection process at 10^6 and 10^7 database codes, and its growth over requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from umcd.bench.common import machine_info, write_json

_CHILD = r"""
import gc, json, sys, time
import numpy as np, psutil, torch
from pathlib import Path
from umcd.bench.common import trained_model, real_codes, tile_codes
from core.detector import Detector
from core.index import HammingIndex
from core.datasets import load_dataset

n_codes, n_requests, artifacts = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
proc = psutil.Process()
rss = lambda: proc.memory_info().rss
ck = trained_model(artifacts)
model = ck.model.eval()
queries = load_dataset("digits").query.get()
base_rss = rss()
codes = tile_codes(real_codes(model, 20_000), n_codes, flip_bits=2)
index = HammingIndex(ck.meta.bits)
for start in range(0, n_codes, 1_000_000):
    index.add(codes[start:start + 1_000_000], np.arange(start, min(start + 1_000_000, n_codes)))
del codes
gc.collect()
index_rss = rss()
det = Detector(model, index, None, top_k=10)
det.calibrate(queries[:500], 0.05)
samples = []
t0 = time.perf_counter()
with torch.no_grad():
    for i in range(n_requests):
        det.score_batch(queries[i % 1000 : i % 1000 + 1]).records()
        if i in {999, n_requests // 2 - 1, n_requests - 1}:
            gc.collect()
            samples.append({"requests": i + 1, "rss": rss()})
elapsed = time.perf_counter() - t0
print(json.dumps({"codes": n_codes, "rss_before_index": base_rss, "rss_with_index": index_rss,
                  "index_bytes_theory": n_codes * ck.meta.bits // 8, "samples": samples,
                  "requests_per_s": n_requests / elapsed if n_requests else None}))
"""


def run_memory(artifacts: Path, out_dir: Path, *, sizes=(1_000_000, 10_000_000), requests: int = 10_000) -> dict:
    rows = []
    for i, n in enumerate(sizes):
        nreq = requests if i == 0 else 0
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(n), str(nreq), str(artifacts)],
            check=True, capture_output=True, text=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["rss_mib"] = row["rss_with_index"] / 2**20
        row["index_overhead_mib"] = (row["rss_with_index"] - row["rss_before_index"]) / 2**20
        if row["samples"]:
            first, last = row["samples"][0]["rss"], row["samples"][-1]["rss"]
            row["growth_after_warmup"] = (last - first) / first
        rows.append(row)
    result = {
        "benchmark": "memory",
        "machine": machine_info("cpu"),
        "settings": {"sizes": list(sizes), "requests": requests, "request": "one image per score_batch call",
                      "growth": "RSS after the last request vs after the first 1,000 (warm-up)"},
        "rows": rows,
    }
    write_json(out_dir / "memory.json", result)
    return result
