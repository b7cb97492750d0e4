#!/usr/bin/env bash
# On a machine with CUDA: faiss-gpu when it can be had (deploy/gpu-faiss.sh), the CUDA tests (transforms,
# Detector, the GPU index, training, attacks, a GPU detection worker in a real fleet against the CPU
# detector), then the GPU benchmarks (deploy/gpu-bench.sh).
# Usage: bash deploy/gpu-check.sh [OUT_DIR]   (Python as in gpu-bench.sh: $UMCD_PYTHON or .venv)
# Seconds allowed: $GPU_TESTS_TIMEOUT (default 900) for the tests, $GPU_BENCH_TIMEOUT (1800) for the benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-artifacts/bench/gpu-check-$(date +%Y%m%d-%H%M%S)}
py=${UMCD_PYTHON:-.venv/bin/python}
if [ -z "${UMCD_PYTHON:-}" ] && [ ! -x "$py" ]; then make setup; fi
"$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch: the CUDA tests would only skip')" || exit 1
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# faiss-gpu before the tests, or the GPU index test (test_the_gpu_index_agrees_with_the_cpu_index) only skips
bash deploy/gpu-faiss.sh | tee "$out/faiss.log"
timeout "${GPU_TESTS_TIMEOUT:-900}" "$py" -m pytest -q -p no:cacheprovider -rs --junitxml="$out/cuda-tests.xml" \
  tests/unit/test_cuda.py tests/integration/test_fleet_cuda.py "tests/unit/test_attacks.py::test_attacks_run_on_the_images_device" \
  "tests/unit/test_core_detection.py::test_detector_batched_results_equal_one_by_one" \
  2>&1 | tee "$out/cuda-tests.log"
tests=${PIPESTATUS[0]}
timeout "${GPU_BENCH_TIMEOUT:-1800}" bash deploy/gpu-bench.sh "$out" 2>&1 | tee "$out/gpu-bench.log"
bench=${PIPESTATUS[0]}
echo "CUDA tests: rc $tests; GPU benchmarks: rc $bench; written to $out"
exit $(( tests != 0 || bench != 0 ))
