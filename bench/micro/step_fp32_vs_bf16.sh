#!/usr/bin/env bash
# Mixed precision against fp32 for a whole training step: parabench-dp (model small, 1 rank) and
# parabench-fsdp (model small, FULL_SHARD, 4 ranks), each in fp32 and in bf16 (SPEC 2.3: bf16 parameters
# and activations, fp32 master weights), alternating, REPEATS times. Prints per configuration the median
# over the runs of each run's median step time, the peak memory per rank (measured, max over ranks: the
# same in every run) and the bf16/fp32 ratios.
# Usage: bench/micro/step_fp32_vs_bf16.sh [REPEATS (default 3)] [more app options ...]
#   PB_BUILD_DIR: the build folder (default build/); PB_MPIEXEC: the launcher (default mpiexec);
#   PB_PYTHON: a python3 with h5py (default /usr/bin/python3).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bin=${PB_BUILD_DIR:-$repo/build}/bench
mpiexec=${PB_MPIEXEC:-mpiexec}
python=${PB_PYTHON:-/usr/bin/python3}  # with h5py (scripts/setup.sh installs python3-h5py)
repeats=${1:-3}
shift || true
for app in dp fsdp; do
  [[ -x $bin/$app/parabench-$app ]] || { echo "step_fp32_vs_bf16: $bin/$app/parabench-$app is not built" >&2; exit 2; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() {  # name ranks app dtype repeat options...
  local name=$1 ranks=$2 app=$3 dtype=$4 rep=$5
  shift 5
  HDF5_USE_FILE_LOCKING=FALSE "$mpiexec" -n "$ranks" "$bin/$app/parabench-$app" --model small --steps 8 --warmup 2 \
    --dtype "$dtype" --quiet --out "$work/${name}_${dtype}_${rep}.h5" "$@" >/dev/null
}
for ((rep = 0; rep < repeats; ++rep)); do
  for dtype in fp32 bf16; do
    run dp1 1 dp "$dtype" "$rep" --micro-batch 4 --threads 2 "$@"
    run fsdp4 4 fsdp "$dtype" "$rep" --shard FULL_SHARD --micro-batch 1 --threads 1 "$@"
  done
done

"$python" - "$work" "$repeats" <<'PY'
import glob
import os
import statistics
import sys

os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"
import h5py

work, repeats = sys.argv[1], int(sys.argv[2])
print(f"{'configuration':<28} {'fp32 step ms':>12} {'bf16 step ms':>12} {'ratio':>6} "
      f"{'fp32 peak MiB':>13} {'bf16 peak MiB':>13} {'ratio':>6}")
for name, what in (("dp1", "dp small, 1 rank x 2 thr"), ("fsdp4", "fsdp small FULL_SHARD, 4x1")):
    row = {}
    for dtype in ("fp32", "bf16"):
        times, peaks = [], set()
        for path in sorted(glob.glob(os.path.join(work, f"{name}_{dtype}_*.h5"))):
            with h5py.File(path, "r") as f:
                times.append(float(f["summary"].attrs["step_time_s"]))
                peaks.add(int(max(f["memory/measured/peak_total"][()])))
        row[dtype] = (statistics.median(times) * 1e3, max(peaks))
    (t32, p32), (t16, p16) = row["fp32"], row["bf16"]
    print(f"{what:<28} {t32:12.1f} {t16:12.1f} {t16 / t32:6.2f} {p32 / 2**20:13.2f} {p16 / 2**20:13.2f} {p16 / p32:6.2f}")
print(f"(median of {repeats} runs of 6 measured steps each; peak: /memory/measured/peak_total)")
PY
