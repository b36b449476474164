#!/usr/bin/env python3
"""The report of parabench results: tables and plots from any number of result files (docs/SPEC.md
section 6) from any number of clusters.

    /usr/bin/python3 -m analysis.report RESULTS... --out DIR [--baseline CLUSTER] [--skip-bad]

RESULTS are result files or directories, searched recursively for *.h5. The report goes to
DIR/report.md and DIR/report.html, its plots to DIR/plots/*.png, each with the numbers it shows in
a .csv beside it:

  1. a summary table per cluster and app (complete runs);
  2. the clusters side by side at equal configurations (same app, strategy, model shape, ranks,
     batch sizes, dtype, ...: every /config option but where and how the run was made), with each
     cluster's ratio to the baseline cluster (default: the first by name);
  3. plots: memory by category per strategy and against micro-batch (stacked bars, measured beside
     predicted), tokens/s and scaling efficiency against ranks, step time per strategy;
  4. the runs that did not complete (running, failed, interrupted), listed apart and used nowhere
     else.

A file that cannot be read (corrupt, truncated), is not a parabench result or has a schema version
other than 1 is an error: every such file is named on stderr with the reason and nothing is written
(exit 1). With --skip-bad the report is written from the other files and lists the ones left out.
"""

import argparse
import html
import math
import os
import re
import sys
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

try:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a cluster or in a test
    import matplotlib.pyplot as plt
    import pandas as pd

    from analysis.memory_experiments import stacked_bars
    from analysis.results import CATEGORIES, PEAK, ResultError, load, result_files, strategy_order
except ImportError as e:
    sys.exit(f"report: error: {e}; install analysis/requirements.txt (h5py, numpy, pandas, matplotlib) for "
             f"{sys.executable}, and run it from the repository root as python3 -m analysis.report")

MIB = 2.0 ** 20
GIB = 2.0 ** 30
DASH = "–"


# ---- formatting -------------------------------------------------------------------------------------

def missing(x):
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(x, kind):
    if missing(x):
        return DASH
    if kind == "s":
        return f"{x:.4g}"
    if kind == "rate":
        return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"
    if kind == "tflops":
        return f"{x:.3g}"
    if kind == "pct":
        return f"{x:.1%}"
    if kind == "mib":
        return f"{x / MIB:,.2f}"
    if kind == "ratio":
        return f"{x:.2f}×"
    return str(x)


def what_ran(app, strategy):
    """dp, fsdp FULL_SHARD, tp4+sp: the app and its strategy, the app once."""
    return strategy if strategy.startswith(app) else f"{app} {strategy}"


def slug(*parts):
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(str(p) for p in parts)).strip("_")


# ---- the document: blocks rendered as Markdown and as HTML -------------------------------------------

