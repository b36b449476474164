#!/usr/bin/env bash
# Measured pipeline bubble against the schedules' theory, on a machine with a core (or more) per
# rank: builds the CPU preset into build-bubble/, then runs parabench-pp at pp 4 with 8 micro-batches
# on a model whose stages are balanced, for gpipe and 1f1b, and prints each rank's bubble fraction
# beside the theory, then the schedule replayed with the measured compute times (bench/pp/bubble_replay.py).
# Logs, traces and result files go to $OUT (default results/bubble).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-$repo/results/bubble}
mkdir -p "$out"
cd "$repo"
cmake -S . -B build-bubble -DCMAKE_BUILD_TYPE=Release -DPB_BUILD_TESTS=OFF >"$out/cmake.log" 2>&1
cmake --build build-bubble -j "$(nproc)" --target parabench-pp >>"$out/cmake.log" 2>&1
launch=(mpiexec -n 4)
if mpiexec --version 2>&1 | grep -qiE "open ?mpi|openrte"; then
  launch+=(--bind-to core --map-by core)
  if [[ $(id -u) -eq 0 ]]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
fi
model=(--layers 8 --hidden 256 --heads 4 --seq 128 --vocab 64 --ffn 1024 --micro-batch 1 --threads 1)
for schedule in gpipe 1f1b; do
  "${launch[@]}" build-bubble/bench/pp/parabench-pp "${model[@]}" --pp 4 --schedule "$schedule" --global-batch 8 \
    --steps 6 --warmup 2 --quiet --out "$out/$schedule.h5" --overwrite --trace "$out/$schedule.json" >"$out/$schedule.log" 2>&1
  "${PB_PYTHON:-python3}" - "$out/$schedule.h5" "$schedule" <<'PY'
import sys, h5py
f = h5py.File(sys.argv[1], "r")
b = f["pipeline/bubble_fraction"]
print(f"{sys.argv[2]:>6}: bubble per rank {[round(float(x), 3) for x in b[:]]}, mean {b[:].mean():.3f}, "
      f"theory {b.attrs['theoretical']:.3f}, step {f['summary'].attrs['step_time_s']:.4f} s")
PY
  # Where the excess over the theory comes from: unequal stages, or waiting on messages.
  "${PB_PYTHON:-python3}" bench/pp/bubble_replay.py "$out/$schedule.h5" "$out/$schedule.json"
done
