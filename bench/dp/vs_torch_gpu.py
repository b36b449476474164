#!/usr/bin/env python3
"""parabench-dp against PyTorch on the same GPU, in the same call, in bf16.

    vs_torch_gpu.py --bin build-cuda/bench/dp/parabench-dp --out DIR [--steps 10] [--warmup 3]
                    [--attention cudnn native]

For gpt2-124m at micro-batch 16 and block-4k at micro-batch 2: one rank of parabench-dp (--backend cuda
--dtype bf16), once per --attention (cudnn and native by default), then PyTorch eager (SDPA) and torch.compile (bench/dp/torch_gpu.py, each in a fresh
process). Prints one markdown table (also written to DIR/vs_torch_gpu.md): step time (median of the
measured steps), tokens/s, MFU and peak memory. MFU uses parabench's FLOP count and peak TFLOP/s for
every row, so the rows compare like with like. Peak memory is the peak of the tensors (parabench's
tracker, torch.cuda.max_memory_allocated); parabench's whole-device peak (cudaMemGetInfo) is in its
result file.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import h5py

HERE = Path(__file__).resolve().parent
CONFIGS = [("gpt2-124m", 16), ("block-4k", 2)]


def run(cmd, log):
    print("+ " + " ".join(map(str, cmd)), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(f"  failed with exit code {proc.returncode}; the end of {log}:")
        print("".join(open(log).readlines()[-15:]))
    return proc.returncode


def parse_torch(log):
    for line in open(log):
        if line.startswith("TORCH_GPU_RESULT"):
            return {k: float(v) if k != "mode" else v for k, v in (kv.split("=") for kv in line.split()[1:])}
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--bin", required=True, help="parabench-dp of the cuda build")
    ap.add_argument("--out", required=True, help="folder for logs, result files and the table")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--attention", nargs="+", default=["cudnn", "native"],
                    help="parabench's --attention values to run, one row each")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    launcher = os.environ.get("PB_MPIEXEC", "mpiexec").split()

    rows, failed = [], False
    for model, mb in CONFIGS:
        flops = None
        for attention in args.attention:
            h5 = out / f"parabench_{model}_{attention}.h5"
            rc = run([*launcher, "-n", 1, args.bin, "--model", model, "--micro-batch", mb, "--backend", "cuda",
                      "--dtype", "bf16", "--attention", attention, "--steps", args.steps + args.warmup,
                      "--warmup", args.warmup, "--quiet", "--out", h5, "--overwrite"],
                     out / f"parabench_{model}_{attention}.log")
            if rc != 0:
                failed = True
                continue
            with h5py.File(h5, "r") as f:
                s = f["summary"].attrs
                step, tflops, mfu = float(s["step_time_s"]), float(s["tflops_per_rank"]), float(s["mfu"])
                peak = int(f["memory/measured/peak_total"][0])
                device_name = f["system"].attrs.get("gpu_model", f["system"].attrs.get("cpu_model", b""))
            flops = tflops * 1e12 * step  # per step, one rank
            peak_tflops = tflops / mfu if mfu == mfu and mfu > 0 else float("nan")
            rows.append((model, mb, f"parabench-dp ({attention} attention)", step, mb * int(model_seq(model)) / step,
                         mfu, peak))
        if flops is None:
            continue
        for mode in ("eager", "compile"):
            log = out / f"torch_{mode}_{model}.log"
            rc = run([sys.executable, HERE / "torch_gpu.py", "--model", model, "--micro-batch", mb, "--mode", mode,
                      "--steps", args.steps, "--warmup", args.warmup], log)
            r = parse_torch(log) if rc == 0 else None
            if r is None:
                failed = True
                continue
            t = r["step_time_s"]
            rows.append((model, mb, f"torch {mode}", t, r["tokens_per_s"], flops / t / 1e12 / peak_tflops,
                         int(r["peak_mem_bytes"])))
        print(f"  {model}: device {device_name!r}, {flops / 1e12:.2f} TFLOP per step, peak {peak_tflops:g} TFLOP/s",
              flush=True)

    lines = ["| model | micro-batch | implementation | step time (ms) | tokens/s | MFU | peak memory (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for model, mb, impl, step, tps, mfu, peak in rows:
        lines.append(f"| {model} | {mb} | {impl} | {step * 1e3:.1f} | {tps:,.0f} | {mfu:.1%} | {peak / 2**30:.2f} |")
    table = "\n".join(lines)
    print(table)
    (out / "vs_torch_gpu.md").write_text(table + "\n")
    return 1 if failed else 0


def model_seq(model):
    sys.path.insert(0, str(HERE.parent.parent / "tests" / "reference"))
    import gpt_ref
    return gpt_ref.PRESETS[model]["seq"]


if __name__ == "__main__":
    sys.exit(main())
