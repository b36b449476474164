#!/usr/bin/python3
"""The planner's calibrated step time against measured steps, on this machine.

1. Calibrates: parabench-micro on 2 ranks (mpiexec, 1 thread each) times the small preset's matrix
   products and kernels (fp32, cpu) and the collectives the runs below issue, into one HDF5 file.
2. Runs parabench-dp, parabench-fsdp --shard FULL_SHARD, parabench-tp --tp 2 and parabench-pp
   --schedule 1f1b on 2 ranks, --model small, 1 thread per rank, a few steps, and reads each run's
   /summary step_time_s (the median over the steps after warm-up of the slowest rank's time); --runs
   rounds of the four (default 2), each app's measured step the lowest of its rounds: the calibration
   times each kernel on an undisturbed machine, and a round that a neighbour slowed as a whole (a
   median does not see that) measures the neighbour.
3. Predicts each run with parabench-plan --calibration (the same options, --format json).
4. Prints app, predicted, measured, their ratio and the prediction's compute, exposed communication and
   bubble; writes the table as CSV (app, config, predicted_step_s, measured_step_s, ratio, compute_s,
   exposed_comm_s, bubble_s) for the report's plot; exits 1 when a ratio falls outside [0.75, 1.33].

    bench/plan/validate_step_time.py --bin-dir build/bench --out-dir results/step-time

The timings mean something only with a core per rank and nothing else running: a calibration taken
while another process held a core is twice as slow as one taken on an idle machine, and so are runs.
The script counts the CPU time other processes (and the hypervisor's steal) took from the machine
while it ran (/proc/stat, less its own children's); above --max-other-cores it prints the table but
exits 77 (ctest: skipped), since the comparison then measures the neighbours, not the model.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
import h5py  # noqa: E402

RANKS = 2
LOW, HIGH = 0.75, 1.33
MODEL = ["--model", "small", "--micro-batch", "4"]
# (app, binary, the options the app and the planner share, the planner's alone)
RUNS = [
    ("dp", "dp", [], []),
    ("fsdp", "fsdp", ["--shard", "FULL_SHARD"], []),
    ("tp", "tp", ["--tp", "2"], []),
    ("pp", "pp", ["--pp", "2", "--schedule", "1f1b", "--global-batch", "16"], []),
]
# parabench-micro: the small preset's shapes (what the runs compute at micro-batch 4) and the collectives
# up to the largest message of the runs (dp's 21 MB gradient all-reduce).
MICRO_FILTER = r"^gemm/cpu/fp32/small\.|^kernel/cpu/fp32/[a-z_]+/small/|^coll/"
MICRO_OPTIONS = ["--threads", "1", "--ops", "all_reduce,all_gather,reduce_scatter,send_recv", "--min-bytes", "1K",
                 "--max-bytes", "32M"]
DROPPED_ENV_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "PARABENCH_", "HYDRA_", "MPIR_")


def cpu_seconds_busy():
    """CPU seconds the whole machine spent busy (user, nice, system, irq, softirq, steal) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def environment():
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV_PREFIXES)}
    env.update({"OMP_NUM_THREADS": "1", "HDF5_USE_FILE_LOCKING": "FALSE"})
    return env


