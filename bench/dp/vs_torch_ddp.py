#!/usr/bin/env python3
"""parabench-dp against PyTorch on this machine's CPU, per core (issue: the CPU backend at its limit).

    /usr/bin/python3 bench/dp/vs_torch_ddp.py [--model small] [--micro-batch 4] [--repeats 3]
                                              [--steps 10] [--warmup 2] [--bin build/bench/dp/parabench-dp]
                                              [--breakdown] [--out DIR]

Two comparisons, each run alternating (parabench, then PyTorch) REPEATS times, each run's step time the
median over its measured steps of the slowest rank, the figure the median over the runs:

  2 ranks × 1 thread   mpiexec -n 2 parabench-dp --threads 1  against  torch DistributedDataParallel,
                       gloo, 2 processes × 1 thread
  1 rank × 2 threads   parabench-dp --threads 2               against  torch on 2 intra-op threads

Each PyTorch run is a process of its own with its threads set before torch loads: torch.set_num_threads
and OMP_NUM_THREADS, and OPENBLAS_NUM_THREADS, since Debian's torch calls OpenBLAS (libblas.so.3), whose
own thread pool would otherwise take every core.

The same model (tests/reference/gpt_ref.py, SPEC 2's GPT and initialisation), the same micro-batch per
rank and global batch, the same synthetic data, AdamW (lr 3e-4, betas 0.9/0.95, eps 1e-8, weight decay
0.1 on matrices) and clipping at 1.0. Prints both step times and parabench/PyTorch (below 1: parabench is
faster).

--breakdown adds the per-op view of one parabench step on one rank × 1 thread: parabench-micro times every
kernel of the step at its shape (the small preset, micro-batch 4) and parabench-plan --calibration adds
them up per call as the app makes them; beside each op its limit on this machine, the rate PyTorch's
single-threaded kernel reaches at the same shape (torch.mm for the products, a copy for the memory-bound
ops' bandwidth). The ops with the largest time over their limit are where the step can gain.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "reference"))


def torch_worker(rank, world, args, port, out):
    """One PyTorch process: DDP over gloo when world > 1; writes its step times to out/rank<r>.json."""
    import torch
    import torch.distributed as dist

    import gpt_ref

    torch.set_num_threads(args.threads)
    cfg = gpt_ref.Config(**gpt_ref.PRESETS[args.model], seed=1234)
    gpt = gpt_ref.GPT(cfg)

    class Wrapped(torch.nn.Module):
        """gpt_ref's GPT as an nn.Module (its parameter names hold dots), so that DDP can wrap it."""

        def __init__(self):
            super().__init__()
            self.weights = torch.nn.ParameterList([torch.nn.Parameter(t.detach().clone()) for t in gpt.params.values()])
            for name, p in zip(list(gpt.params), self.weights):
                gpt.params[name] = p

        def forward(self, inputs, targets):
            return gpt.loss_terms(inputs, targets)[0]

    model = Wrapped()
    if world > 1:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    params = list(gpt.params.values())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    data = gpt_ref.SyntheticData(cfg.seed, cfg.vocab, cfg.seq)
    b, G, S = args.micro_batch, args.micro_batch * world, cfg.seq
    times = []
    import numpy as np

    for step in range(args.warmup + args.steps):
        if world > 1:
            dist.barrier()  # steps start together, as parabench's do
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        toks = data.samples(step * G + rank * b + np.arange(b))
        loss = model(toks[:, :-1], toks[:, 1:]) / (b * S)  # DDP averages the ranks' gradients
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
    Path(out, f"rank{rank}.json").write_text(json.dumps(times))
    if world > 1:
        dist.destroy_process_group()


