#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md as one prepared script, for a lent machine with one NVIDIA GPU.
# Needs a CUDA build of torch, transformers, trl and datasets already installed there (the machine has no
# network), and about 5 minutes (under 8). Output: stdout, and $OUT/gpu.txt when $OUT is set.
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 470 python benchmarks/gpu.py "$@" 2>&1 | grep -v -i "warn" | tee "${OUT:-/tmp}/gpu.txt"
