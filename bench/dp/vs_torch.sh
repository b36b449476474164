#!/usr/bin/env bash
# Step time of parabench-dp against the PyTorch reference (tests/reference/bench_torch.py) on this
# machine: same model, micro-batch, threads and steps, one rank, RUNS runs each; prints the median
# of each tool's per-run median step time and their ratio.
# Usage: bench/dp/vs_torch.sh [MODEL (small)] [MICRO_BATCH (8)] [THREADS (2)] [RUNS (5)]
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
model=${1:-small} micro_batch=${2:-8} threads=${3:-2} runs=${4:-5}
app=${PB_BUILD_DIR:-$repo/build}/bench/dp/parabench-dp
python=${PB_PYTHON:-/usr/bin/python3}
[[ -x $app ]] || { echo "vs_torch: $app is not built (cmake --build build)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

median() { sort -g | awk '{v[NR]=$1} END {print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }

ours=() torch=()
for ((i = 1; i <= runs; i++)); do
  line=$(mpiexec -n 1 "$app" --model "$model" --micro-batch "$micro_batch" --threads "$threads" \
           --steps 10 --warmup 2 --quiet --out "$work/run$i.h5" | grep '^PARABENCH_RESULT')
  ours+=("$(sed -E 's/.*step_time_s=([^ ]+).*/\1/' <<<"$line")")
  line=$(OMP_NUM_THREADS=$threads "$python" "$repo/tests/reference/bench_torch.py" --model "$model" \
           --micro-batch "$micro_batch" --threads "$threads" --steps 10 --warmup 2 | grep '^TORCH_RESULT')
  torch+=("$(sed -E 's/.*step_time_s=([^ ]+).*/\1/' <<<"$line")")
  echo "run $i: parabench ${ours[-1]} s  torch ${torch[-1]} s"
done
m_ours=$(printf '%s\n' "${ours[@]}" | median)
m_torch=$(printf '%s\n' "${torch[@]}" | median)
echo "model $model, micro-batch $micro_batch, $threads threads, median of $runs runs (10 steps, 2 warm-up):"
printf 'parabench-dp %.4f s/step   pytorch %.4f s/step   pytorch/parabench %.2fx\n' "$m_ours" "$m_torch" \
  "$(awk -v a="$m_torch" -v b="$m_ours" 'BEGIN {print a / b}')"
