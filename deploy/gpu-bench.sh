#!/usr/bin/env bash
# Runs the GPU benchmarks in one go on a machine with CUDA and prints their figures.
# Usage: bash deploy/gpu-bench.sh [OUT_DIR]
# Python: $UMCD_PYTHON when set (an environment whose packages you manage: nothing is installed), else
# the project's .venv (made by `make setup` if missing), where faiss-cpu is swapped for faiss-gpu (the
# `gpu` extra) when that can be downloaded; offline, faiss-cpu stays and the index runs on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-artifacts/bench/gpu-$(date +%Y%m%d-%H%M%S)}
py=${UMCD_PYTHON:-.venv/bin/python}
if [ -z "${UMCD_PYTHON:-}" ] && [ ! -x "$py" ]; then make setup; fi
"$py" - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: this script is for a GPU machine")
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
bash deploy/gpu-faiss.sh  # faiss-gpu when it can be had (never with $UMCD_PYTHON); says which index runs
mkdir -p "$out"
"$py" -m umcd.cli bench overhead --device cuda --out "$out"
"$py" -m umcd.cli bench index --device cuda --out "$out"
"$py" - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
o = json.loads((out / "overhead.json").read_text())
print("\noverhead (Fig. 6) on", o["machine"].get("gpu", o["machine"]["device"]))
for r in o["rows"]:
    print(f"  batch {r['batch_size']:>4}: retrieval {r['retrieval_ms_per_image']:.3f} ms/img, detection "
          f"{r['detection_ms_per_image']:.3f} ms/img, ratio {r['overhead_ratio']:.3f}, floor {r['floor_ratio']:.3f}")
i = json.loads((out / "index_scaling.json").read_text())
print("index scaling:")
for r in i["rows"]:
    print(f"  {r['codes']:>9} {r['kind']:>6}: {r['ms_per_query']:.3f} ms/query, wrapper x{r['wrapper_overhead']:.2f}")
PY
echo "written to $out"
