#!/usr/bin/env python3
"""How far mixed precision (--dtype bf16, SPEC 2.3) moves each layout: every app's bf16 run of a small
model for 10 steps against the single-rank bf16 run of the same model (the bound tests/app/test_bf16.py
checks is 1e-3 relative) and against the same layout in fp32 (bound 2e-2), with fp32 and with bf16
gradients. Prints the largest relative difference over the steps of the loss and the gradient norm, and
of the final parameter norm.

Usage: /usr/bin/python3 bench/micro/bf16_agreement.py [--bin build/bench]   (needs mpiexec and h5py)
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
import h5py  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHAPE = ["--layers", "2", "--hidden", "32", "--heads", "4", "--seq", "16", "--vocab", "64", "--ffn", "64",
         "--micro-batch", "1", "--global-batch", "4", "--steps", "10", "--threads", "1", "--quiet"]
MOE = ["--experts", "4", "--top-k", "2", "--capacity-factor", "0"]
LAYOUTS = [("dp 2", "dp", 2, []), ("dp 4", "dp", 4, []), ("fsdp 4 FULL_SHARD", "fsdp", 4, ["--shard", "FULL_SHARD"]),
           ("fsdp 4 ZERO1", "fsdp", 4, ["--shard", "ZERO1"]), ("tp 2 sp", "tp", 2, ["--tp", "2", "--sequence-parallel"]),
           ("tp 2 x dp 2", "tp", 4, ["--tp", "2"]), ("pp 2 1f1b", "pp", 2, ["--pp", "2", "--schedule", "1f1b"]),
           ("cp 2 ring", "cp", 2, ["--cp", "2"]), ("cp 2 alltoall", "cp", 2, ["--cp", "2", "--cp-algo", "alltoall"]),
           ("ep 2", "ep", 2, [*MOE, "--ep", "2"])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default=str(REPO / "build" / "bench"), help="folder of the built apps")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bf16_agreement_"))

    def run(app, ranks, extra, name):
        path = work / f"{name}.h5"
        cmd = ["mpiexec", "-n", str(ranks), f"{args.bin}/{app}/parabench-{app}", *SHAPE, *extra, "--out", str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
        with h5py.File(path, "r") as f:
            return f["steps/loss"][()], f["steps/grad_norm"][()], float(f["summary"].attrs["final_param_norm"])

    def rel(a, b):
        return float(np.max(np.abs(np.asarray(a) - b) / np.abs(b)))

    print(f"{'layout':<20} {'grads':<5} | vs 1-rank bf16: {'loss':>8} {'grad_norm':>9} {'param_norm':>10} | "
          f"vs fp32: {'loss':>8}")
    for grads in ("fp32", "bf16"):
        g = ["--grad-dtype", "bf16"] if grads == "bf16" else []
        single = {"dp": run("dp", 1, ["--dtype", "bf16", *g], f"single_dp_{grads}"),
                  "ep": run("ep", 1, ["--dtype", "bf16", *MOE, "--ep", "1", *g], f"single_ep_{grads}")}
        for i, (name, app, ranks, extra) in enumerate(LAYOUTS):
            loss, norm, pnorm = run(app, ranks, ["--dtype", "bf16", *extra, *g], f"{i}_bf16_grads_{grads}")
            ref = single["ep" if app == "ep" else "dp"]
            fp32 = run(app, ranks, ["--dtype", "fp32", *extra], f"{i}_fp32")[0] if grads == "fp32" else None
            print(f"{name:<20} {grads:<5} | {'':15} {rel(loss, ref[0]):8.1e} {rel(norm, ref[1]):9.1e} "
                  f"{rel([pnorm], ref[2]):10.1e} | {'':8} " + (f"{rel(loss, fp32):8.1e}" if fp32 is not None else "-"),
                  flush=True)
    print(f"(result files in {work})")


if __name__ == "__main__":
    main()