def run(command, timeout):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout,
                            env=environment(), stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        sys.exit(f"validate_step_time: {' '.join(map(str, command))} exited {result.returncode}\n"
                 f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


def calibrate(bin_dir, out, mpiexec, min_time):
    run([mpiexec, "-n", RANKS, bin_dir / "micro" / "parabench-micro", *MICRO_OPTIONS, "--out", out, "--overwrite",
         f"--benchmark_filter={MICRO_FILTER}", f"--benchmark_min_time={min_time}", "--benchmark_repetitions=3"],
        timeout=600)


def measure(bin_dir, app, binary, shared, out, mpiexec, steps, warmup):
    run([mpiexec, "-n", RANKS, bin_dir / binary / f"parabench-{binary}", *MODEL, *shared, "--threads", "1",
         "--backend", "cpu", "--dtype", "fp32", "--steps", steps, "--warmup", warmup, "--out", out, "--overwrite",
         "--quiet"], timeout=600)
    with h5py.File(out, "r") as f:
        return float(f["summary"].attrs["step_time_s"])


def predict(bin_dir, app, shared, planner_only, calibration):
    result = run([bin_dir / "plan" / "parabench-plan", *MODEL, "--app", app, "--gpus", RANKS, *shared, *planner_only,
                  "--backend", "cpu", "--dtype", "fp32", "--calibration", calibration, "--format", "json"], timeout=60)
    for line in result.stderr.splitlines():
        print(f"  {app}: {line}", file=sys.stderr)
    (plan,) = json.loads(result.stdout)["plans"]
    return plan["time_estimate"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin-dir", type=Path, required=True, help="the build's bench/ directory")
    parser.add_argument("--out-dir", type=Path, help="where the calibration, the runs and the CSV go (default: a "
                        "temporary directory, removed at the end)")
    parser.add_argument("--csv", type=Path, help="the table as CSV (default: OUT_DIR/step_time.csv when --out-dir)")
    parser.add_argument("--calibration", type=Path, help="an existing parabench-micro file instead of calibrating")
    parser.add_argument("--steps", type=int, default=7, help="steps per run (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps left out (default 2)")
    parser.add_argument("--runs", type=int, default=2, help="rounds of the four runs; each app's measured step is "
                        "the lowest of its rounds (default 2)")
    parser.add_argument("--min-time", default="0.1", help="parabench-micro's --benchmark_min_time (default 0.1)")
    parser.add_argument("--mpiexec", default=os.environ.get("PB_MPIEXEC", "mpiexec"))
    parser.add_argument("--max-other-cores", type=float, default=0.25,
                        help="CPU (in cores, averaged over the run) other processes may take before the comparison "
                             "is reported as skipped, exit 77 (default 0.25)")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < RANKS:
        print(f"validate_step_time: skipped: {os.cpu_count()} core(s), the runs need {RANKS}", file=sys.stderr)
        return 77
    start_wall, start_busy, start_own = time.monotonic(), cpu_seconds_busy(), own_cpu_seconds()

    with tempfile.TemporaryDirectory(prefix="pb-step-time-") as scratch:
        out_dir = args.out_dir or Path(scratch)
        out_dir.mkdir(parents=True, exist_ok=True)
        calibration = args.calibration or out_dir / "micro.h5"
        if not args.calibration:
            print(f"calibrating: parabench-micro on {RANKS} ranks, 1 thread each -> {calibration}", flush=True)
            calibrate(args.bin_dir, calibration, args.mpiexec, args.min_time)
        if args.runs < 1:
            parser.error(f"--runs {args.runs} must be at least 1")
        runs = {app: [] for app, *_ in RUNS}
        for round_ in range(args.runs):  # in rounds, so that a slow spell of the machine meets every app once
            for app, binary, shared, _ in RUNS:
                runs[app].append(measure(args.bin_dir, app, binary, shared, out_dir / f"{app}-{round_}.h5",
                                         args.mpiexec, args.steps, args.warmup))
        rows = []
        for app, binary, shared, planner_only in RUNS:
            measured = min(runs[app])
            t = predict(args.bin_dir, app, shared, planner_only, calibration)
            config = " ".join(["small", "mb4", f"ranks{RANKS}", *shared])
            rows.append({"app": app, "config": config, "predicted_step_s": t["step_s"], "measured_step_s": measured,
                         "ratio": t["step_s"] / measured, "compute_s": t["compute_s"],
                         "exposed_comm_s": t["exposed_comm_s"], "bubble_s": t["bubble_s"]})
            rounds = ", ".join(f"{m:.4f}" for m in runs[app])
            print(f"  {app}: predicted {t['step_s']:.4f} s, measured {measured:.4f} s (the lowest of {rounds})",
                  flush=True)

        header = f"{'app':5} {'predicted_s':>11} {'measured_s':>10} {'ratio':>6} {'compute_s':>9} " \
                 f"{'exposed_comm_s':>14} {'bubble_s':>8}  config"
        print(header)
        for r in rows:
            print(f"{r['app']:5} {r['predicted_step_s']:11.4f} {r['measured_step_s']:10.4f} {r['ratio']:6.3f} "
                  f"{r['compute_s']:9.4f} {r['exposed_comm_s']:14.4f} {r['bubble_s']:8.4f}  {r['config']}")
        csv_path = args.csv or (out_dir / "step_time.csv" if args.out_dir else None)
        if csv_path:
            with open(csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            print(f"written: {csv_path}")
        wall = time.monotonic() - start_wall
        other_cores = max(0.0, (cpu_seconds_busy() - start_busy) - (own_cpu_seconds() - start_own)) / wall
        print(f"other processes took {other_cores:.2f} cores on average over the {wall:.0f} s")
        if other_cores > args.max_other_cores:
            print(f"validate_step_time: skipped: other processes took {other_cores:.2f} cores on average (more than "
                  f"--max-other-cores {args.max_other_cores}): the timings measure them, not the model",
                  file=sys.stderr)
            return 77
        outside = [r["app"] for r in rows if not LOW <= r["ratio"] <= HIGH]
        if outside:
            print(f"validate_step_time: predicted/measured outside [{LOW}, {HIGH}] for {', '.join(outside)}",
                  file=sys.stderr)
            return 1
        print(f"every ratio within [{LOW}, {HIGH}]")
        return 0


if __name__ == "__main__":
    sys.exit(main())
