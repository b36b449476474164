#!/usr/bin/env python3
"""Context parallelism on this machine, at a fixed global batch of long sequences:

1. step time, tokens/s and communication share (/comm/*/time_s over /steps/time_s, mean over ranks) of
   each --cp-algo at cp = 1, 2, 4 (cp ranks; cp 1 is the backend's attention on one rank);
2. the causal load balance at the largest cp: the slowest rank's attention time over the fastest's
   (/summary cp_attention_time_ratio) for the zigzag and contiguous layouts.

RUNS runs each, the median of the runs' median step times (ratios: the median of the runs').

    /usr/bin/python3 bench/cp/scaling.py [--seq 1024] [--layers 2] [--hidden 64] [--heads 4] [--runs 3]
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


def run(app, ranks, args, out):
    subprocess.run(["mpiexec", "-n", str(ranks), app, *args, "--quiet", "--out", out], check=True,
                   stdout=subprocess.DEVNULL)
    with h5py.File(out, "r") as f:
        step = float(f["summary"].attrs["step_time_s"])
        comm = sum(f[f"comm/{op}/time_s"][:] for op in OPS)
        busy = f["steps/time_s"][:].sum(axis=0)
        ratio = float(f["summary"].attrs.get("cp_attention_time_ratio", float("nan")))
        tokens = int(f["config"].attrs["global_batch"]) * int(f["config"].attrs["seq"])
    return step, float(np.mean(comm / busy)), ratio, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--degrees", default="1,2,4")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (default 1: ranks are compared)")
    parser.add_argument("--build", default=os.path.join(REPO, "build"))
    args = parser.parse_args()
    app = os.path.join(args.build, "bench", "cp", "parabench-cp")
    if not os.access(app, os.X_OK):
        sys.exit(f"scaling.py: {app} is not built (cmake --build build)")
    model = ["--layers", args.layers, "--hidden", args.hidden, "--heads", args.heads, "--seq", args.seq,
             "--vocab", args.vocab, "--micro-batch", 1, "--global-batch", args.global_batch, "--steps", args.steps,
             "--warmup", 2, "--threads", args.threads]
    model = [str(a) for a in model]
    degrees = [int(d) for d in args.degrees.split(",")]
    print(f"parabench-cp, L{args.layers} h{args.hidden} a{args.heads} S{args.seq} V{args.vocab}, global batch "
          f"{args.global_batch}, {args.threads} thread(s) per rank, {args.steps} steps (2 warm-up), "
          f"median of {args.runs} runs")
    print(f"{'algo':>9} {'cp':>3} {'step time s':>12} {'tokens/s':>10} {'comm share':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for algo in ["ring", "allgather", "alltoall"]:
            for cp in degrees:
                results = [run(app, cp, [*model, "--cp", str(cp), "--cp-algo", algo],
                               os.path.join(tmp, f"{algo}{cp}_{i}.h5")) for i in range(args.runs)]
                step = statistics.median(r[0] for r in results)
                share = statistics.median(r[1] for r in results)
                print(f"{algo:>9} {cp:>3} {step:>12.4f} {results[0][3] / step:>10.0f} {share:>10.1%}")
        cp = max(degrees)
        print(f"\nload balance at cp {cp} (ring): slowest / fastest rank's attention time")
        for layout in ["zigzag", "contiguous"]:
            ratios = [run(app, cp, [*model, "--cp", str(cp), "--cp-layout", layout],
                          os.path.join(tmp, f"{layout}_{i}.h5"))[2] for i in range(args.runs)]
            print(f"{layout:>11} {statistics.median(ratios):>6.2f}   (runs: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
