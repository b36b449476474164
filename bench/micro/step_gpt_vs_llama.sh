#!/usr/bin/env bash
# The gpt block (SPEC 2) against the Llama-style block (SPEC 2.5) at an equal parameter count, one whole
# training step: parabench-dp on 1 rank, model `small` (L4 h256 a8 S128 V4096, GELU MLP of 4h) and its
# llama counterpart (L4 h256 a8, 2 key/value heads, SwiGLU width 816, chosen so that the parameter counts
# agree within 1 %), alternating, REPEATS times. Prints per block the median over the runs of each run's
# step time (/summary step_time_s), tokens/s, the model FLOPs per step (SPEC 6, each block's own formula),
# the parameters (from /memory/measured/parameters) and the llama/gpt ratios.
# Usage: bench/micro/step_gpt_vs_llama.sh [REPEATS (default 3)] [more app options ...]
#   PB_BUILD_DIR: the build folder (default build/); PB_MPIEXEC: the launcher (default mpiexec);
#   PB_PYTHON: a python3 with h5py (default /usr/bin/python3).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
bin=${PB_BUILD_DIR:-$repo/build}/bench/dp/parabench-dp
mpiexec=${PB_MPIEXEC:-mpiexec}
python=${PB_PYTHON:-/usr/bin/python3}  # with h5py (scripts/setup.sh installs python3-h5py)
repeats=${1:-3}
shift || true
[[ -x $bin ]] || { echo "step_gpt_vs_llama: $bin is not built" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

common=(--model small --steps 8 --warmup 2 --micro-batch 4 --threads 2 --dtype fp32 --quiet)
for ((rep = 0; rep < repeats; ++rep)); do
  HDF5_USE_FILE_LOCKING=FALSE "$mpiexec" -n 1 "$bin" "${common[@]}" --out "$work/gpt_$rep.h5" "$@" >/dev/null
  HDF5_USE_FILE_LOCKING=FALSE "$mpiexec" -n 1 "$bin" "${common[@]}" --arch llama --kv-heads 2 --ffn 816 \
    --out "$work/llama_$rep.h5" "$@" >/dev/null
done

"$python" - "$work" "$repeats" <<'PY'
import glob
import os
import statistics
import sys

os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"
import h5py

work, repeats = sys.argv[1], int(sys.argv[2])
rows = {}
for block in ("gpt", "llama"):
    times, tokens, flops, params = [], [], set(), set()
    for path in sorted(glob.glob(os.path.join(work, f"{block}_*.h5"))):
        with h5py.File(path, "r") as f:
            s = f["summary"].attrs
            times.append(float(s["step_time_s"]))
            tokens.append(float(s["tokens_per_s"]))
            flops.add(float(s["model_flops_per_step"]))
            params.add(int(f["memory/measured/parameters"][()][0]) // 4)  # fp32 parameters
    rows[block] = (statistics.median(times) * 1e3, statistics.median(tokens), max(flops), max(params))
print(f"{'block':<6} {'step ms':>8} {'tokens/s':>9} {'GFLOP/step':>10} {'parameters':>11}")
for block, (ms, tps, flop, params) in rows.items():
    print(f"{block:<6} {ms:8.1f} {tps:9.0f} {flop / 1e9:10.2f} {params:11d}")
(g_ms, g_tps, g_flop, g_p), (l_ms, l_tps, l_flop, l_p) = rows["gpt"], rows["llama"]
print(f"{'ratio':<6} {l_ms / g_ms:8.2f} {l_tps / g_tps:9.2f} {l_flop / g_flop:10.2f} {l_p / g_p:11.3f}")
print(f"(llama / gpt; median of {repeats} runs of 6 measured steps each, 1 rank × 2 threads, fp32)")
PY
