#!/usr/bin/env python3
"""The two memory experiments of the field, reproduced with parabench.

  micro-batch  memory per rank against micro-batch size (activations grow linearly with it)
  shard        memory per rank for every sharding strategy (ZeRO stages / FSDP strategies)

Each runs parabench-fsdp on this machine (measured, next to the app's prediction) and, with
--plan-model, the same sweep at cluster scale through parabench-plan. It writes, under --out:
<experiment>.md (the tables), <experiment>.png (measured beside predicted, stacked by category),
<experiment>_plan.png (the planner's sweep) and the runs' result files under runs/.

    /usr/bin/python3 -m analysis.memory_experiments micro-batch --out docs/experiments
    /usr/bin/python3 -m analysis.memory_experiments shard --out docs/experiments
"""
import argparse
import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np

CATEGORIES = ["parameters", "master_parameters", "gradients", "optimizer_states", "activations",
              "comm_buffers", "workspace"]
COLORS = {"parameters": "#4c72b0", "master_parameters": "#8172b2", "gradients": "#dd8452",
          "optimizer_states": "#c44e52", "activations": "#55a868", "comm_buffers": "#937860",
          "workspace": "#8c8c8c"}
SHARDS = ["NO_SHARD", "ZERO1", "SHARD_GRAD_OP", "FULL_SHARD", "HYBRID_SHARD"]
MIB = 1024.0 ** 2
GIB = 1024.0 ** 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_point(args, label, extra):
    """Runs parabench-fsdp once; returns its result file."""
    path = os.path.join(args.out, "runs", f"{args.experiment}{args.suffix}_{label}.h5")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cmd = ["mpiexec", "-n", str(args.ranks), os.path.join(args.build, "bench", "fsdp", "parabench-fsdp"),
           "--model", args.model, "--steps", str(args.steps), "--warmup", "1", "--quiet",
           "--cluster", args.cluster, "--dtype", args.dtype, "--out", path] + extra
    start = time.time()
    print(f"  {label:>14}: {' '.join(cmd[3:])}", end="", flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"\n{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    print(f"  ({time.time() - start:.1f} s)")
    return path


def read_memory(path):
    """Max over ranks of measured and predicted bytes per category (and peak_total)."""
    with h5py.File(path, "r") as f:
        measured = {c: int(np.max(f[f"memory/measured/{c}"][:])) for c in CATEGORIES + ["peak_total"]}
        predicted = {c: int(np.max(f[f"memory/predicted/{c}"][:])) for c in CATEGORIES + ["peak_total"]}
    return measured, predicted


def run_plan(args, sweep):
    """The planner's sweep as a list of rows (dicts), or None without --plan-model."""
    if not args.plan_model:
        return None
    cmd = [os.path.join(args.build, "bench", "plan", "parabench-plan"), "--model", args.plan_model, "--app", "fsdp",
           "--gpus", str(args.plan_gpus), "--dtype", "bf16", "--format", "json", "--sweep", sweep] + args.plan_args
    print("  plan: " + " ".join(cmd[1:]))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    rows = json.loads(done.stdout)
    return rows["plans"] if isinstance(rows, dict) and "plans" in rows else rows


def plan_bytes(row, category):
    """A category's per-rank bytes in a planner JSON row (flat or under 'per_rank_bytes')."""
    for key in ("memory_per_rank", "per_rank_bytes", "per_rank", "memory"):
        if isinstance(row.get(key), dict) and category in row[key]:
            return int(row[key][category])
    return int(row[category])


def table(points, labels, title):
    lines = [f"| {title} | " + " | ".join(f"{c} MiB (measured / predicted)" for c in CATEGORIES + ["peak_total"]) + " |",
             "|---" * (len(CATEGORIES) + 2) + "|"]
    for label, (m, p) in zip(labels, points):
        cells = [f"{m[c] / MIB:.2f} / {p[c] / MIB:.2f}" for c in CATEGORIES + ["peak_total"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_table(rows, labels, title, key):
    lines = [f"| {title} | " + " | ".join(f"{c} GiB" for c in CATEGORIES + ["peak_total"]) + " |",
             "|---" * (len(CATEGORIES) + 2) + "|"]
    for label, row in zip(labels, rows):
        lines.append(f"| {label} | " + " | ".join(f"{plan_bytes(row, c) / GIB:.2f}" for c in CATEGORIES + ["peak_total"]) + " |")
    return "\n".join(lines)


def stacked_bars(ax, labels, series, unit, scale, title, pairs=True):
    """series: list of (measured, predicted) dicts, or of single dicts when pairs is False."""
    x = np.arange(len(labels))
    width = 0.38 if pairs else 0.6
    offsets = [(-width / 2, 0, "measured"), (width / 2, 1, "predicted")] if pairs else [(0, None, None)]
    for dx, index, kind in offsets:
        bottom = np.zeros(len(labels))
        for c in CATEGORIES:
            values = np.array([(s[index] if index is not None else s)[c] / scale for s in series])
            ax.bar(x + dx, values, width, bottom=bottom, color=COLORS[c], edgecolor="white", linewidth=0.5,
                   hatch="//" if index == 1 else None, label=c if dx == offsets[0][0] else None)
            bottom += values
    if pairs:  # the peak of the sum at any instant, as a black tick over each bar
        for dx, index in ((-width / 2, 0), (width / 2, 1)):
            peaks = [s[index]["peak_total"] / scale for s in series]
            ax.scatter(x + dx, peaks, marker="_", s=400, color="black", zorder=3,
                       label="peak_total" if index == 0 else None)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_ylabel(unit)
    ax.set_title(title)
    if pairs:
        ax.text(0.01, 0.98, "left bar: measured, right bar (hatched): predicted", transform=ax.transAxes,
                va="top", fontsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["micro-batch", "shard"])
    parser.add_argument("--out", default="results/experiments", help="output directory")
    parser.add_argument("--build", default=os.path.join(REPO, "build"), help="build directory")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cluster", default="local")
    parser.add_argument("--shard", default="FULL_SHARD", help="micro-batch experiment: the sharding strategy")
    parser.add_argument("--micro-batch", type=int, default=2, help="shard experiment: the micro-batch")
    parser.add_argument("--values", default="1,2,4,8", help="micro-batch experiment: the micro-batches")
    parser.add_argument("--plan-model", default="", help="also plan the sweep for this model (e.g. llama3-405b)")
    parser.add_argument("--plan-gpus", type=int, default=1024)
    parser.add_argument("--plan-args", default="", help="more parabench-plan options, one string")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="of the measured runs (bf16: SPEC 2.3's mixed precision); outputs get a _bf16 suffix")
    args = parser.parse_args()
    args.suffix = "" if args.dtype == "fp32" else f"_{args.dtype}"
    args.plan_args = args.plan_args.split()
    os.makedirs(args.out, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print(f"{args.experiment} experiment: parabench-fsdp, model {args.model}, {args.ranks} ranks, {args.dtype}")
    if args.experiment == "micro-batch":
        values = [int(v) for v in args.values.split(",")]
        labels = [f"b={v}" for v in values]
        paths = [run_point(args, f"b{v}", ["--shard", args.shard, "--micro-batch", str(v)]) for v in values]
        title = f"micro-batch ({args.shard})"
        plan = run_plan(args, "micro-batch=" + ",".join(map(str, values)))
    else:
        labels = SHARDS
        extra = lambda s: ["--shard", s, "--micro-batch", str(args.micro_batch)] + (
            ["--shard-group", str(args.ranks // 2)] if s == "HYBRID_SHARD" else [])
        paths = [run_point(args, s, extra(s)) for s in SHARDS]
        title = f"shard strategy (micro-batch {args.micro_batch})"
        plan = run_plan(args, "shard=" + ",".join(s for s in SHARDS if s != "HYBRID_SHARD"))
    points = [read_memory(p) for p in paths]

    text = [f"### Measured: model {args.model}, {args.ranks} ranks, {args.dtype}, CPU, per rank (max over ranks)", "",
            table(points, labels, title), ""]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    stacked_bars(ax, labels, points, "MiB per rank", MIB,
                 f"parabench-fsdp {args.model}, {args.ranks} ranks, {args.dtype}: peak memory per rank by category")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{args.experiment}{args.suffix}.png"), dpi=120)
    if plan is not None:
        plan_labels = labels if args.experiment == "micro-batch" else [s for s in SHARDS if s != "HYBRID_SHARD"]
        text += [f"### Planned: {args.plan_model}, {args.plan_gpus} GPUs, bf16, per rank ({' '.join(args.plan_args)})",
                 "", plan_table(plan, plan_labels, args.experiment, args.experiment), ""]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        stacked_bars(ax, plan_labels, [{c: plan_bytes(r, c) for c in CATEGORIES} for r in plan], "GiB per GPU", GIB,
                     f"parabench-plan {args.plan_model} on {args.plan_gpus} GPUs (bf16)", pairs=False)
        if "--gpu-memory" in args.plan_args:  # what a GPU holds: the bars below the line fit
            limit = float(args.plan_args[args.plan_args.index("--gpu-memory") + 1])
            ax.axhline(limit, color="black", linestyle="--", linewidth=1)
            ax.text(len(plan_labels) - 0.5, limit, f" GPU memory {limit:g} GiB", va="bottom", ha="right", fontsize=8)
        for i, r in enumerate(plan):  # the peak as a number: small bars stay readable beside large ones
            total = plan_bytes(r, "peak_total") / GIB
            ax.text(i, sum(plan_bytes(r, c) for c in CATEGORIES) / GIB, f"{total:,.1f}", ha="center", va="bottom",
                    fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"{args.experiment}{args.suffix}_plan.png"), dpi=120)
    name = f"{args.experiment}{args.suffix}"
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(text))
    print("\n".join(text))
    print(f"wrote {args.out}/{name}.md, {name}.png" + (f", {name}_plan.png" if plan else ""))


if __name__ == "__main__":
    main()
