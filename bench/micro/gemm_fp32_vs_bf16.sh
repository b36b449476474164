#!/usr/bin/env bash
# fp32 against bf16 matrix products on the CPU backend: runs parabench-micro's gemm/cpu benchmarks five
# times each and prints, per shape, the median GFLOP/s of each dtype and their ratio (bf16 / fp32).
# Usage: bench/micro/gemm_fp32_vs_bf16.sh [parabench-micro options ...]
#   e.g. --threads 2, --benchmark_min_time=0.05, or --benchmark_filter='gemm/cpu/.*/small\.' to narrow
#   the default filter ^gemm/cpu/ (a later flag wins). PB_BUILD_DIR: the build folder (default build/).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
micro=${PB_BUILD_DIR:-$repo/build}/bench/micro/parabench-micro
python=${PB_PYTHON:-python3}
[[ -x $micro ]] || { echo "gemm_fp32_vs_bf16: $micro is not built (cmake --build build --target parabench-micro)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Google Benchmark's console report goes to stderr as progress; the table alone to stdout. A failed
# benchmark (exit 3) still leaves the others' results to print.
status=0
"$micro" --benchmark_filter='^gemm/cpu/' --benchmark_repetitions=5 --benchmark_report_aggregates_only=true --ops none --out "$work/gemm.h5" \
  --benchmark_out="$work/gemm.json" --benchmark_out_format=json "$@" >&2 || status=$?
[[ -s $work/gemm.json ]] || exit "$status"

"$python" - "$work/gemm.json" <<'PY'
import json
import sys

with open(sys.argv[1]) as f:
    report = json.load(f)
rates = {}   # shape -> {dtype: median GFLOP/s}
labels = {}  # dtype -> the backend's matmul_precision()
errors = []
repetitions = set()
for bench in report["benchmarks"]:
    # run_name: gemm/cpu/<dtype>/<shape>/N.._C.._OC../manual_time
    _, _, dtype, shape = bench["run_name"].removesuffix("/manual_time").split("/", 3)
    if bench.get("error_occurred"):
        errors.append(f"{bench['run_name']}: {bench.get('error_message', '')}")
    elif bench.get("aggregate_name") == "median":
        rates.setdefault(shape, {})[dtype] = bench["GFLOP/s"]
        repetitions.add(bench["repetitions"])
        labels[dtype] = bench.get("label", "")

context = report["context"]
load = ", ".join(f"{x:.1f}" for x in context.get("load_avg", []))
print(f"parabench-micro gemm on the CPU ({context.get('cpu', '?')}), {context.get('threads', '?')} threads, "
      f"median of {'/'.join(map(str, sorted(repetitions)))} repetitions; load average {load}")
for dtype in ("fp32", "bf16"):
    print(f"  {dtype}: {labels.get(dtype, 'not run')}")
width = max([len("shape")] + [len(shape) for shape in rates])
print(f"{'shape':<{width}}  {'fp32 GFLOP/s':>12}  {'bf16 GFLOP/s':>12}  {'bf16/fp32':>9}")
for shape, by_dtype in rates.items():
    fp32, bf16 = by_dtype.get("fp32"), by_dtype.get("bf16")
    cell = lambda x: f"{x:12.1f}" if x is not None else f"{'-':>12}"
    ratio = f"{bf16 / fp32:9.2f}" if fp32 and bf16 else f"{'-':>9}"
    print(f"{shape:<{width}}  {cell(fp32)}  {cell(bf16)}  {ratio}")
for error in errors:
    print(f"error: {error}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
exit "$status"
