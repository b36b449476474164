#!/usr/bin/env bash
# The GPU machine's check, in one call (about 8 minutes on an H100/H200; it must stay under 10):
#   1. builds the cuda preset (build-cuda/: CUDA backend, NCCL; sm_80 and sm_90);
#   2. the `gpu` tests: every CUDA op, the mixture-of-experts ops included, against the CPU backend
#      (tests/gpu/test_cuda_ops.cpp);
#   3. the model in fp32 (rtol 1e-4) and in bf16 (rtol 1e-2) against the PyTorch reference on the GPU,
#      and the mixture-of-experts model (parabench-ep, one rank: 4 experts, top-2, capacity factor 1.0,
#      auxiliary loss) in fp32 against the PyTorch MoE, routing statistics exactly (reference-moe);
#   4. every app on the GPU against the single-rank loss curve: ranks sharing the GPU through
#      --comm mpi, one rank through NCCL; parabench-ep against its own single-rank run, tokens per
#      expert exactly (tests/gpu/test_gpu_apps.py);
#   5. parabench-dp against PyTorch eager (SDPA) and torch.compile on the same GPU, bf16, gpt2-124m at
#      micro-batch 16 and block-4k at micro-batch 2: one table (bench/dp/vs_torch_gpu.py).
# Every stage runs even if an earlier one failed (except after a failed build); logs go to $OUT
# (default results/device-check). Exit 0 when every stage passed.
#
#   device tool:  run  command="tests/gpu/device-check.sh"  timeout_s=600
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$repo/results/device-check}
mkdir -p "$out"
cd "$repo" || exit 2
export HDF5_USE_FILE_LOCKING=FALSE PYTHONUNBUFFERED=1
if mpiexec --version 2>&1 | grep -qiE "open ?mpi|openrte"; then
  # Open MPI: several ranks on a machine with fewer slots than ranks, and root in containers.
  export OMPI_MCA_rmaps_base_oversubscribe=1
  if [[ $(id -u) -eq 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
fi
python=${PB_PYTHON:-python3}
failed=()

# stage NAME COMMAND...: runs COMMAND with its output in $out/NAME.log and prints one line.
stage() {
  local name=$1 start rc
  shift
  start=$(date +%s)
  "$@" >"$out/$name.log" 2>&1
  rc=$?
  printf '%-16s %s  (%d s, log %s)\n' "$name" "$([[ $rc -eq 0 ]] && echo passed || echo "FAILED (exit $rc)")" \
    $(($(date +%s) - start)) "$out/$name.log"
  if [[ $rc -ne 0 ]]; then
    failed+=("$name")
    tail -n 25 "$out/$name.log"
  fi
  return $rc
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed: no GPU driver?"
head -n 12 "$out/nvidia-smi.txt"

build() {
  cmake --preset cuda && cmake --build --preset cuda -j "$(nproc)"
}
if ! stage build build; then
  echo "the build failed: nothing else can run"
  exit 1
fi

stage ops build-cuda/tests/test_cuda_ops --gtest_output="xml:$out/test_cuda_ops.xml"

dp=build-cuda/bench/dp/parabench-dp
ep=build-cuda/bench/ep/parabench-ep
tiny=(--layers 2 --hidden 64 --heads 4 --seq 32 --vocab 256 --micro-batch 2 --global-batch 4)
awkward=(--layers 3 --hidden 72 --heads 3 --seq 17 --vocab 67 --ffn 200 --micro-batch 3 --global-batch 6)
moe=(--experts 4 --top-k 2 --capacity-factor 1.0 --aux-loss 0.01)
reference() {  # reference APP DTYPE RTOL MODEL-OPTIONS...
  local app=$1 dtype=$2 rtol=$3
  shift 3
  PB_REF_DEVICE=cuda PB_REF_RTOL=$rtol tests/reference/run_reference.sh "$app" "$python" "$@" --backend cuda \
    --dtype "$dtype" --comm mpi
}
stage reference-fp32 reference "$dp" fp32 1e-4 "${tiny[@]}"
stage reference-fp32-b reference "$dp" fp32 1e-4 "${awkward[@]}"
stage reference-bf16 reference "$dp" bf16 1e-2 "${tiny[@]}"
stage reference-moe reference "$ep" fp32 1e-4 "${tiny[@]}" "${moe[@]}"

stage apps env PB_BIN_DIR="$repo/build-cuda/bench" "$python" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_apps.py

stage vs-torch "$python" bench/dp/vs_torch_gpu.py --bin "$dp" --out "$out/vs-torch"
cat "$out/vs-torch/vs_torch_gpu.md" 2>/dev/null

if ((${#failed[@]})); then
  echo "device check: FAILED stages: ${failed[*]}"
  exit 1
fi
echo "device check: every stage passed"
