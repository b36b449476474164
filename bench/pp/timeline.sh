#!/usr/bin/env bash
# One command for the pipeline diagram: runs parabench-pp (pp 4, 8 micro-batches, 1F1B by default)
# with --trace and renders the last step with analysis/timeline.py.
# Usage: bench/pp/timeline.sh [SCHEDULE (1f1b)] [OUT_DIR (results)] [more parabench-pp options]
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
schedule=${1:-1f1b} out=${2:-results}
shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$out"
chunks=1
[[ $schedule == interleaved ]] && chunks=2
mpiexec -n 4 "${PB_BUILD_DIR:-$repo/build}/bench/pp/parabench-pp" --model tiny --layers 8 --hidden 128 --seq 64 \
  --pp 4 --schedule "$schedule" --virtual-stages "$chunks" --global-batch 8 --steps 3 --warmup 1 --quiet \
  --trace "$out/pp_$schedule.json" --out "$out/pp_$schedule.h5" --overwrite "$@"
cd "$repo" && "${PB_PYTHON:-/usr/bin/python3}" -m analysis.timeline "$out/pp_$schedule.json" --out "$out/pp_$schedule.png"
