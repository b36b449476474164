#!/usr/bin/env bash
# The GPU machine's check, in one call, within a budget (PB_CHECK_BUDGET seconds, default 345: under 6
# minutes, leaving the device tool's 10-minute call time for a second try):
#   1. builds the cuda preset for this GPU's architecture only (nvidia-smi's compute capability;
#      build-cuda/: CUDA backend, NCCL);
#   2. a quick first measurement: one 4096-square GEMM in fp32 and in bf16 (parabench-micro), with the
#      cuBLASLt algorithm it chose (its trace) and, where Nsight Systems is installed, the kernels' names;
#   3. the `gpu` tests: every CUDA op, the mixture-of-experts ops included, against the CPU backend
#      (tests/gpu/test_cuda_ops.cpp);
#   4. the model in fp32 (rtol 1e-4) and in bf16 (rtol 1e-2; with --attention native and cudnn) against
#      the PyTorch reference on the GPU,
#      and the mixture-of-experts model (parabench-ep, one rank: 4 experts, top-2, capacity factor 1.0,
#      auxiliary loss) in fp32 against the PyTorch MoE, routing statistics exactly (reference-moe), and
#      the Llama-style block (SPEC 2.5: 4 heads over 2 key/value heads) in fp32 (reference-llama);
#   5. every app on the GPU against the single-rank loss curve: ranks sharing the GPU through
#      --comm mpi, one rank through NCCL; parabench-ep against its own single-rank run, tokens per
#      expert exactly (tests/gpu/test_gpu_apps.py);
#   6. parabench-dp (with cuDNN's and with its own attention) against PyTorch eager (SDPA) and
#      torch.compile on the same GPU, bf16, gpt2-124m at micro-batch 16 and block-4k at micro-batch 2:
#      one table (bench/dp/vs_torch_gpu.py).
# The cuDNN frontend's headers do not reach the GPU machine by themselves (no network there, and
# third_party/ is ignored by git): the device tool's call carries them, carry=["third_party/cudnn-frontend"].
# Each stage has its own time limit, cut to what is left of the budget; a stage with less than 10 s
# left is skipped (said so). Every stage runs even if an earlier one failed (except after a failed
# build). Its logs go into one file, $OUT/device-check.tar.gz (default results/device-check/), rewritten
# after every stage so that a call cut short still brings back what ran; each stage prints one line.
# Exit 0 when every stage passed.
#
#   device tool:  run  command="tests/gpu/device-check.sh"  timeout_s=420  carry=["third_party/cudnn-frontend"]
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$repo/results/device-check}
mkdir -p "$out"
cd "$repo" || exit 2
work=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")  # the logs, packed into $out after each stage
trap 'rm -rf "$work"' EXIT
budget_end=$(($(date +%s) + ${PB_CHECK_BUDGET:-345}))
pack() { tar -czf "$out/device-check.tar.gz" -C "$work" . 2>/dev/null; }
export HDF5_USE_FILE_LOCKING=FALSE PYTHONUNBUFFERED=1
if mpiexec --version 2>&1 | grep -qiE "open ?mpi|openrte"; then
  # Open MPI: several ranks on a machine with fewer slots than ranks, and root in containers.
  export OMPI_MCA_rmaps_base_oversubscribe=1
  if [[ $(id -u) -eq 0 ]]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
fi
python=${PB_PYTHON:-python3}
export python  # read by the functions that stages run (in a bash of their own)
failed=()

# stage NAME LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds (less if the budget has less left)
# with its output in NAME.log, prints one line, and packs the logs.
stage() {
  local name=$1 limit=$2 start rc left
  shift 2
  start=$(date +%s)
  left=$((budget_end - start))
  if ((left < 10)); then
    printf '%-16s SKIPPED (the budget is spent)\n' "$name"
    failed+=("$name")
    return 1
  fi
  ((limit <= left)) || limit=$left
  if declare -F "$1" >/dev/null; then  # a function of this script: timeout runs it in a bash of its own
    export -f "${1?}"
    timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" >"$work/$name.log" 2>&1
  else
    timeout --kill-after=5 "$limit" "$@" >"$work/$name.log" 2>&1
  fi
  rc=$?
  local verdict="passed"
  if ((rc == 124 || rc == 137)); then
    verdict="TIMED OUT after $limit s"
  elif ((rc != 0)); then
    verdict="FAILED (exit $rc)"
  fi
  printf '%-16s %s  (%d s, %s.log in device-check.tar.gz)\n' "$name" "$verdict" $(($(date +%s) - start)) "$name"
  if ((rc != 0)); then
    failed+=("$name")
    tail -n 25 "$work/$name.log"
  fi
  pack
  return $rc
}