def threads_env(threads):
    """The environment of a PyTorch process of `threads` threads: its OpenMP pool and the BLAS library's own
    (Debian's torch calls libblas.so.3, OpenBLAS, whose pthread pool would otherwise take every core)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads)}


def torch_processes(args):
    """--torch-world W: the PyTorch side of one comparison run, in a process of its own (so that every
    thread setting is in place before torch loads); prints the step time."""
    import torch.multiprocessing as mp

    world = args.torch_world
    with tempfile.TemporaryDirectory() as out:
        port = 29500 + os.getpid() % 1000
        if world == 1:
            torch_worker(0, 1, args, port, out)
        else:
            mp.spawn(torch_worker, args=(world, args, port, out), nprocs=world, join=True)
        per_rank = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    slowest = [max(ts) for ts in zip(*per_rank)][args.warmup:]
    print(f"TORCH_STEP_S {statistics.median(slowest)}")


def torch_step_time(args, world, threads):
    cmd = [sys.executable, __file__, "--torch-world", str(world), "--threads", str(threads), "--model", args.model,
           "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=threads_env(threads)).stdout
    return float(re.search(r"TORCH_STEP_S (\S+)", out).group(1))


def parabench_step_time(args, world, threads):
    with tempfile.TemporaryDirectory() as out:
        cmd = ["mpiexec", "-n", str(world), args.bin, "--model", args.model, "--micro-batch", str(args.micro_batch),
               "--threads", str(threads), "--steps", str(args.warmup + args.steps), "--warmup", str(args.warmup),
               "--dtype", "fp32", "--quiet", "--out", str(Path(out, "run.h5"))]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return float(re.search(r"step_time_s=(\S+)", line).group(1))


def compare(args):
    rows = []
    for label, world, threads in (("2 ranks × 1 thread", 2, 1), ("1 rank × 2 threads", 1, 2)):
        ours, theirs = [], []
        for r in range(args.repeats):
            ours.append(parabench_step_time(args, world, threads))
            theirs.append(torch_step_time(args, world, threads))
            print(f"  {label}, run {r + 1}: parabench {ours[-1] * 1e3:.1f} ms, pytorch {theirs[-1] * 1e3:.1f} ms",
                  flush=True)
        rows.append((label, statistics.median(ours), statistics.median(theirs)))
    print(f"\nmodel {args.model}, micro-batch {args.micro_batch} per rank, fp32, median of {args.repeats} alternating "
          f"runs ({args.steps} measured steps each)")
    print(f"{'layout':<20} {'parabench ms':>12} {'pytorch ms':>11} {'parabench/pytorch':>18}")
    for label, ours, theirs in rows:
        print(f"{label:<20} {ours * 1e3:12.1f} {theirs * 1e3:11.1f} {ours / theirs:18.2f}")
    return rows


def limits(kernels):
    """This machine's single-threaded limits: torch.mm's GFLOP/s at each product's shape, and a copy's GB/s,
    measured in a process of one thread (threads_env)."""
    shapes = sorted({(k["N"], k["C"], k["OC"]) for k in kernels if k["kernel"] == "matmul"})
    cmd = [sys.executable, __file__, "--limits", json.dumps(shapes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=threads_env(1)).stdout
    measured = json.loads(out.strip().splitlines()[-1])
    return {**{tuple(s): rate for s, rate in zip(shapes, measured["gemm"])}, "copy_gb_s": measured["copy_gb_s"]}


def measure_limits(shapes):
    import torch

    torch.set_num_threads(1)

    def best(fn, repeats=5):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    gemm = []
    for n, c, oc in shapes:
        a, b = torch.randn(n, c), torch.randn(c, oc)
        gemm.append(2.0 * n * c * oc / best(lambda: torch.mm(a, b)) / 1e9)
    src = torch.randn(1 << 24)
    dst = torch.empty_like(src)
    print(json.dumps({"gemm": gemm, "copy_gb_s": 2 * src.numel() * 4 / best(lambda: dst.copy_(src)) / 1e9}))


def breakdown(args):
    micro = Path(args.bin).parent.parent / "micro" / "parabench-micro"
    plan = Path(args.bin).parent.parent / "plan" / "parabench-plan"
    with tempfile.TemporaryDirectory() as out:
        cal = Path(out, "micro.h5")
        subprocess.run(["mpiexec", "-n", "1", str(micro), "--threads", "1", "--ops", "none", "--dtype", "fp32",
                        # the cached products (not parabench-micro's /cold rows): as torch.mm is timed beside them
                        f"--benchmark_filter=^(gemm|kernel)/cpu/fp32/.*{args.model}[^/]*/[^/]*/manual_time",
                        "--benchmark_min_time=0.1", "--out", str(cal)], check=True, capture_output=True)
        result = subprocess.run([str(plan), "--app", "dp", "--model", args.model, "--gpus", "1",
                                 "--micro-batch", str(args.micro_batch), "--dtype", "fp32", "--calibration", str(cal),
                                 "--format", "json"], check=True, capture_output=True, text=True)
    t = json.loads(result.stdout)["plans"][0]["time_estimate"]
    lim = limits(t["kernels"])
    total = sum(k["seconds"] for k in t["kernels"])
    print(f"\none parabench step on 1 rank × 1 thread, model {args.model}, micro-batch {args.micro_batch}: each op as "
          f"parabench-micro timed it, per step (parabench-plan --calibration); limit: torch.mm at the shape, or a "
          f"copy's {lim['copy_gb_s']:.1f} GB/s")
    print(f"{'op':<58} {'calls':>5} {'ms':>8} {'share':>6} {'rate':>14} {'limit':>14} {'ms at limit':>11}")
    rows = []
    for k in t["kernels"]:
        seconds = k["seconds"]
        if k["kernel"] == "matmul":
            rate = k["work"] * k["calls_per_step"] / seconds / 1e9
            limit = lim[(k["N"], k["C"], k["OC"])]
            unit = "GFLOP/s"
        elif k["kernel"].startswith("attention"):
            rate, limit, unit = k["work"] * k["calls_per_step"] / seconds / 1e9, float("nan"), "GFLOP/s"
        else:
            rate, limit, unit = k["work"] * k["calls_per_step"] / seconds / 1e9, lim["copy_gb_s"], "GB/s"
        at_limit = k["work"] * k["calls_per_step"] / (limit * 1e9) if limit == limit else float("nan")
        rows.append((seconds - (at_limit if at_limit == at_limit else 0), k, seconds, rate, limit, unit, at_limit))
    for _, k, seconds, rate, limit, unit, at_limit in sorted(rows, key=lambda r: -r[0]):
        what = f"{k['kernel']}: {k['what']}"[:58]
        print(f"{what:<58} {k['calls_per_step']:5g} {seconds * 1e3:8.2f} {seconds / total:6.1%} "
              f"{rate:8.1f} {unit:<5} {limit:8.1f} {unit:<5} {at_limit * 1e3:11.2f}")
    print(f"{'sum (the calibrated compute of a step)':<58} {'':>5} {total * 1e3:8.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bin", default=str(REPO / "build" / "bench" / "dp" / "parabench-dp"))
    ap.add_argument("--breakdown", action="store_true", help="the per-op view of one step (parabench-micro)")
    ap.add_argument("--no-compare", action="store_true", help="the breakdown only")
    ap.add_argument("--torch-world", type=int, help=argparse.SUPPRESS)  # internal: the PyTorch side of a run
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--limits", help=argparse.SUPPRESS)  # internal: the single-threaded limits
    args = ap.parse_args()
    if args.torch_world:
        torch_processes(args)
        return
    if args.limits:
        measure_limits([tuple(s) for s in json.loads(args.limits)])
        return
    if not Path(args.bin).is_file():
        ap.error(f"{args.bin} is not built (cmake --build --preset cpu)")
    if not args.no_compare:
        compare(args)
    if args.breakdown or args.no_compare:
        breakdown(args)


if __name__ == "__main__":
    main()
