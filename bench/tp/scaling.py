#!/usr/bin/env python3
"""Step time and communication share of parabench-tp at tp = 1, 2, 4 (one rank per tp rank) on this
machine: RUNS runs of each, the median of the runs' median step times, and the share of each rank's
step time spent inside tensor-parallel collectives (/comm/*/time_s over /steps/time_s, mean over ranks).

    /usr/bin/python3 bench/tp/scaling.py [--model small] [--micro-batch 4] [--runs 3] [--sequence-parallel]
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import h5py
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPS = ["all_reduce", "reduce_scatter", "all_gather", "all_to_all", "send", "recv", "broadcast"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--degrees", default="1,2,4")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--build", default=os.path.join(REPO, "build"))
    args = parser.parse_args()
    app = os.path.join(args.build, "bench", "tp", "parabench-tp")
    if not os.access(app, os.X_OK):
        sys.exit(f"scaling.py: {app} is not built (cmake --build build)")
    print(f"parabench-tp, model {args.model}, micro-batch {args.micro_batch}, {args.steps} steps (2 warm-up), "
          f"{'sequence parallel, ' if args.sequence_parallel else ''}median of {args.runs} runs")
    print(f"{'tp':>3} {'ranks':>5} {'step time s':>12} {'tokens/s':>10} {'comm share':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for tp in [int(d) for d in args.degrees.split(",")]:
            times, shares = [], []
            for run in range(args.runs):
                out = os.path.join(tmp, f"tp{tp}_{run}.h5")
                cmd = ["mpiexec", "-n", str(tp), app, "--model", args.model, "--tp", str(tp), "--micro-batch",
                       str(args.micro_batch), "--steps", str(args.steps), "--warmup", "2", "--quiet", "--out", out]
                if args.sequence_parallel and tp > 1:
                    cmd.append("--sequence-parallel")
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                with h5py.File(out, "r") as f:
                    times.append(float(f["summary"].attrs["step_time_s"]))
                    comm = sum(f[f"comm/{op}/time_s"][:] for op in OPS)       # [ranks], all steps
                    busy = f["steps/time_s"][:].sum(axis=0)                   # [ranks], all steps
                    shares.append(float(np.mean(comm / busy)))
                    tokens_per_step = int(f["config"].attrs["global_batch"]) * int(f["config"].attrs["seq"])
            step = statistics.median(times)
            tokens = tokens_per_step / step
            print(f"{tp:>3} {tp:>5} {step:>12.4f} {tokens:>10.0f} {statistics.median(shares):>10.1%}")


if __name__ == "__main__":
    main()
