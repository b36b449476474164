#!/usr/bin/env python3
"""Time the PyTorch reference training step on CPU, as a baseline for the C++ CPU backend.

    bench_torch.py [--model small|tiny] [--micro-batch 8] [--threads 2] [--steps 10] [--warmup 2]

Each step is the full single-rank training step of gpt_ref.py (synthetic batch, forward, backward,
clip_grad_norm_, AdamW) with global batch = micro-batch. Prints every step's time and finally
`TORCH_RESULT step_time_s=<median over the measured steps>`.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt_ref  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", choices=sorted(gpt_ref.PRESETS), default="small")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="measured steps")
    ap.add_argument("--warmup", type=int, default=2, help="steps run before the measured ones")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.micro_batch < 1 or args.threads < 1:
        ap.error("--steps, --micro-batch and --threads must be >= 1, --warmup >= 0")

    torch.set_num_threads(args.threads)
    cfg = gpt_ref.Config(**gpt_ref.PRESETS[args.model], seed=args.seed)
    trainer = gpt_ref.Trainer(cfg, micro_batch=args.micro_batch, grad_accum=1, lr=3e-4, clip=1.0)
    print(f"torch {torch.__version__}, {args.threads} threads; model {args.model} "
          f"(L{cfg.layers} h{cfg.hidden} a{cfg.heads} S{cfg.seq} V{cfg.vocab}), micro-batch {args.micro_batch}")

    times = []
    for s in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, _, _ = trainer.step(s)
        dt = time.perf_counter() - t0
        measured = s >= args.warmup
        if measured:
            times.append(dt)
        print(f"step {s:3d}  loss {loss:.4f}  time {dt:.4f} s{'' if measured else '  (warm-up)'}")

    median = statistics.median(times)
    tokens_per_s = args.micro_batch * cfg.seq / median
    print(f"median step time {median:.4f} s over {len(times)} steps ({tokens_per_s:.0f} tokens/s)")
    print(f"TORCH_RESULT step_time_s={median:.6f}")


if __name__ == "__main__":
    main()
