#!/usr/bin/env bash
# Configures and builds the cuda preset (build-cuda/): the CUDA backend and the NCCL communicator must
# compile and link on every machine with the CUDA toolkit, GPU or not. Exit 77 (skipped) without nvcc.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v nvcc >/dev/null 2>&1 && [[ ! -x /usr/local/cuda/bin/nvcc ]]; then
  echo "no CUDA toolkit (nvcc) on this machine: the cuda preset is not built"
  exit 77
fi
cmake --preset cuda >/dev/null
cmake --build --preset cuda -j "$(nproc)"
