#!/usr/bin/env python3
"""Step time, tokens/s and all-to-all share of parabench-ep at ep = 1, 2, 4 on this machine, at a
fixed global batch: ep ranks (dp = ep), RUNS runs of each, the median of the runs' median step times,
and the share of each rank's step time spent inside the all-to-alls (/comm/all_to_all/time_s over
/steps/time_s, mean over ranks), for each capacity factor.

    /usr/bin/python3 bench/ep/scaling.py [--model small] [--experts 8] [--top-k 2] [--runs 3]
                                         [--capacity-factors 1.0,0]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--degrees", default="1,2,4")
    parser.add_argument("--capacity-factors", default="1.0,0")
    parser.add_argument("--build", default=os.path.join(REPO, "build"))
    args = parser.parse_args()
    app = os.path.join(args.build, "bench", "ep", "parabench-ep")
    if not os.access(app, os.X_OK):
        sys.exit(f"scaling.py: {app} is not built (cmake --build build)")
    print(f"parabench-ep, model {args.model}, E {args.experts}, k {args.top_k}, micro-batch {args.micro_batch}, "
          f"global batch {args.global_batch}, {args.steps} steps (2 warm-up), median of {args.runs} runs")
    print(f"{'capacity':>8} {'ep':>3} {'ranks':>5} {'step time s':>12} {'tokens/s':>10} {'all-to-all':>11} "
          f"{'dropped':>8} {'imbalance':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for cf in args.capacity_factors.split(","):
            for ep in [int(d) for d in args.degrees.split(",")]:
                times, shares = [], []
                for run in range(args.runs):
                    out = os.path.join(tmp, f"ep{ep}_{cf}_{run}.h5")
                    cmd = ["mpiexec", "-n", str(ep), app, "--model", args.model, "--ep", str(ep),
                           "--experts", str(args.experts), "--top-k", str(args.top_k), "--capacity-factor", cf,
                           "--micro-batch", str(args.micro_batch), "--global-batch", str(args.global_batch),
                           "--steps", str(args.steps), "--warmup", "2", "--quiet", "--out", out]
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                    with h5py.File(out, "r") as f:
                        times.append(float(f["summary"].attrs["step_time_s"]))
                        a2a = f["comm/all_to_all/time_s"][:]          # [ranks], all steps
                        busy = f["steps/time_s"][:].sum(axis=0)       # [ranks], all steps
                        shares.append(float(np.mean(a2a / busy)))
                        dropped = float(f["summary"].attrs["moe_dropped_fraction"])
                        imbalance = float(f["summary"].attrs["moe_imbalance"])
                        tokens_per_step = int(f["config"].attrs["global_batch"]) * int(f["config"].attrs["seq"])
                step = statistics.median(times)
                print(f"{cf:>8} {ep:>3} {ep:>5} {step:>12.4f} {tokens_per_step / step:>10.0f} "
                      f"{statistics.median(shares):>10.1%} {dropped:>8.1%} {imbalance:>9.2f}")


if __name__ == "__main__":
    main()
