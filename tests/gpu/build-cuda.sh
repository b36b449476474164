#!/usr/bin/env bash
# Configures and builds the cuda preset (build-cuda/): the CUDA backend and the NCCL communicator must
# compile and link on every machine with the CUDA toolkit, GPU or not. Where cuDNN and the cuDNN
# frontend's headers are present (scripts/setup.sh fetches the latter), that build must have cuDNN's
# attention; then the backend and an app (parabench-dp) are built once more without it (preset
# cuda-nocudnn), so that both configurations compile. Exit 77 (skipped) without nvcc.
# PB_CUDA_ARCHITECTURES (e.g. 90) replaces the presets' architectures (80;90): the test suite builds
# for sm_90 only, which compiles the same code in half the device-code time.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v nvcc >/dev/null 2>&1 && [[ ! -x /usr/local/cuda/bin/nvcc ]]; then
  echo "no CUDA toolkit (nvcc) on this machine: the cuda preset is not built"
  exit 77
fi
arch=()
if [[ -n ${PB_CUDA_ARCHITECTURES:-} ]]; then
  arch=("-DCMAKE_CUDA_ARCHITECTURES=$PB_CUDA_ARCHITECTURES")
fi
configure_log=$(cmake --preset cuda "${arch[@]}")
grep -E "cuDNN" <<<"$configure_log" || true
cudnn_h=""
for header in /usr/local/cuda/include/cudnn.h /usr/include/cudnn.h; do
  if [[ -f $header ]]; then
    cudnn_h=$header
    break
  fi
done
if [[ -n $cudnn_h && -f third_party/cudnn-frontend/include/cudnn_frontend.h ]] &&
   ! grep -q -- "--attention cudnn" <<<"$configure_log"; then
  echo "cuDNN ($cudnn_h) and its frontend are here, yet the cuda preset did not configure cuDNN attention" >&2
  exit 1
fi
cmake --build --preset cuda -j "$(nproc)"
cmake --preset cuda-nocudnn "${arch[@]}" >/dev/null
cmake --build --preset cuda-nocudnn -j "$(nproc)" --target parabench-dp

# The CUDA build's app runs where no GPU is (on the CPU backend), and its energy record says that no rank
# drives a GPU: no NVML counter, not a zero (common/energy.h).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
HDF5_USE_FILE_LOCKING=FALSE mpiexec -n 1 build-cuda/bench/dp/parabench-dp --model tiny --steps 3 --quiet \
  --out "$work/nvml.h5" >/dev/null
HDF5_USE_FILE_LOCKING=FALSE /usr/bin/python3 - "$work/nvml.h5" <<'PY'
import sys

import h5py

with h5py.File(sys.argv[1], "r") as f:
    nvml = f["energy/nvml"].attrs
    assert nvml["available"] == 0 and nvml["reason"].startswith("no counter: "), dict(nvml)
    assert "energy/nvml/joules" not in f
    print("cuda build without a GPU: /energy/nvml says", nvml["reason"])
PY
