#!/usr/bin/env bash
# Swap faiss-cpu for faiss-gpu (the `gpu` extra) in the project's .venv when faiss-gpu can be downloaded, so
# that the GPU binary index is used and tested; offline, faiss-cpu stays and the index runs on the CPU.
# Nothing is installed into $UMCD_PYTHON (an environment whose packages you manage). Prints which index runs.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${UMCD_PYTHON:-.venv/bin/python}
has_gpu_faiss() { "$py" -c "import faiss, sys; sys.exit(0 if hasattr(faiss, 'StandardGpuResources') else 1)"; }
if [ -z "${UMCD_PYTHON:-}" ] && ! has_gpu_faiss; then
  # faiss-cpu and faiss-gpu install the same module: swap them, but only once faiss-gpu is in hand,
  # so that a machine without a package index keeps its working faiss-cpu
  wheels=$(mktemp -d)
  if "$py" -m pip download -q -d "$wheels" "faiss-gpu>=1.8,<2"; then
    "$py" -m pip uninstall -y -q faiss-cpu
    "$py" -m pip install -q --no-index --find-links "$wheels" "faiss-gpu>=1.8,<2"
  else
    echo "faiss-gpu could not be downloaded here: the index stays on the CPU"
  fi
  rm -rf "$wheels"
fi
if has_gpu_faiss; then echo "faiss: GPU binary index"; else echo "faiss: no GPU support, the index runs on the CPU"; fi
