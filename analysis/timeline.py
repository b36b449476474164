#!/usr/bin/env python3
"""Renders a run's Chrome trace (--trace) as a pipeline diagram like those of the GPipe and
Megatron-LM papers: one row per rank, forward steps in blue and backward steps in green labelled with
their micro-batch (and chunk, when interleaved), white where the rank idles (the bubble).

    mpiexec -n 4 build/bench/pp/parabench-pp --model tiny --layers 8 --pp 4 --schedule 1f1b \\
        --global-batch 8 --steps 3 --trace results/pp.json
    /usr/bin/python3 -m analysis.timeline results/pp.json --out results/pp.png
"""
import argparse
import json
import sys


def load_spans(path, step):
    """Compute spans (F/B) of one step per rank: {rank: [(start_us, dur_us, name, args)]}, and the step."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X" and e.get("cat") == "compute"
             and e.get("name", "")[:1] in ("F", "B") and "micro_batch" in e.get("args", {})]
    if not spans:
        sys.exit(f"timeline: {path} has no pipeline forward/backward spans (is it a parabench-pp --trace file?)")
    steps = sorted({e["args"]["step"] for e in spans})
    step = steps[-1] if step is None else step
    if step not in steps:
        sys.exit(f"timeline: step {step} is not in {path} (steps {steps[0]}..{steps[-1]})")
    by_rank = {}
    for e in spans:
        if e["args"]["step"] == step:
            by_rank.setdefault(e["pid"], []).append((e["ts"], e["dur"], e["name"], e["args"]))
    return by_rank, step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="a Chrome trace JSON written by --trace")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--step", type=int, default=None, help="step to draw (default: the last)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_rank, step = load_spans(args.trace, args.step)
    start = min(t for spans in by_rank.values() for t, _, _, _ in spans)
    end = max(t + d for spans in by_rank.values() for t, d, _, _ in spans)
    ranks = sorted(by_rank)
    interleaved = any(a.get("chunk", 0) > 0 for spans in by_rank.values() for _, _, _, a in spans)
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.4))
    for row, rank in enumerate(ranks):
        busy = 0.0
        for t, d, name, a in by_rank[rank]:
            forward = name.startswith("F")
            shade = 0.25 * a.get("chunk", 0)
            color = (0.30 + shade * 0.5, 0.45 + shade * 0.3, 0.85) if forward else (0.35 + shade * 0.4, 0.70, 0.40 + shade * 0.4)
            x, w = (t - start) / 1e3, d / 1e3
            ax.broken_barh([(x, w)], (row - 0.4, 0.8), facecolors=color, edgecolors="black", linewidth=0.5)
            label = str(a["micro_batch"]) + (f".{a['chunk']}" if interleaved else "")
            ax.text(x + w / 2, row, label, ha="center", va="center", fontsize=7, clip_on=True)
            busy += d
        idle = 1.0 - busy / (end - start)
        ax.text((end - start) / 1e3 * 1.005, row, f"idle {idle:.0%}", va="center", fontsize=8)
    ax.set_yticks(range(len(ranks)))
    ax.set_yticklabels([f"stage {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time in step (ms)")
    ax.set_xlim(0, (end - start) / 1e3 * 1.08)
    ax.set_title(args.title or f"{args.trace}: step {step}; forward (blue) and backward (green) by micro-batch"
                 + (".chunk" if interleaved else ""))
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"timeline: wrote {args.out} ({len(ranks)} ranks, step {step})")


if __name__ == "__main__":
    main()