class Document:
    def __init__(self):
        self.blocks = []

    def heading(self, level, text):
        self.blocks.append(("h", level, text))

    def para(self, text):
        self.blocks.append(("p", text))

    def table(self, headers, rows, numeric=()):
        """numeric: the indices of right-aligned columns."""
        self.blocks.append(("table", headers, rows, set(numeric)))

    def image(self, path, alt):
        self.blocks.append(("img", path, alt))

    def markdown(self):
        out = []
        for block in self.blocks:
            if block[0] == "h":
                out.append("#" * block[1] + " " + block[2])
            elif block[0] == "p":
                out.append(block[1])
            elif block[0] == "img":
                out.append(f"![{block[2]}]({block[1]})")
            else:
                _, headers, rows, numeric = block
                cell = lambda c: str(c).replace("|", "\\|")
                lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
                         "|" + "|".join("---:" if i in numeric else "---" for i in range(len(headers))) + "|"]
                lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
                out.append("\n".join(lines))
            out.append("")
        return "\n".join(out)

    def html(self, title):
        out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
               "th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f0f0f0}td.n{text-align:right}"
               "img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6}</style></head><body>"]
        inline = lambda t: re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(t))
        for block in self.blocks:
            if block[0] == "h":
                out.append(f"<h{block[1]}>{inline(block[2])}</h{block[1]}>")
            elif block[0] == "p":
                out.append(f"<p>{inline(block[1])}</p>")
            elif block[0] == "img":
                out.append(f"<p><img src=\"{html.escape(block[1])}\" alt=\"{html.escape(block[2])}\"></p>")
            else:
                _, headers, rows, numeric = block
                out.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in headers) + "</tr>")
                for row in rows:
                    out.append("<tr>" + "".join(
                        f"<td class=\"n\">{html.escape(str(c))}</td>" if i in numeric else f"<td>{html.escape(str(c))}</td>"
                        for i, c in enumerate(row)) + "</tr>")
                out.append("</table>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


# ---- reading ----------------------------------------------------------------------------------------

def read_runs(paths, skip_bad):
    """(complete runs, other runs) as DataFrames, and the files left out as (path, reason)."""
    try:
        files = result_files(paths)
    except ResultError as e:
        raise SystemExit(f"report: error: {e}")
    runs, bad = [], []
    for path in files:
        try:
            runs.append(load(path))
        except ResultError as e:
            bad.append((str(path), str(e)))
    if bad:
        for path, reason in bad:
            print(f"report: {'warning: left out' if skip_bad else 'error:'} {path}: {reason}", file=sys.stderr)
        if not skip_bad:
            raise SystemExit(f"report: error: {len(bad)} of {len(files)} file(s) cannot be used; nothing written "
                             f"(--skip-bad writes the report from the others and lists these)")
    if not runs:
        raise SystemExit("report: error: no readable result files")
    df = pd.DataFrame(runs)
    df["order"] = [strategy_order(a, s) for a, s in zip(df["app"], df["strategy"])]
    complete = df[df["status"] == "complete"].reset_index(drop=True)
    others = df[df["status"] != "complete"].reset_index(drop=True)
    return complete, others, bad


def short_paths(df):
    """The files relative to the folder all of them share."""
    if df.empty:
        return []
    base = os.path.commonpath([str(Path(f).parent) for f in df["file"]])
    return [os.path.relpath(f, base) for f in df["file"]]


def memory_point(group):
    """(measured, predicted) dicts of bytes per category and peak_total: medians over the runs."""
    def median(col):
        values = group[col].dropna()
        return float(values.median()) if len(values) else 0.0
    return ({c: median(f"measured_{c}") for c in CATEGORIES + [PEAK]},
            {c: median(f"predicted_{c}") for c in CATEGORIES + [PEAK]})


def memory_csv(points, labels, label_name):
    rows = []
    for label, (measured, predicted) in zip(labels, points):
        for c in CATEGORIES + [PEAK]:
            rows.append({label_name: label, "category": c, "measured_bytes": int(round(measured[c])),
                         "predicted_bytes": int(round(predicted[c]))})
    return pd.DataFrame(rows)


# ---- sections ---------------------------------------------------------------------------------------

class Report:
    def __init__(self, complete, others, bad, out, baseline, inputs):
        self.runs, self.others, self.bad = complete, others, bad
        self.out, self.plots = Path(out), Path(out) / "plots"
        self.doc = Document()
        self.inputs = inputs
        clusters = sorted(set(complete["cluster"]) | set(others["cluster"]))
        if baseline is not None and baseline not in clusters:
            raise SystemExit(f"report: error: --baseline {baseline}: no such cluster in the results "
                             f"(clusters: {', '.join(clusters)})")
        complete_clusters = sorted(set(complete["cluster"]))
        self.clusters = clusters
        self.baseline = baseline or (complete_clusters[0] if complete_clusters else None)
        self.figures = 0

    def save(self, fig, name, data):
        """Writes plots/<name>.png and the numbers it shows as plots/<name>.csv; returns the png path."""
        png = self.plots / f"{name}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        data.to_csv(self.plots / f"{name}.csv", index=False)
        self.figures += 1
        return f"plots/{png.name}"

    def write(self):
        self.plots.mkdir(parents=True, exist_ok=True)
        for old in list(self.plots.glob("*.png")) + list(self.plots.glob("*.csv")):
            old.unlink()  # the plots of an earlier report in this folder
        self.header()
        self.summary()
        self.cross_cluster()
        self.doc.heading(2, "3. Plots")
        self.memory_by_strategy()
        self.memory_by_micro_batch()
        self.scaling()
        self.step_time_by_strategy()
        self.not_complete()
        self.left_out()
        title = "parabench report"
        (self.out / "report.md").write_text(self.doc.markdown())
        (self.out / "report.html").write_text(self.doc.html(title))

    def header(self):
        d = self.doc
        d.heading(1, "parabench report")
        n_all = len(self.runs) + len(self.others)
        d.para(f"{n_all} run(s) from {len(self.clusters)} cluster(s), {len(self.runs)} complete; "
               f"written {datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')} by `python3 -m analysis.report "
               f"{' '.join(self.inputs)}`. Memory is the maximum over ranks; step time the median over the "
               f"measured steps of the slowest rank (SPEC.md section 6).")
        rows = []
        for cluster in self.clusters:
            mine = self.runs[self.runs["cluster"] == cluster]
            theirs = self.others[self.others["cluster"] == cluster]
            both = pd.concat([mine, theirs])
            rows.append([cluster, len(mine), len(theirs), ", ".join(sorted(set(both["device"]) - {""})) or DASH,
                         ", ".join(sorted(set(both["backend"]) - {""})) or DASH,
                         ", ".join(sorted(set(both["app"])))])
        d.table(["cluster", "complete runs", "not complete", "device", "backend", "apps"], rows, numeric=(1, 2))

    def summary(self):
        d = self.doc
        d.heading(2, "1. Summary per cluster and app")
        if self.runs.empty:
            d.para("No complete runs.")
            return
        runs = self.runs.assign(short=short_paths(self.runs))
        for (cluster, app), g in runs.groupby(["cluster", "app"], sort=True):
            g = g.sort_values(["model", "order", "ranks", "micro_batch", "global_batch"])
            d.heading(3, f"{cluster}: {app}")
            rows = [[r.strategy, r.model, r.ranks, fmt(r.nodes, ""), r.micro_batch, r.global_batch, r.dtype,
                     fmt(r.step_time_s, "s"), fmt(r.tokens_per_s, "rate"), fmt(r.tflops_per_rank, "tflops"),
                     fmt(r.mfu, "pct"), fmt(r.measured_peak_total, "mib"), fmt(r.predicted_peak_total, "mib"),
                     r.short] for r in g.itertuples()]
            d.table(["strategy", "model", "ranks", "nodes", "micro-batch", "global batch", "dtype", "step time s",
                     "tokens/s", "TFLOP/s/rank", "MFU", "peak MiB measured", "peak MiB predicted", "file"],
                    rows, numeric=(2, 3, 4, 5, 7, 8, 9, 10, 11, 12))

    def cross_cluster(self):
        d = self.doc
        d.heading(2, "2. Across clusters at equal configurations")
        clusters = sorted(set(self.runs["cluster"])) if not self.runs.empty else []
        if len(clusters) < 2:
            d.para(f"Needs complete runs from two clusters or more; these results have {len(clusters)}.")
            return
        others = [c for c in clusters if c != self.baseline]
        per_config = []
        for key, g in self.runs.groupby("key", sort=False):
            present = set(g["cluster"])
            if len(present) < 2:
                continue
            medians = g.groupby("cluster").agg(tokens_per_s=("tokens_per_s", "median"),
                                               step_time_s=("step_time_s", "median"),
                                               peak=("measured_peak_total", "median"), n=("file", "size"))
            per_config.append((g.iloc[0], medians))
        if not per_config:
            d.para(f"No configuration ran on two clusters or more (clusters: {', '.join(clusters)}). A configuration "
                   "is every /config option but cluster, out, tag, trace, json_log, quiet, threads, backend, comm, "
                   "peak_tflops, steps, warmup and seed; the model is compared by its shape.")
            return
        d.para(f"Configurations that ran on two clusters or more: every /config option equal but where and how the "
               f"run was made (cluster, backend, comm, threads, steps, seed, output). Values are medians over repeated "
               f"runs; ratios are to the baseline cluster **{self.baseline}**: tokens/s above 1× is faster, peak "
               f"memory above 1× is more.")
        headers = ["app", "strategy", "model", "ranks", "micro-batch", "global batch", "dtype"]
        headers += [f"{c} tokens/s" for c in clusters]
        headers += [f"{c} / {self.baseline} tokens/s" for c in others]
        headers += [f"{c} peak MiB" for c in clusters]
        headers += [f"{c} / {self.baseline} peak" for c in others]
        rows, csv = [], []
        per_config.sort(key=lambda item: (item[0]["app"], item[0]["order"], item[0]["model"], item[0]["ranks"],
                                          item[0]["micro_batch"], item[0]["global_batch"]))
        for first, m in per_config:
            value = lambda c, col: m.at[c, col] if c in m.index else math.nan
            ratio = lambda c, col: (value(c, col) / value(self.baseline, col)
                                    if not missing(value(self.baseline, col)) and value(self.baseline, col) else math.nan)
            row = [first["app"], first["strategy"], first["model"], first["ranks"], first["micro_batch"],
                   first["global_batch"], first["dtype"]]
            row += [fmt(value(c, "tokens_per_s"), "rate") for c in clusters]
            row += [fmt(ratio(c, "tokens_per_s"), "ratio") for c in others]
            row += [fmt(value(c, "peak"), "mib") for c in clusters]
            row += [fmt(ratio(c, "peak"), "ratio") for c in others]
            rows.append(row)
            for c in clusters:
                csv.append({"app": first["app"], "strategy": first["strategy"], "model": first["model"],
                            "ranks": first["ranks"], "micro_batch": first["micro_batch"],
                            "global_batch": first["global_batch"], "dtype": first["dtype"], "cluster": c,
                            "runs": int(m.at[c, "n"]) if c in m.index else 0,
                            "tokens_per_s": value(c, "tokens_per_s"), "step_time_s": value(c, "step_time_s"),
                            "peak_bytes": value(c, "peak"), "tokens_per_s_ratio": ratio(c, "tokens_per_s"),
                            "peak_ratio": ratio(c, "peak")})
        d.table(headers, rows, numeric=[3, 4, 5] + list(range(7, len(headers))))
        pd.DataFrame(csv).to_csv(self.out / "cross_cluster.csv", index=False)
        d.para("The same numbers, one row per configuration and cluster: `cross_cluster.csv`.")

    def memory_by_strategy(self):
        d = self.doc
        d.heading(3, "Memory by category per strategy")
        keys = ["cluster", "model", "ranks", "micro_batch", "global_batch", "dtype"]
        made = 0
        for key, g in self.runs.groupby(keys, sort=True):
            strategies = sorted({(o, a, s) for o, a, s in zip(g["order"], g["app"], g["strategy"])})
            if len(strategies) < 2:
                continue
            labels = [s for _, _, s in strategies]
            points = [memory_point(g[(g["app"] == a) & (g["strategy"] == s)]) for _, a, s in strategies]
            cluster, model, ranks, micro_batch, global_batch, dtype = key
            unit, scale = ("GiB", GIB) if max(p[0][PEAK] for p in points) >= 4 * GIB else ("MiB", MIB)
            fig, ax = plt.subplots(figsize=(max(8.0, 1.3 * len(labels) + 4), 4.8))
            stacked_bars(ax, labels, points, f"{unit} per rank (max over ranks)", scale,
                         f"{cluster}: {model}, {ranks} ranks, micro-batch {micro_batch}, global batch {global_batch}, "
                         f"{dtype}")
            ax.tick_params(axis="x", labelrotation=15 if len(labels) > 4 else 0)
            ax.set_ylim(top=ax.get_ylim()[1] * 1.08)  # room for the note above the tallest bar
            fig.tight_layout()
            name = slug("memory_strategy", cluster, model, f"{ranks}ranks", f"b{micro_batch}", f"G{global_batch}", dtype)
            path = self.save(fig, name, memory_csv(points, labels, "strategy"))
            d.image(path, f"memory by category per strategy, {cluster} {model} {ranks} ranks")
            made += 1
        if not made:
            d.para("Needs two strategies or more at one cluster, model, rank count, micro-batch and global batch "
                   "(the shard and strategy sweeps).")
        else:
            d.para("Left bar of each pair: measured; right, hatched: the app's prediction; the black tick is "
                   "`peak_total`, the peak of the sum at any instant (not the sum of the peaks).")

    def memory_by_micro_batch(self):
        d = self.doc
        d.heading(3, "Memory against micro-batch")
        keys = ["cluster", "app", "strategy", "model", "ranks", "dtype"]
        made = 0
        for key, g in self.runs.groupby(keys, sort=True):
            values = sorted(set(g["micro_batch"]))
            if len(values) < 2:
                continue
            points = [memory_point(g[g["micro_batch"] == b]) for b in values]
            labels = [f"b={b}" for b in values]
            cluster, app, strategy, model, ranks, dtype = key
            unit, scale = ("GiB", GIB) if max(p[0][PEAK] for p in points) >= 4 * GIB else ("MiB", MIB)
            fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(labels) + 4), 4.8))
            stacked_bars(ax, labels, points, f"{unit} per rank (max over ranks)", scale,
                         f"{cluster}: parabench-{app} {strategy}, {model}, {ranks} ranks, {dtype}")
            ax.set_ylim(top=ax.get_ylim()[1] * 1.08)
            fig.tight_layout()
            name = slug("memory_micro_batch", cluster, app, strategy, model, f"{ranks}ranks", dtype)
            csv = memory_csv(points, values, "micro_batch")
            path = self.save(fig, name, csv)
            d.image(path, f"memory against micro-batch, {cluster} {app} {strategy}")
            act = [p[0]["activations"] for p in points]
            d.para(f"{cluster}, {app} {strategy}: activations {', '.join(fmt(a, 'mib') for a in act)} MiB at "
                   f"micro-batch {', '.join(map(str, values))} (measured, max over ranks).")
            made += 1
        if not made:
            d.para("Needs two micro-batches or more of one strategy at one cluster, model and rank count "
                   "(the micro-batch sweep).")

    def scaling_series(self):
        """Scaling series: runs of one cluster, strategy, model, micro-batch and dtype at two rank counts
        or more, either at one global batch (strong) or at one global batch per rank (weak)."""
        series = []
        keys = ["cluster", "app", "strategy", "model", "micro_batch", "dtype"]
        for key, g in self.runs.groupby(keys, sort=True):
            g = g.assign(per_rank=[Fraction(int(gb), int(r)) for gb, r in zip(g["global_batch"], g["ranks"])])
            for kind, column in (("strong", "global_batch"), ("weak", "per_rank")):
                for value, s in g.groupby(column, sort=True):
                    if s["ranks"].nunique() < 2:
                        continue
                    points = s.groupby("ranks")["tokens_per_s"].median().sort_index()
                    what = f"global batch {value}" if kind == "strong" else f"{value} sample(s) per rank"
                    series.append(dict(zip(keys, key), kind=kind, what=what, points=points))
        return series

    def scaling(self):
        d = self.doc
        d.heading(3, "Throughput against ranks (scaling efficiency)")
        series = self.scaling_series()
        if not series:
            d.para("Needs runs of one strategy at two rank counts or more (the weak- and strong-scaling sweeps).")
            return
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
        rows, csv = [], []
        all_ranks = sorted({r for s in series for r in s["points"].index})
        for i, s in enumerate(series):
            ranks = s["points"].index.to_numpy()
            tps = s["points"].to_numpy()
            efficiency = (tps / tps[0]) / (ranks / ranks[0])
            label = f"{s['cluster']} {what_ran(s['app'], s['strategy'])} {s['model']}: {s['kind']}, {s['what']}"
            color = f"C{i % 10}"
            marker = "o" if s["kind"] == "strong" else "s"
            left.plot(ranks, tps, marker=marker, color=color, label=label)
            left.plot(ranks, tps[0] * ranks / ranks[0], linestyle=":", color=color, linewidth=1)
            right.plot(ranks, 100 * efficiency, marker=marker, color=color, label=label)
            for r, t, e in zip(ranks, tps, efficiency):
                rows.append([s["cluster"], s["app"], s["strategy"], s["model"], s["kind"], s["what"], int(r),
                             fmt(t, "rate"), fmt(e, "pct")])
                csv.append({"cluster": s["cluster"], "app": s["app"], "strategy": s["strategy"], "model": s["model"],
                            "micro_batch": s["micro_batch"], "kind": s["kind"], "series": s["what"], "ranks": int(r),
                            "tokens_per_s": t, "efficiency": e})
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_ranks)
            ax.set_xticklabels([str(r) for r in all_ranks])
            ax.set_xlabel("ranks")
            ax.grid(True, which="major", alpha=0.3)
        left.set_yscale("log")
        left.set_ylabel("tokens/s (dotted: ideal)")
        left.set_title("throughput")
        right.axhline(100, color="black", linewidth=0.8)
        right.set_ylabel("scaling efficiency %")
        right.set_ylim(0, max(110, right.get_ylim()[1]))
        right.set_title("efficiency: (tokens/s ÷ first) ÷ (ranks ÷ first)")
        right.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        path = self.save(fig, "scaling", pd.DataFrame(csv))
        d.image(path, "tokens/s and scaling efficiency against ranks")
        d.para("Strong scaling (circles) keeps the global batch; weak scaling (squares) keeps the samples per "
               "rank, so the global batch grows with the ranks. Efficiency is relative to each series' smallest "
               "rank count.")
        d.table(["cluster", "app", "strategy", "model", "kind", "series", "ranks", "tokens/s", "efficiency"], rows,
                numeric=(6, 7, 8))

    def step_time_by_strategy(self):
        d = self.doc
        d.heading(3, "Step time per strategy")
        keys = ["model", "ranks", "micro_batch", "global_batch", "dtype"]
        made = 0
        for key, g in self.runs.groupby(keys, sort=True):
            strategies = sorted({(o, a, s) for o, a, s in zip(g["order"], g["app"], g["strategy"])})
            clusters = sorted(set(g["cluster"]))
            if len(strategies) < 2 and len(clusters) < 2:
                continue
            model, ranks, micro_batch, global_batch, dtype = key
            fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(strategies) * max(1, len(clusters) / 2) + 3), 4.5))
            width = 0.8 / len(clusters)
            csv = []
            for j, cluster in enumerate(clusters):
                heights, low, high = [], [], []
                for _, app, strategy in strategies:
                    s = g[(g["cluster"] == cluster) & (g["app"] == app) & (g["strategy"] == strategy)]
                    t = float(s["step_time_s"].median()) if len(s) else math.nan
                    lo = float(s["step_time_s_min"].min()) if len(s) else math.nan
                    hi = float(s["step_time_s_max"].max()) if len(s) else math.nan
                    heights.append(t)
                    low.append(t - lo if not missing(lo) else 0)
                    high.append(hi - t if not missing(hi) else 0)
                    csv.append({"strategy": strategy, "app": app, "cluster": cluster, "step_time_s": t,
                                "step_time_s_min": lo, "step_time_s_max": hi,
                                "tokens_per_s": float(s["tokens_per_s"].median()) if len(s) else math.nan})
                x = [i + (j - (len(clusters) - 1) / 2) * width for i in range(len(strategies))]
                ax.bar(x, heights, width * 0.95, yerr=[low, high], capsize=3, color=f"C{j}", label=cluster)
            ax.set_xticks(range(len(strategies)))
            ax.set_xticklabels([s for _, _, s in strategies], rotation=15 if len(strategies) > 4 else 0)
            ax.set_ylabel("step time s (median; bars: min to max step)")
            ax.set_title(f"{model}, {ranks} ranks, micro-batch {micro_batch}, global batch {global_batch}, {dtype}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            name = slug("step_time", model, f"{ranks}ranks", f"b{micro_batch}", f"G{global_batch}", dtype)
            path = self.save(fig, name, pd.DataFrame(csv))
            d.image(path, f"step time per strategy, {model} {ranks} ranks")
            made += 1
        if not made:
            d.para("Needs two strategies or two clusters or more at one model, rank count, micro-batch and "
                   "global batch.")

    def not_complete(self):
        d = self.doc
        d.heading(2, "4. Runs not complete")
        if self.others.empty:
            d.para("None: every run completed.")
            return
        d.para("Left out of every table and plot above: their numbers, where they have any, cover only part of a run.")
        others = self.others.assign(short=short_paths(self.others)).sort_values(["cluster", "app", "file"])
        rows = [[r.cluster, r.app, r.strategy, r.model, r.ranks, r.status, r.error or DASH,
                 f"{r.finished_steps} of {fmt(r.steps, '')}", r.short] for r in others.itertuples()]
        d.table(["cluster", "app", "strategy", "model", "ranks", "status", "error", "steps", "file"], rows,
                numeric=(4,))

    def left_out(self):
        if not self.bad:
            return
        d = self.doc
        d.heading(2, "5. Files left out")
        d.para("Not read (--skip-bad): the reason for each.")
        d.table(["file", "reason"], [[path, reason] for path, reason in self.bad])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m analysis.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", metavar="RESULTS", help="result files or directories of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="where report.md, report.html and plots/ go")
    parser.add_argument("--baseline", metavar="CLUSTER", help="the cluster the ratios are relative to "
                                                              "(default: the first by name)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="write the report from the readable files and list the others, instead of failing")
    args = parser.parse_args(argv)
    complete, others, bad = read_runs(args.results, args.skip_bad)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(complete, others, bad, out, args.baseline, args.results)
    report.write()
    print(f"report: {len(complete)} complete and {len(others)} other run(s) from {len(report.clusters)} cluster(s)"
          f"{f', {len(bad)} file(s) left out' if bad else ''}; wrote {out / 'report.md'}, {out / 'report.html'} "
          f"and {report.figures} plot(s) in {out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