nvidia-smi >"$work/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed: no GPU driver?"
head -n 12 "$work/nvidia-smi.txt"
# This GPU's architecture only ("9.0" -> 90): the build is the check's longest stage.
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
[[ $arch =~ ^[0-9]+$ ]] || arch="80;90"
export arch
echo "building for CUDA architecture $arch"

build() {
  cmake --preset cuda -DCMAKE_CUDA_ARCHITECTURES="$arch" && cmake --build --preset cuda -j "$(nproc)"
}
if ! stage build 240 build; then
  echo "the build failed: nothing else can run"
  exit 1
fi

# The first figures: one square GEMM in each precision, as parabench-micro times it (TFLOP/s per row),
# and what cuBLAS ran for it: cuBLASLt's trace of its matmuls (the algorithm, tile and stages it chose;
# CUBLASLT_LOG_LEVEL=2), and the kernels' names where Nsight Systems is installed.
gemm() {
  CUBLASLT_LOG_LEVEL=2 CUBLASLT_LOG_FILE="$work/cublaslt-%i.log" build-cuda/bench/micro/parabench-micro \
    --ops none --benchmark_filter='gemm/cuda/.*/N4096_' --out "$work/gemm.h5"
}
stage gemm 30 gemm
grep -E "gemm/cuda" "$work/gemm.log" | head -n 4
cat "$work"/cublaslt-*.log 2>/dev/null | grep -iE "matmul" | grep -oiE "(algo|tile|stages|kernel)[^ ,]*" |
  sort | uniq -c | sort -rn | head -n 8
if command -v nsys >/dev/null 2>&1; then
  gemm_kernels() {
    nsys profile -o "$work/gemm" --force-overwrite true --stats=false build-cuda/bench/micro/parabench-micro \
      --ops none --benchmark_filter='gemm/cuda/.*/N4096_' --out "$work/gemm-nsys.h5" >/dev/null &&
      nsys stats -q --report cuda_gpu_kern_sum --format csv "$work/gemm.nsys-rep"
  }
  stage gemm-kernels 40 gemm_kernels
  grep -iE "gemm|xmma|cutlass" "$work/gemm-kernels.log" | cut -c1-200 | head -n 4
fi

stage ops 60 build-cuda/tests/test_cuda_ops --gtest_output="xml:$work/test_cuda_ops.xml"

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
stage reference-fp32 45 reference "$dp" fp32 1e-4 "${tiny[@]}"
stage reference-fp32-b 45 reference "$dp" fp32 1e-4 "${awkward[@]}"
stage reference-bf16 45 reference "$dp" bf16 1e-2 "${tiny[@]}" --attention native
stage reference-bf16-cudnn 45 reference "$dp" bf16 1e-2 "${tiny[@]}" --attention cudnn
stage reference-moe 45 reference "$ep" fp32 1e-4 "${tiny[@]}" "${moe[@]}"
stage reference-llama 45 reference "$dp" fp32 1e-4 "${tiny[@]}" --arch llama --kv-heads 2

stage apps 120 env PB_BIN_DIR="$repo/build-cuda/bench" "$python" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_apps.py

stage vs-torch 150 "$python" bench/dp/vs_torch_gpu.py --bin "$dp" --out "$work/vs-torch"
cat "$work/vs-torch/vs_torch_gpu.md" 2>/dev/null
pack

if ((${#failed[@]})); then
  echo "device check: FAILED stages: ${failed[*]}"
  exit 1
fi
echo "device check: every stage passed"
