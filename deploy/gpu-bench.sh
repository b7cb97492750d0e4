#!/usr/bin/env bash
# Runs the GPU benchmarks in one go on a machine with CUDA and prints their figures.
# Usage: bash deploy/gpu-bench.sh [OUT_DIR]
# Needs the project installed (make setup); installs faiss-gpu (the `gpu` extra) when CUDA is present.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-artifacts/bench/gpu-$(date +%Y%m%d-%H%M%S)}
py=.venv/bin/python
[ -x "$py" ] || make setup
"$py" - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: this script is for a GPU machine")
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
if ! "$py" -c "import faiss, sys; sys.exit(0 if hasattr(faiss, 'StandardGpuResources') else 1)"; then
  # faiss-cpu and faiss-gpu install the same module: swap them for the GPU index
  "$py" -m pip uninstall -y -q faiss-cpu || true
  "$py" -m pip install -q "faiss-gpu>=1.8,<2" || echo "faiss-gpu not installable here: the index stays on the CPU"
fi
mkdir -p "$out"
.venv/bin/umcd bench overhead --device cuda --out "$out"
.venv/bin/umcd bench index --device cuda --out "$out"
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
