#!/usr/bin/env python3
"""The PyTorch peer of parabench-dp on one GPU, for timing: the reference model's shapes (SPEC 2:
pre-LayerNorm GPT, learned positions, tanh GELU, untied head without bias) with bf16 autocast,
scaled_dot_product_attention (causal), clip_grad_norm_ 1.0 and fused AdamW, run eager or compiled.

    torch_gpu.py --model gpt2-124m --micro-batch 16 --mode eager|compile [--steps 10] [--warmup 3]

Prints each step's time and then one line
`TORCH_GPU_RESULT mode=<mode> step_time_s=<median of the measured steps> tokens_per_s=<x> peak_mem_bytes=<x>`
(peak_mem_bytes: torch.cuda.max_memory_allocated, the tensors' peak). The data are random tokens:
the timing does not depend on them.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "reference"))
import gpt_ref  # noqa: E402  (the presets of SPEC section 4)


class Block(nn.Module):
    def __init__(self, h, heads, ffn):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.out = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc1, self.fc2 = nn.Linear(h, ffn), nn.Linear(ffn, h)

    def forward(self, x):
        B, S, h = x.shape
        q, k, v = (t.view(B, S, self.heads, h // self.heads).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(h, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(att.transpose(1, 2).reshape(B, S, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok, self.pos = nn.Embedding(cfg.vocab, cfg.hidden), nn.Embedding(cfg.seq, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads, cfg.ffn) for _ in range(cfg.layers))
        self.final_ln = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens, targets):
        x = self.tok(tokens) + self.pos.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.final_ln(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--model", choices=sorted(gpt_ref.PRESETS), default="gpt2-124m")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--steps", type=int, default=10, help="measured steps")
    ap.add_argument("--warmup", type=int, default=3, help="steps run first (compilation happens here)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_gpu.py: torch sees no GPU")
    torch.backends.cuda.matmul.allow_tf32 = True  # as a PyTorch user would run it
    cfg = gpt_ref.Config(**gpt_ref.PRESETS[args.model], seed=1234)
    dev = torch.device("cuda")
    model = GPT(cfg).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    step_fn = torch.compile(model) if args.mode == "compile" else model
    gen = torch.Generator(device=dev).manual_seed(1234)
    data = torch.randint(0, cfg.vocab, (args.micro_batch, cfg.seq + 1), device=dev, generator=gen)
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}; {args.model} "
          f"(L{cfg.layers} h{cfg.hidden} a{cfg.heads} S{cfg.seq} V{cfg.vocab}), micro-batch {args.micro_batch}, "
          f"{args.mode}", flush=True)

    times = []
    for s in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step_fn(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if s >= args.warmup:
            times.append(dt)
        print(f"step {s:3d}  loss {loss.item():.4f}  time {dt * 1e3:.2f} ms{'' if s >= args.warmup else '  (warm-up)'}",
              flush=True)
    median = statistics.median(times)
    print(f"TORCH_GPU_RESULT mode={args.mode} step_time_s={median:.6f} "
          f"tokens_per_s={args.micro_batch * cfg.seq / median:.1f} peak_mem_bytes={torch.cuda.max_memory_allocated()}")


if __name__ == "__main__":
    main()
