#!/usr/bin/env python3
"""The report of parabench results: tables and plots from any number of result files (docs/SPEC.md
section 6) from any number of clusters.

    /usr/bin/python3 -m analysis.report RESULTS... --out DIR [--baseline CLUSTER] [--skip-bad]
                                        [--step-model CSV]

RESULTS are result files or directories, searched recursively for *.h5. The report goes to
DIR/report.md and DIR/report.html, its plots to DIR/plots/*.png, each with the numbers it shows in
a .csv beside it:

  1. a summary table per cluster and app (complete runs);
  2. the clusters side by side at equal configurations (same app, strategy, model shape, ranks,
     batch sizes, dtype, ...: every /config option but where and how the run was made), with each
     cluster's ratio to the baseline cluster (default: the first by name); and their cost and energy:
     the clusters of each such configuration ranked by tokens/s per GPU, tokens per joule (the
     energy the runs measured, /energy) and cost per million tokens (the prices their cluster profiles
     state, /system), each figure beside its inputs (cost_energy.csv);
  3. plots: memory by category per strategy and against micro-batch (stacked bars, measured beside
     predicted), memory per rank against sequence length for parabench-cp runs of one model at growing
     sequence length and cp (the sequence sweep), tokens/s and scaling efficiency against ranks, step
     time per strategy, for each parabench-ep run the tokens per expert of every layer (the load
     balance of its experts) and for each parabench-cp run the attention time of every rank (the
     load balance of its sequence chunks);
  4. the runs that did not complete (running, failed, interrupted), listed apart and used nowhere
     else;
  then, where the results hold parabench-micro files (/config app "micro"), the micro-benchmarks: per
  cluster the GEMM TFLOP/s per shape, the kernels, and the collectives' bus bandwidth at 1 MiB, 256 MiB
  and the largest size, the clusters side by side, and plots of busbw against message size (one panel
  per op) and of GEMM TFLOP/s per shape; collectives of a file that found wrong results (errors > 0)
  are flagged and left out of the tables and plots. With --step-model CSV (the planner's validation:
  app, config, predicted_step_s, measured_step_s, ratio, compute_s, exposed_comm_s, bubble_s), a plot
  of predicted against measured step time with the y = x line and the 0.75-1.33 band, and its table;
  RESULTS may then be left out.

A file that cannot be read (corrupt, truncated), is not a parabench result or has a schema version
other than 1 is an error: every such file is named on stderr with the reason and nothing is written
(exit 1). With --skip-bad the report is written from the other files and lists the ones left out.

DIR is created if missing; an existing DIR (an earlier report) is written into, its report files
replaced once the new report is complete. A DIR that exists and is not a directory, or that cannot
be created or written (permissions, a read-only file system, a path through a file), is an error:
one line on stderr naming DIR and the reason, nothing written (exit 1).

Text from the result files and the command line (cluster, app, strategy, model, dtype, device,
backend, error messages, file names) is escaped: in report.md Markdown and HTML characters are
backslash-escaped or written as entities and control characters shown as escapes (\\n, \\t, \\x1b),
so that it shows as written and cannot end a table row or start a heading, a link or a tag.
"""

import argparse
import errno
import hashlib
import html
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path

try:
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a cluster or in a test
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    from analysis import micro
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


def known_median(series):
    """The median of a column's known values; NaN (and no warning) when none is known."""
    known = series.dropna()
    return float(known.median()) if len(known) else math.nan


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
    """A file name from parts of user text: [A-Za-z0-9.=-] runs joined by _, at most 120 characters
    (a longer one is cut and ends with a hash of the whole, so that it stays unique)."""
    name = re.sub(r"[^A-Za-z0-9.=-]+", "_", "_".join(str(p) for p in parts)).strip("_")
    if len(name) > 120:
        digest = hashlib.sha1("\0".join(str(p) for p in parts).encode("utf-8", "surrogatepass")).hexdigest()[:10]
        name = f"{name[:109]}_{digest}"
    return name


def mpl(text):
    """User text for a matplotlib label: on one line (one_line), and a $ is a dollar, not the start of
    mathtext (which fails on most text that has two)."""
    return one_line(text).replace("$", r"\$")


# ---- escaping user text ------------------------------------------------------------------------------
# User text is anything that comes from a result file or the command line. It is shown as written,
# on one line: in both report.md and report.html each control character (U+0000-U+001F,
# U+007F-U+009F), line or paragraph separator (U+2028, U+2029) and bidirectional override
# (U+202A-U+202E, U+2066-U+2069) is shown as an escape, \n \r \t or \xNN / \uNNNN. In report.md
# the characters that Markdown or HTML would read as markup are then escaped (md_text). Text the
# report writes itself is Markup: Markdown put in report.md as it is, and `code` and **bold** of it
# turned into HTML.

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
SHOWN = {"\n": r"\n", "\r": r"\r", "\t": r"\t"}
# Backslash-escaped in report.md: \ ` * [ ] | # ~ $ always, _ unless inside a word (snake_case
# stays readable: CommonMark and GitHub take no emphasis there), the : of :// and the . of a
# www. that starts a word (no autolinks); < > & become &lt; &gt; &amp;.
MD_SPECIAL = re.compile(r"[\\`*\[\]|#~$]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|:(?=//)|(?i:(?<=\bwww)\.)")
MD_ENTITY = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
# What would make a paragraph that starts with user text a list item (or a setext underline) in
# report.md: its last character is escaped. (# > < | and leading spaces cannot start one there.)
MD_BLOCK_START = re.compile(r"[-+=]|\d{1,9}[.)](?=\s|$)")


class Markup(str):
    """Markdown the report writes itself: in report.md as it is; in report.html `code` and **bold**."""


def one_line(text):
    """User text with its control characters shown as escapes (see above): one line, in any output."""
    def shown(m):
        c = m.group()
        return SHOWN.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
    return CONTROL.sub(shown, str(text))


def md_text(text):
    """User text as Markdown that shows it as written: one line, no markup, no HTML, no | to end a
    table cell."""
    text = re.sub("[&<>]", lambda m: MD_ENTITY[m.group()], one_line(text))
    return MD_SPECIAL.sub(lambda m: "\\" + m.group(), text)


def md_inline(parts):
    return "".join(p if isinstance(p, Markup) else md_text(p) for p in parts)


def html_inline(parts):
    """Markup with its `code` and **bold** as HTML, user text escaped (and never read as markup)."""
    template, values = [], []
    for p in parts:
        if isinstance(p, Markup):
            template.append(p)
        else:
            template.append(f"\0{len(values)}\0")
            values.append(html.escape(one_line(p)))
    out = html.escape("".join(template))
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub("\0(\\d+)\0", lambda m: values[int(m.group(1))], out)


# ---- the document: blocks rendered as Markdown and as HTML -------------------------------------------

class Document:
    """Headings and paragraphs are parts: Markup, or anything else as user text; table cells, headers
    and image captions are all user text."""

    def __init__(self):
        self.blocks = []

    def heading(self, level, *parts):
        self.blocks.append(("h", level, parts))

    def para(self, *parts):
        self.blocks.append(("p", parts))

    def table(self, headers, rows, numeric=()):
        """numeric: the indices of right-aligned columns."""
        self.blocks.append(("table", headers, rows, set(numeric)))

    def image(self, path, alt):
        """path: plots/<slug>.png, made here."""
        self.blocks.append(("img", path, alt))

    def markdown(self):
        out = []
        for block in self.blocks:
            if block[0] == "h":
                out.append("#" * block[1] + " " + md_inline(block[2]))
            elif block[0] == "p":
                text = md_inline(block[1]).lstrip()
                out.append(MD_BLOCK_START.sub(lambda m: m.group()[:-1] + "\\" + m.group()[-1], text, count=1)
                           if MD_BLOCK_START.match(text) else text)
            elif block[0] == "img":
                out.append(f"![{md_text(block[2])}]({block[1]})")
            else:
                _, headers, rows, numeric = block
                lines = ["| " + " | ".join(md_text(h) for h in headers) + " |",
                         "|" + "|".join("---:" if i in numeric else "---" for i in range(len(headers))) + "|"]
                lines += ["| " + " | ".join(md_text(c) for c in row) + " |" for row in rows]
                out.append("\n".join(lines))
            out.append("")
        return "\n".join(out)

    def html(self, title):
        out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
               "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
               "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
               "th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f0f0f0}td.n{text-align:right}"
               "img{max-width:100%;border:1px solid #eee}code{background:#f6f6f6}</style></head><body>"]
        text = lambda t: html.escape(one_line(t))
        for block in self.blocks:
            if block[0] == "h":
                out.append(f"<h{block[1]}>{html_inline(block[2])}</h{block[1]}>")
            elif block[0] == "p":
                out.append(f"<p>{html_inline(block[1])}</p>")
            elif block[0] == "img":
                out.append(f"<p><img src=\"{html.escape(block[1])}\" alt=\"{text(block[2])}\"></p>")
            else:
                _, headers, rows, numeric = block
                out.append("<table><tr>" + "".join(f"<th>{text(h)}</th>" for h in headers) + "</tr>")
                for row in rows:
                    out.append("<tr>" + "".join(
                        f"<td class=\"n\">{text(c)}</td>" if i in numeric else f"<td>{text(c)}</td>"
                        for i, c in enumerate(row)) + "</tr>")
                out.append("</table>")
        out.append("</body></html>")
        return "\n".join(out) + "\n"


# ---- reading ----------------------------------------------------------------------------------------

def read_runs(paths, skip_bad):
    """(complete runs of the training apps, runs of any app that did not complete, parabench-micro
    runs whatever their status) as DataFrames, and the files left out as (path, reason). No paths (a
    report of --step-model alone): empty frames."""
    if not paths:
        empty = pd.DataFrame(columns=["cluster", "app", "status", "file", "micro"])
        return empty, empty, empty, []
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
    # The training runs in a frame of their own: parabench-micro's empty batch columns would turn its
    # integers into floats.
    training = [r for r in runs if r["app"] != "micro"]
    train = pd.DataFrame(training) if training else df.iloc[0:0]
    train = train.assign(order=[strategy_order(a, s) for a, s in zip(train["app"], train["strategy"])])
    complete = train[train["status"] == "complete"].reset_index(drop=True)
    others = df[df["status"] != "complete"].reset_index(drop=True)
    micro_runs = df[df["app"] == "micro"].reset_index(drop=True)
    return complete, others, micro_runs, bad


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
    def __init__(self, complete, others, micro_runs, bad, baseline, inputs, step_model=None):
        """complete: the training apps' complete runs; others: the runs of any app that did not
        complete; micro_runs: parabench-micro's runs, whatever their status; step_model: the planner's
        table (micro.read_step_model) or None."""
        self.runs, self.others, self.bad = complete, others, bad
        self.micro_runs = micro_runs
        self.micro = micro_runs[micro_runs["status"] == "complete"]
        self.step_model = step_model
        self.out = self.plots = None  # where write() puts it
        self.names = set()
        self.doc = Document()
        self.inputs = inputs
        clusters = sorted(set(complete["cluster"]) | set(others["cluster"]) | set(micro_runs["cluster"]))
        if baseline is not None and baseline not in clusters:
            raise SystemExit(f"report: error: --baseline {baseline}: no such cluster in the results "
                             f"(clusters: {', '.join(clusters)})")
        complete_clusters = sorted(set(complete["cluster"]))
        micro_clusters = sorted(set(self.micro["cluster"]))
        self.clusters = clusters
        self.baseline = baseline or (complete_clusters[0] if complete_clusters else None)
        self.micro_baseline = baseline if baseline in micro_clusters else (micro_clusters[0] if micro_clusters
                                                                            else None)
        self.section = 0  # the number of the last numbered section written
        self.figures = 0

    def save(self, fig, name, data):
        """Writes plots/<name>.png and the numbers it shows as plots/<name>.csv; returns the png path.
        Names made from distinct user text can be equal (a|b, a<b): the second is name_2, and so on."""
        unique, n = name, 1
        while unique in self.names:
            n += 1
            unique = f"{name}_{n}"
        self.names.add(unique)
        png = self.plots / f"{unique}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        data.to_csv(self.plots / f"{unique}.csv", index=False)  # pandas writes through the csv module: quoted
        self.figures += 1
        return f"plots/{png.name}"

    def write(self, folder):
        """Writes the whole report into folder, an empty one (Output.staging)."""
        self.out, self.plots = Path(folder), Path(folder) / "plots"
        self.plots.mkdir()
        self.header()
        if self.inputs:  # else a report of --step-model alone
            self.summary()
            self.cross_cluster()
            self.cost_and_energy()
            self.doc.heading(2, "3. Plots")
            self.memory_by_strategy()
            self.memory_by_micro_batch()
            self.memory_by_sequence()
            self.scaling()
            self.step_time_by_strategy()
            self.moe_load_balance()
            self.cp_load_balance()
            self.layout_ranking()
            self.not_complete()
            self.left_out()
        if not self.micro_runs.empty:
            self.micro_section()
        if self.step_model is not None:
            self.step_model_section()
        title = "parabench report"
        # errors=backslashreplace: a file name that is not UTF-8 (surrogates from the command line) as \udcff
        (self.out / "report.md").write_text(self.doc.markdown(), encoding="utf-8", errors="backslashreplace")
        (self.out / "report.html").write_text(self.doc.html(title), encoding="utf-8", errors="backslashreplace")

    def header(self):
        d = self.doc
        d.heading(1, "parabench report")
        if not self.inputs:
            d.para(f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')} by ",
                   Markup("`python3 -m analysis.report`"), " from the step-time table only.")
            return
        complete = len(self.runs) + len(self.micro)
        n_all = complete + len(self.others)
        d.para(f"{n_all} run(s) from {len(self.clusters)} cluster(s), {complete} complete; "
               f"written {datetime.now(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')} by ",
               Markup("`python3 -m analysis.report`"), " from ", " ".join(shlex.quote(i) for i in self.inputs),
               ". Memory is the maximum over ranks; step time the median over the measured steps of the slowest "
               "rank (SPEC.md section 6).")
        rows = []
        for cluster in self.clusters:
            mine = pd.concat([self.runs[self.runs["cluster"] == cluster], self.micro[self.micro["cluster"] == cluster]])
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
            d.heading(3, cluster, ": ", app)
            # the app's own load-balance numbers (/summary): ep's experts, cp's attention per rank
            extra = {"ep": (["MoE imbalance", "dropped"],
                            lambda r: [fmt(r.moe_imbalance, "ratio"), fmt(r.moe_dropped_fraction, "pct")]),
                     "cp": (["attention slowest/fastest rank"], lambda r: [fmt(r.cp_attention_time_ratio, "ratio")]),
                     }.get(app, ([], lambda r: []))
            rows = [[r.strategy, r.model, r.ranks, fmt(r.nodes, ""), r.micro_batch, r.global_batch, r.dtype,
                     fmt(r.step_time_s, "s"), fmt(r.tokens_per_s, "rate"), fmt(r.tflops_per_rank, "tflops"),
                     fmt(r.mfu, "pct"), fmt(r.measured_peak_total, "mib"), fmt(r.predicted_peak_total, "mib")]
                    + extra[1](r) + [r.short] for r in g.itertuples()]
            d.table(["strategy", "model", "ranks", "nodes", "micro-batch", "global batch", "dtype", "step time s",
                     "tokens/s", "TFLOP/s/rank", "MFU", "peak MiB measured", "peak MiB predicted"]
                    + extra[0] + ["file"],
                    rows, numeric=(2, 3, 4, 5, 7, 8, 9, 10, 11, 12) + tuple(range(13, 13 + len(extra[0]))))

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
        d.para("Configurations that ran on two clusters or more: every /config option equal but where and how the "
               "run was made (cluster, backend, comm, threads, steps, seed, output). Values are medians over repeated "
               "runs; ratios are to the baseline cluster ", Markup("**"), self.baseline, Markup("**"),
               ": tokens/s above 1× is faster, peak memory above 1× is more.")
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
        d.para(Markup("The same numbers, one row per configuration and cluster: `cross_cluster.csv`."))

    def cost_and_energy(self):
        """The clusters of each configuration that ran on two or more, ranked by tokens/s per GPU, tokens per
        joule and cost per million tokens, with every input of each figure."""
        d = self.doc
        d.heading(3, "Cost and energy at equal configurations")
        groups = [(key, g) for key, g in self.runs.groupby("key", sort=False) if g["cluster"].nunique() >= 2]
        if not groups:
            d.para("Needs a configuration with complete runs on two clusters or more.")
            return
        d.para("Per configuration that ran on two clusters or more, each cluster's medians over its runs. Tokens/s "
               "per GPU: tokens/s over the run's GPUs (one per rank; none on the CPU backend). Tokens per joule: "
               "over the energy the run measured (/energy: NVML on GPUs, RAPL for the CPU packages and DRAM; "
               f"{DASH} where it found no counter). Cost per million tokens: the hardware's hourly price from the "
               "cluster profile (per GPU-hour × GPUs, else per node-hour × nodes) plus, where the profile states an "
               "electricity price and the run measured its energy, the energy's cost (price per kWh × the measured "
               "power), over the tokens of an hour. Ranks: 1 is best (most tokens/s per GPU, most tokens per joule, "
               "lowest cost); clusters whose prices are in different currencies get no cost rank.")
        csv = []
        ordered = sorted(groups, key=lambda kg: (kg[1].iloc[0]["app"], kg[1].iloc[0]["order"], kg[1].iloc[0]["model"],
                                                 kg[1].iloc[0]["ranks"], kg[1].iloc[0]["micro_batch"]))
        for _, g in ordered:
            first = g.iloc[0]
            rows = []
            for cluster, c in g.groupby("cluster", sort=True):
                tps = known_median(c["tokens_per_s"])
                power = known_median(c["energy_j_per_step"] / c["step_time_s"])
                gpus, nodes = int(c["gpus"].iloc[0]), int(c["nodes"].iloc[0] or 1)
                price_gpu, price_node = c["price_per_gpu_hour"].iloc[0], c["price_per_node_hour"].iloc[0]
                price_kwh, currency = c["electricity_price_per_kwh"].iloc[0], c["currency"].iloc[0]
                if gpus > 0 and not missing(price_gpu):
                    hourly, hourly_text = price_gpu * gpus, f"{price_gpu:g}/GPU-h × {gpus} GPU"
                elif not missing(price_node):
                    hourly, hourly_text = price_node * nodes, f"{price_node:g}/node-h × {nodes} node"
                else:
                    hourly, hourly_text = math.nan, ""
                if not missing(price_kwh) and not missing(power):
                    power_cost, power_text = price_kwh * power / 1000.0, f"{price_kwh:g}/kWh × {power / 1000.0:.4g} kW"
                else:
                    power_cost, power_text = math.nan, ""
                parts = [x for x in (hourly, power_cost) if not missing(x)]
                per_hour = sum(parts) if parts else math.nan
                cost = per_hour / (tps * 3600.0) * 1e6 if parts and tps > 0 else math.nan
                rows.append({"cluster": cluster, "runs": len(c), "tokens_per_s": tps, "gpus": gpus, "nodes": nodes,
                             "tokens_per_s_per_gpu": tps / gpus if gpus > 0 else math.nan,
                             "energy_sources": ", ".join(sorted(set(" ".join(c["energy_sources"]).split()))),
                             "power_w": power, "tokens_per_joule": known_median(c["tokens_per_joule"]),
                             "hourly_price": hourly, "hourly_inputs": hourly_text, "electricity_per_hour": power_cost,
                             "electricity_inputs": power_text, "cost_per_hour": per_hour,
                             "cost_per_million_tokens": cost, "currency": currency})
            currencies = {r["currency"] for r in rows if not missing(r["cost_per_million_tokens"])}
            for metric, best_high, name in (("tokens_per_s_per_gpu", True, "rank_tokens_per_s_per_gpu"),
                                            ("tokens_per_joule", True, "rank_tokens_per_joule"),
                                            ("cost_per_million_tokens", False, "rank_cost")):
                known = [r for r in rows if not missing(r[metric])]
                if metric == "cost_per_million_tokens" and len(currencies) > 1:
                    known = []
                known.sort(key=lambda r: -r[metric] if best_high else r[metric])
                for r in rows:
                    r[name] = known.index(r) + 1 if r in known else math.nan
            rows.sort(key=lambda r: (missing(r["rank_cost"]), r["rank_cost"] if not missing(r["rank_cost"]) else 0,
                                     r["cluster"]))
            d.para(Markup("**"), f"{first['app']} {first['strategy']}, {first['model']}, {first['ranks']} ranks, "
                   f"micro-batch {first['micro_batch']}, global batch {first['global_batch']}, {first['dtype']}",
                   Markup("**"))
            rank = lambda x: DASH if missing(x) else str(int(x))
            d.table(["cluster", "tokens/s", "GPUs", "tokens/s per GPU", "rank", "energy counters", "power W",
                     "tokens per joule", "rank", "hourly price", "electricity", "cost per 1M tokens", "currency",
                     "rank"],
                    [[r["cluster"], fmt(r["tokens_per_s"], "rate"), r["gpus"], fmt(r["tokens_per_s_per_gpu"], "rate"),
                      rank(r["rank_tokens_per_s_per_gpu"]), r["energy_sources"] or DASH, fmt(r["power_w"], "s"),
                      fmt(r["tokens_per_joule"], "s"), rank(r["rank_tokens_per_joule"]), r["hourly_inputs"] or DASH,
                      r["electricity_inputs"] or DASH, fmt(r["cost_per_million_tokens"], "s"), r["currency"] or DASH,
                      rank(r["rank_cost"])] for r in rows],
                    numeric=(1, 2, 3, 4, 6, 7, 8, 11, 13))
            for r in rows:
                csv.append({"app": first["app"], "strategy": first["strategy"], "model": first["model"],
                            "ranks": first["ranks"], "micro_batch": first["micro_batch"],
                            "global_batch": first["global_batch"], "dtype": first["dtype"], **r})
        ranks = ("rank_tokens_per_s_per_gpu", "rank_tokens_per_joule", "rank_cost")
        pd.DataFrame(csv).astype({r: "Int64" for r in ranks}).to_csv(self.out / "cost_energy.csv", index=False)
        d.para(Markup("Every input and figure, one row per configuration and cluster: `cost_energy.csv`."))

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
            stacked_bars(ax, [mpl(label) for label in labels], points, f"{unit} per rank (max over ranks)", scale,
                         mpl(f"{cluster}: {model}, {ranks} ranks, micro-batch {micro_batch}, global batch "
                             f"{global_batch}, {dtype}"))
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
            d.para(Markup("Left bar of each pair: measured; right, hatched: the app's prediction; the black tick "
                          "is `peak_total`, the peak of the sum at any instant (not the sum of the peaks)."))

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
                         mpl(f"{cluster}: parabench-{app} {strategy}, {model}, {ranks} ranks, {dtype}"))
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

    def sequence_series(self):
        """Long-context series: complete parabench-cp runs of one cluster, model shape but the sequence
        length, cp algorithm and layout, data-parallel degree, micro-batch, dtype and recomputation at
        two sequence lengths or more (the sequence sweep: S and cp grow together). Each point is one
        (sequence length, cp degree), the median of its runs."""
        runs = self.runs.assign(short=short_paths(self.runs))
        runs = runs[runs["app"] == "cp"]
        if runs.empty:
            return []
        cp = [max(int(c), 1) for c in runs["cp"]]  # a float column where other apps' runs have none
        runs = runs.assign(cp=cp, dp=[int(r) // c for r, c in zip(runs["ranks"], cp)], seq=[int(x) for x in runs["seq"]])
        keys = ["cluster", "model_without_seq", "cp_algo", "cp_layout", "dp", "micro_batch", "dtype", "recompute"]
        series = []
        for key, g in runs.groupby(keys, sort=True):
            if g["seq"].nunique() < 2:
                continue
            points = []
            for (seq, cp), p in g.groupby(["seq", "cp"], sort=True):
                measured, predicted = memory_point(p)
                points.append({"seq": int(seq), "cp": int(cp), "ranks": int(p["ranks"].iloc[0]), "runs": len(p),
                               "measured": measured, "predicted": predicted,
                               "tokens_per_s": float(p["tokens_per_s"].median()),
                               "step_time_s": float(p["step_time_s"].median()),
                               "files": ", ".join(p["short"])})
            series.append({**dict(zip(keys, key)), "points": points})
        return series

    def memory_by_sequence(self):
        d = self.doc
        d.heading(3, "Memory against sequence length (context parallelism)")
        series = self.sequence_series()
        if not series:
            d.para("Needs complete parabench-cp runs of one model at two sequence lengths or more (the sequence "
                   "sweep, where the cp degree grows with the sequence).")
            return
        rows = []
        for s in series:
            points = s["points"]
            peak = max(max(p["measured"][PEAK], p["predicted"][PEAK]) for p in points)
            unit, scale = ("GiB", GIB) if peak >= 4 * GIB else ("MiB", MIB)
            what = f"cp {s['cp_algo']} {s['cp_layout']}" + (f" recompute={s['recompute']}" if s["recompute"] != "none"
                                                             else "")
            title = (f"{s['cluster']}: parabench-{what}, {s['model_without_seq']}, dp {s['dp']}, micro-batch "
                     f"{s['micro_batch']}, {s['dtype']}")
            fig, (left, right) = plt.subplots(1, 2, figsize=(max(13.0, 1.2 * len(points) + 9), 4.8),
                                              gridspec_kw={"width_ratios": [1, 1.15]})
            seqs = [p["seq"] for p in points]
            for category, marker, color in ((PEAK, "o", "black"), ("activations", "s", "#55a868")):
                left.plot(seqs, [p["measured"][category] / scale for p in points], marker=marker, color=color,
                          label=f"{category} measured")
                left.plot(seqs, [p["predicted"][category] / scale for p in points], marker=marker, color=color,
                          linestyle="--", markerfacecolor="none", label=f"{category} predicted")
            for p in points:
                left.annotate(f"cp {p['cp']}", (p["seq"], p["measured"][PEAK] / scale), textcoords="offset points",
                              xytext=(0, -15), ha="center", fontsize=8)
            left.set_xscale("log", base=2)
            left.set_xticks(sorted(set(seqs)))
            left.set_xticklabels([str(x) for x in sorted(set(seqs))])
            left.set_xlabel("sequence length (tokens)")
            left.set_ylabel(f"{unit} per rank (max over ranks)")
            left.set_ylim(0, left.get_ylim()[1] * 1.4)  # from 0: flat looks flat; room for the legend on top
            left.grid(True, alpha=0.3)
            left.legend(fontsize=8, loc="upper center", ncol=2)
            left.set_title("peak and activations per rank (dashed: predicted)", fontsize=10)
            labels = [f"S={p['seq']}\ncp {p['cp']}" for p in points]
            stacked_bars(right, labels, [(p["measured"], p["predicted"]) for p in points],
                         f"{unit} per rank (max over ranks)", scale, "by category")
            right.set_ylim(top=right.get_ylim()[1] * 1.08)
            fig.suptitle(mpl(title), fontsize=10)
            fig.tight_layout()
            csv = []
            for p in points:
                for c in CATEGORIES + [PEAK]:
                    csv.append({"cluster": s["cluster"], "model": s["model_without_seq"], "cp_algo": s["cp_algo"],
                                "cp_layout": s["cp_layout"], "dp": s["dp"], "micro_batch": s["micro_batch"],
                                "seq": p["seq"], "cp": p["cp"], "ranks": p["ranks"], "runs": p["runs"], "category": c,
                                "measured_bytes": int(round(p["measured"][c])),
                                "predicted_bytes": int(round(p["predicted"][c]))})
            name = slug("memory_sequence", s["cluster"], s["model_without_seq"], s["cp_algo"], s["cp_layout"],
                        f"dp{s['dp']}", f"b{s['micro_batch']}", s["dtype"],
                        *([f"recompute={s['recompute']}"] if s["recompute"] != "none" else []))
            path = self.save(fig, name, pd.DataFrame(csv))
            d.image(path, f"memory against sequence length, {s['cluster']} {what} {s['model_without_seq']}")
            first, last = points[0], points[-1]
            change = lambda c: (last["measured"][c] / first["measured"][c] if first["measured"][c] else math.nan)
            d.para(f"{s['cluster']}, {what}, {s['model_without_seq']}: the sequence grows "
                   f"{first['seq']} → {last['seq']} ({fmt(last['seq'] / first['seq'], 'ratio')}) with cp "
                   f"{first['cp']} → {last['cp']}; peak per rank {fmt(first['measured'][PEAK], 'mib')} → "
                   f"{fmt(last['measured'][PEAK], 'mib')} MiB ({fmt(change(PEAK), 'ratio')}), activations "
                   f"{fmt(first['measured']['activations'], 'mib')} → {fmt(last['measured']['activations'], 'mib')} "
                   f"MiB ({fmt(change('activations'), 'ratio')}), measured, max over ranks.")
            for p in points:
                rows.append([s["cluster"], what, s["model_without_seq"], s["micro_batch"], p["seq"], p["cp"],
                             p["ranks"], f"{p['seq'] / p['cp']:g}",
                             fmt(p["measured"][PEAK], "mib"), fmt(p["predicted"][PEAK], "mib"),
                             fmt(p["measured"]["activations"], "mib"), fmt(p["predicted"]["activations"], "mib"),
                             fmt(p["tokens_per_s"], "rate"), p["files"]])
        d.para(Markup("Left: `peak_total` (black) and activations (green) per rank against the sequence length, "
                      "measured (solid) and predicted (dashed), from 0, each point labelled with its cp degree: "
                      "when the sequence and cp grow together, every rank holds the same share of the sequence and "
                      "the lines stay flat. Right: the same points by category, measured (left bar) beside "
                      "predicted (right, hatched)."))
        d.table(["cluster", "strategy", "model", "micro-batch", "sequence", "cp", "ranks", "tokens per rank (S ÷ cp)",
                 "peak MiB measured", "peak MiB predicted", "activations MiB measured", "activations MiB predicted",
                 "tokens/s", "file"], rows, numeric=(3, 4, 5, 6, 7, 8, 9, 10, 11, 12))

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
            left.plot(ranks, tps, marker=marker, color=color, label=mpl(label))
            left.plot(ranks, tps[0] * ranks / ranks[0], linestyle=":", color=color, linewidth=1)
            right.plot(ranks, 100 * efficiency, marker=marker, color=color, label=mpl(label))
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
                ax.bar(x, heights, width * 0.95, yerr=[low, high], capsize=3, color=f"C{j}", label=mpl(cluster))
            ax.set_xticks(range(len(strategies)))
            ax.set_xticklabels([mpl(s) for _, _, s in strategies], rotation=15 if len(strategies) > 4 else 0)
            ax.set_ylabel("step time s (median; bars: min to max step)")
            ax.set_title(mpl(f"{model}, {ranks} ranks, micro-batch {micro_batch}, global batch {global_batch}, "
                             f"{dtype}"))
            ax.legend(fontsize=8)
            fig.tight_layout()
            name = slug("step_time", model, f"{ranks}ranks", f"b{micro_batch}", f"G{global_batch}", dtype)
            path = self.save(fig, name, pd.DataFrame(csv))
            d.image(path, f"step time per strategy, {model} {ranks} ranks")
            made += 1
        if not made:
            d.para("Needs two strategies or two clusters or more at one model, rank count, micro-batch and "
                   "global batch.")

    PANELS_MAX = 8  # layers shown as one bar chart each; more layers are one heatmap

    def moe_load_balance(self):
        """Per complete parabench-ep run: tokens per expert of each layer summed over the finished steps."""
        d = self.doc
        d.heading(3, "Tokens per expert (mixture-of-experts load balance)")
        runs = self.runs.assign(short=short_paths(self.runs))
        runs = runs[runs["app"] == "ep"]
        if runs.empty:
            d.para("Needs complete parabench-ep runs.")
            return
        runs = runs.sort_values(["cluster", "model", "order", "ranks", "micro_batch", "global_batch", "file"])
        rows, absent = [], []
        for r in runs.itertuples():
            moe = r.moe if isinstance(r.moe, dict) else None
            what = [r.cluster, r.strategy, r.model, r.ranks, r.micro_batch, r.global_batch]
            if moe is None or 0 in (moe["steps"], moe["layers"], moe["experts"]):
                absent.append(r.short)
                rows.append(what + [moe["steps"] if moe else 0, DASH, DASH, DASH, r.short])
                continue
            worst = int(np.nanargmax(moe["layer_imbalance"])) if np.isfinite(moe["layer_imbalance"]).any() else None
            rows.append(what + [moe["steps"],
                                DASH if worst is None else f"{fmt(moe['imbalance'], 'ratio')} (layer {worst})",
                                fmt(moe["dropped_fraction"], "pct"),
                                fmt(float(np.mean(moe["aux_loss"])) if len(moe["aux_loss"]) else math.nan, "s"),
                                r.short])
            path = self.moe_plot(r, moe)
            d.image(path, f"tokens per expert, {r.cluster} {r.strategy} {r.model} {r.ranks} ranks, {r.short}")
        d.para(Markup("Tokens per expert: the kept assignments routed to each expert (over the global batch), summed "
                      "over the run's finished steps (`/moe/tokens_per_expert`), one panel per layer, the most loaded "
                      "expert in red and the layer's mean dashed; for more than "
                      f"{self.PANELS_MAX} layers a heatmap of tokens ÷ the layer's mean. Imbalance is max ÷ mean "
                      "(1× balanced, E× every token on one expert), of the worst layer in the table; dropped is the "
                      "share of assignments over the capacity; aux loss the load-balancing term "
                      "(bench/ep/README.md)."))
        d.table(["cluster", "strategy", "model", "ranks", "micro-batch", "global batch", "steps", "imbalance",
                 "dropped", "aux loss (mean)", "file"], rows, numeric=(3, 4, 5, 6, 8, 9))
        if absent:
            d.para(Markup("No routing statistics (no `/moe/tokens_per_expert`, or an empty one) in: "),
                   ", ".join(absent), Markup("."))

    def moe_plot(self, r, moe):
        tokens, layers, experts = moe["tokens"], moe["layers"], moe["experts"]
        dropped = moe["dropped"]
        means = tokens.sum(axis=1) / experts
        assigned = tokens.sum(axis=1) + (dropped if dropped is not None else 0)
        title = (mpl(f"{r.cluster}: {r.strategy}, {r.model}, {r.ranks} ranks, micro-batch {r.micro_batch}, "
                     f"global batch {r.global_batch}") + "\n" + f"tokens per expert summed over {moe['steps']} "
                 f"step(s); imbalance (max/mean, worst layer) {fmt(moe['imbalance'], 'ratio')}")
        if layers <= self.PANELS_MAX:
            columns = min(layers, 4)
            lines = math.ceil(layers / columns)
            fig, axes = plt.subplots(lines, columns, squeeze=False, sharey=True,
                                     figsize=(max(7.0, columns * max(3.2, 0.25 * experts + 1.5)), 2.9 * lines + 0.9))
            for layer in range(layers):
                ax = axes[layer // columns][layer % columns]
                counts = tokens[layer]
                colors = ["C3" if c == counts.max() and counts.max() > means[layer] else "C0" for c in counts]
                ax.bar(np.arange(experts), counts, color=colors, width=0.8)
                ax.axhline(means[layer], color="black", linestyle="--", linewidth=1)
                note = f"layer {layer}: max/mean {fmt(moe['layer_imbalance'][layer], 'ratio')}"
                if dropped is not None and dropped[layer] > 0:
                    note += f", dropped {fmt(dropped[layer] / assigned[layer], 'pct')}"
                ax.set_title(note, fontsize=9)
                ax.set_xlabel("expert")
                if experts <= 16:
                    ax.set_xticks(range(experts))
                else:
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_xlim(-0.6, experts - 0.4)
                if layer % columns == 0:
                    ax.set_ylabel("tokens (dashed: mean)")
                ax.grid(True, axis="y", alpha=0.3)
            for extra in range(layers, lines * columns):
                axes[extra // columns][extra % columns].set_visible(False)
            fig.suptitle(title, fontsize=10)
        else:
            fig, ax = plt.subplots(figsize=(max(7.0, 0.22 * experts + 3.5), max(4.0, 0.22 * layers + 1.6)))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = tokens / means[:, None]
            high = max(2.0, float(np.nanmax(ratio)) if np.isfinite(ratio).any() else 2.0)
            image = ax.imshow(ratio, aspect="auto", cmap="RdBu_r", interpolation="nearest",
                              norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=high))
            fig.colorbar(image, ax=ax, label="tokens ÷ the layer's mean (1: balanced)")
            ax.set_yticks(range(layers))
            ax.set_yticklabels([f"{layer} ({fmt(moe['layer_imbalance'][layer], 'ratio')})" for layer in range(layers)],
                               fontsize=7 if layers > 24 else 8)
            ax.set_ylabel("layer (max/mean)")
            ax.set_xlabel("expert")
            if experts <= 16:
                ax.set_xticks(range(experts))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        csv = [{"cluster": r.cluster, "strategy": r.strategy, "model": r.model, "ranks": r.ranks, "file": r.short,
                "steps": moe["steps"], "layer": layer, "expert": expert, "tokens": int(tokens[layer, expert]),
                "layer_mean": float(means[layer]), "layer_imbalance": float(moe["layer_imbalance"][layer]),
                "layer_dropped": int(dropped[layer]) if dropped is not None else None,
                "imbalance": moe["imbalance"]}
               for layer in range(layers) for expert in range(experts)]
        name = slug("moe_tokens_per_expert", r.cluster, r.strategy, r.model, f"{r.ranks}ranks", f"b{r.micro_batch}",
                    f"G{r.global_batch}", r.dtype)
        return self.save(fig, name, pd.DataFrame(csv))

    def cp_load_balance(self):
        """Per complete parabench-cp run: each rank's time in the attention core (/cp/attention_time_s)."""
        d = self.doc
        d.heading(3, "Attention time per rank (context-parallel load balance)")
        runs = self.runs.assign(short=short_paths(self.runs))
        runs = runs[runs["app"] == "cp"]
        if runs.empty:
            d.para("Needs complete parabench-cp runs.")
            return
        runs = runs.sort_values(["cluster", "model", "order", "ranks", "micro_batch", "global_batch", "file"])
        rows, single, absent = [], [], []
        for r in runs.itertuples():
            cp = r.cp_attention if isinstance(r.cp_attention, dict) else None
            what = [r.cluster, r.strategy, r.model, r.ranks, r.micro_batch, r.global_batch]
            if cp is None or cp["steps"] == 0:
                (single if r.cp == 1 else absent).append(r.short)
                rows.append(what + [cp["steps"] if cp else 0, DASH, DASH, DASH, DASH, r.short])
                continue
            slowest, fastest = int(np.argmax(cp["total"])), int(np.argmin(cp["total"]))
            rows.append(what + [cp["steps"], fmt(float(cp["per_step"].mean()) * 1e3, "s"),
                                f"{slowest} ({fmt(cp['per_step'][slowest] * 1e3, 's')})",
                                f"{fastest} ({fmt(cp['per_step'][fastest] * 1e3, 's')})",
                                fmt(cp["ratio"], "ratio"), r.short])
            path = self.cp_plot(r, cp)
            d.image(path, f"attention time per rank, {r.cluster} {r.strategy} {r.model} {r.ranks} ranks, {r.short}")
        d.para(Markup("Attention time per rank: each rank's wall time in the attention core "
                      "(`/cp/attention_time_s`: its share of the causal attention and the exchange of keys and "
                      "values), the mean over the run's finished steps after warm-up (all finished steps of a run "
                      "that did not get past warm-up), the slowest rank in red, the fastest in green, the mean "
                      "dashed; bars span each rank's fastest to slowest step. Slowest ÷ fastest is the ratio of "
                      "their sums over those steps (1× balanced), the app's `cp_attention_time_ratio`. With "
                      "`--cp-layout contiguous` the rank holding the end of the sequence does the most causal "
                      "work; zigzag gives each rank chunks i and 2·cp−1−i to balance it."))
        d.table(["cluster", "strategy", "model", "ranks", "micro-batch", "global batch", "steps",
                 "attention ms/step (mean)", "slowest rank (ms)", "fastest rank (ms)", "slowest ÷ fastest", "file"],
                rows, numeric=(3, 4, 5, 6, 7, 10))
        if single:
            d.para(Markup("cp 1 (one rank per sequence, no exchange, no `/cp/attention_time_s`): "),
                   ", ".join(single), Markup("."))
        if absent:
            d.para(Markup("No attention times (no `/cp/attention_time_s`, or no finished step in it) in: "),
                   ", ".join(absent), Markup("."))

    def layout_ranking(self):
        """The layouts of parabench-hybrid runs of one model, job and batch (the layout sweep: the planner's
        fastest), ranked by measured step time beside the planner's rank and step time."""
        d = self.doc
        d.heading(3, "Hybrid layouts: measured against planned")
        runs = self.runs.assign(short=short_paths(self.runs))
        runs = runs[runs["app"] == "hybrid"]
        if runs.empty:
            d.para(Markup("Needs complete parabench-hybrid runs (the `layout` sweep runs the planner's fastest "
                          "layouts: `jobs/submit layout --gpu-memory GIB -- --model M --global-batch G`)."))
            return
        keys = ["cluster", "model", "ranks", "global_batch", "dtype"]
        for key, g in runs.groupby(keys, sort=True):
            cluster, model, ranks, global_batch, dtype = key
            g = g.sort_values(["step_time_s", "file"]).reset_index(drop=True)
            rows, csv = [], []
            for i, r in enumerate(g.itertuples(), start=1):
                planned_rank = r.planned_rank if not missing(r.planned_rank) else None
                per_gpu = r.tokens_per_s / r.ranks if not missing(r.tokens_per_s) else math.nan
                ratio = r.step_time_s / r.planned_step_s if not missing(r.planned_step_s) else math.nan
                rows.append([i, int(planned_rank) if planned_rank else DASH, r.strategy, r.recompute, r.micro_batch,
                             fmt(r.step_time_s, "s"), fmt(r.planned_step_s, "s") if not missing(r.planned_step_s)
                             else DASH, fmt(ratio, "ratio") if not missing(ratio) else DASH, fmt(per_gpu, "rate"),
                             fmt(r.measured_peak_total, "mib"), fmt(r.predicted_peak_total, "mib"), r.short])
                csv.append({"measured_rank": i, "planned_rank": planned_rank, "layout": r.strategy,
                            "recompute": r.recompute, "micro_batch": r.micro_batch, "step_time_s": r.step_time_s,
                            "planned_step_s": r.planned_step_s, "tokens_per_s_per_gpu": per_gpu,
                            "measured_peak_bytes": r.measured_peak_total,
                            "predicted_peak_bytes": r.predicted_peak_total, "file": r.short})
            d.para(f"{cluster}: {model}, {ranks} ranks, global batch {global_batch}, {dtype}.")
            d.table(["measured rank", "planned rank", "layout", "recompute", "micro-batch", "step time",
                     "planned step time", "measured ÷ planned", "tokens/s per rank", "peak memory MiB",
                     "predicted peak MiB", "file"], rows, numeric=(0, 1, 4, 5, 6, 7, 8, 9, 10))
            planned = [c for c in csv if not missing(c["planned_step_s"])]
            if planned:
                fig, ax = plt.subplots(figsize=(6.5, 4.5))
                ax.scatter([c["planned_step_s"] for c in planned], [c["step_time_s"] for c in planned])
                for c in planned:  # the planner's rank beside each point (the table names the layout)
                    ax.annotate(f"#{c['planned_rank']}" if c["planned_rank"] else "", (c["planned_step_s"],
                                c["step_time_s"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
                ax.set_xlabel("planned step time s (parabench-plan --search)")
                ax.set_ylabel("measured step time s (median)")
                ax.set_title(mpl(f"{cluster}: {model}, {ranks} ranks, global batch {global_batch} "
                                 f"(#: planned rank)"), fontsize=10)
                fig.tight_layout()
                path = self.save(fig, slug("layouts", cluster, model, f"{ranks}ranks", f"G{global_batch}", dtype),
                                 pd.DataFrame(csv))
                d.image(path, f"measured against planned step time, {cluster} {model} {ranks} ranks")
        d.para(Markup("Measured rank: by the run's median step time; planned rank and step time: what "
                      "`parabench-plan --app hybrid --search` said when the layout sweep chose the layout (its "
                      "`planned_rank` and `planned_step_s` in the run's tag). The planner's time is the "
                      "peak-based estimate of its GPU table unless the sweep's profile gave a peak; the order "
                      "is what to compare."))

    def cp_plot(self, r, cp):
        ranks = cp["ranks"]
        degree = int(r.cp) if not missing(r.cp) and int(r.cp) >= 1 else ranks
        per_step = cp["per_step"]
        scale, unit = (1e3, "ms") if float(np.nanmax(cp["step_max"])) < 1 else (1.0, "s")
        fig, ax = plt.subplots(figsize=(max(7.0, 0.35 * ranks + 3), 4.6))
        x = np.arange(ranks)
        slowest, fastest = int(np.argmax(cp["total"])), int(np.argmin(cp["total"]))
        colors = ["C3" if i == slowest else "C2" if i == fastest else "C0" for i in range(ranks)]
        ax.bar(x, per_step * scale, color=colors, width=0.8,
               yerr=[(per_step - cp["step_min"]) * scale, (cp["step_max"] - per_step) * scale], capsize=2,
               error_kw={"elinewidth": 0.8, "ecolor": "0.3"})
        ax.axhline(float(per_step.mean()) * scale, color="black", linestyle="--", linewidth=1)
        groups = ranks // degree if degree else 1
        for g in range(1, groups):  # cp groups: consecutive ranks
            ax.axvline(g * degree - 0.5, color="0.5", linestyle=":", linewidth=1)
        if ranks <= 32:
            ax.set_xticks(x)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.6, ranks - 0.4)
        ax.set_xlabel("rank" + (f" (dotted: cp groups of {degree})" if groups > 1 else ""))
        ax.set_ylabel(f"attention {unit} per step (dashed: mean)")
        ax.grid(True, axis="y", alpha=0.3)
        steps = f"{cp['steps']} step(s)" + (f" after {cp['skipped']} warm-up" if cp["skipped"] else "")
        ax.set_title(mpl(f"{r.cluster}: {r.strategy}, {r.model}, {r.ranks} ranks, micro-batch {r.micro_batch}, "
                         f"global batch {r.global_batch}") + "\n" + f"attention time per rank, mean of {steps}; "
                     f"slowest ÷ fastest rank {fmt(cp['ratio'], 'ratio')}", fontsize=9)
        fig.tight_layout()
        csv = [{"cluster": r.cluster, "strategy": r.strategy, "model": r.model, "ranks": r.ranks, "file": r.short,
                "steps": cp["steps"], "warmup_skipped": cp["skipped"], "rank": i, "cp_group": i // degree,
                "cp_rank": i % degree, "attention_s_total": float(cp["total"][i]),
                "attention_s_per_step": float(per_step[i]), "attention_s_step_min": float(cp["step_min"][i]),
                "attention_s_step_max": float(cp["step_max"][i]), "ratio": cp["ratio"]} for i in range(ranks)]
        name = slug("cp_attention", r.cluster, r.strategy, r.model, f"{r.ranks}ranks", f"b{r.micro_batch}",
                    f"G{r.global_batch}", r.dtype)
        return self.save(fig, name, pd.DataFrame(csv))

    # ---- parabench-micro -------------------------------------------------------------------------------

    def micro_section(self):
        """parabench-micro: per cluster its GEMMs, collectives and kernels, the clusters side by side,
        the plots, and what is flagged (wrong results, failed benchmarks)."""
        d = self.doc
        self.section += 1
        d.heading(2, f"{self.section}. Micro-benchmarks (parabench-micro)")
        runs = self.micro_runs.assign(short=short_paths(self.micro_runs))
        complete = runs[runs["status"] == "complete"]
        gemm = micro.benchmark_frame(complete, "gemm")
        kernels = micro.benchmark_frame(complete, "kernels")
        collectives = micro.collective_frame(complete)
        valid, flagged = micro.split_wrong(collectives)
        # Files that did not complete can hold tables too (a run whose data check failed is "failed"):
        # their wrong results are flagged here as well, beside their listing in section 4.
        _, flagged_others = micro.split_wrong(micro.collective_frame(runs[runs["status"] != "complete"]))
        flagged = pd.concat([flagged, flagged_others], ignore_index=True)
        gemm_medians, kernel_medians = micro.gemm_medians(gemm), micro.kernel_medians(kernels)
        busbw = micro.busbw_medians(valid)
        d.para(Markup("Each cluster's numbers are medians over its complete parabench-micro files. **GEMM**: "
                      "out (N, OC) = inp (N, C) · weight (C, OC), TFLOP/s = 2·N·C·OC ÷ time per call (10¹² "
                      "flop/s), the time per call the median over Google Benchmark's repetitions; % of peak where "
                      "the device's peak is known. **Collectives**, as nccl-tests defines them: size is the whole "
                      "buffer (all_gather's received one), time the slowest rank's, algbw = size ÷ time and busbw = "
                      "algbw × (all_reduce 2(n−1)/n; all_gather, reduce_scatter, all_to_all (n−1)/n; broadcast and "
                      "send/recv 1), in GB/s (10⁹ bytes/s); send_recv_intra is a pair of ranks on one node, "
                      "send_recv_inter a pair on two. Files that did not complete are in section 4 only."))
        if complete.empty:
            d.para("No complete parabench-micro files.")
        clusters = sorted(set(complete["cluster"]))
        for cluster in clusters:
            of = lambda frame: frame[frame["cluster"] == cluster] if not frame.empty else frame
            self.micro_cluster(cluster, of(complete), of(gemm_medians), of(busbw), of(kernel_medians))
        if len(clusters) >= 2:
            self.micro_side_by_side(clusters, gemm_medians, busbw)
        self.micro_plots(clusters, gemm_medians, busbw)
        self.micro_flags(flagged, micro.failed_benchmarks(gemm, kernels, collectives))

    def micro_cluster(self, cluster, files, gemm, busbw, kernels):
        d = self.doc
        shapes = sorted({(int(r.nodes), int(r.ranks)) for r in files.itertuples() if not missing(r.nodes)})
        d.heading(3, cluster, ": GEMM")
        d.para(f"{cluster}: {len(files)} file(s), ", ", ".join(f"{n} node(s) × {r} ranks" for n, r in shapes) or DASH,
               f"; {', '.join(sorted(set(files['device']) - {''})) or DASH}.")
        if gemm.empty:
            d.para("No GEMM results.")
        else:
            rows = [[r.backend, r.dtype, r.shape_label, r.N, r.C, r.OC, fmt(r.flop / 1e9, "tflops"),
                     fmt(r.time_s * 1e3, "s"), fmt(r.flop_per_s / micro.TERA, "tflops"), fmt(r.peak_fraction, "pct"),
                     r.files, r.label or DASH] for r in gemm.itertuples()]
            d.table(["backend", "dtype", "shape", "N", "C", "OC", "GFLOP per call", "time ms", "TFLOP/s", "% of peak",
                     "files", "matmul precision"], rows, numeric=(3, 4, 5, 6, 7, 8, 9, 10))
        d.heading(3, cluster, ": collectives")
        if busbw.empty:
            d.para("No collectives with valid results.")
        else:
            table = micro.busbw_table(busbw)
            at = [f"busbw GB/s at {micro.size_label(size)}" for size in micro.TABLE_SIZES]
            rows = [[r["op"], r["variant"].replace("_", " "), r["comm"], r["dtype"], int(r["nodes"]), int(r["ranks"])]
                    + [fmt(r[size] / micro.GB, "tflops") for size in micro.TABLE_SIZES]
                    + [micro.size_label(r["largest"]), fmt(r["at_largest"] / micro.GB, "tflops"), r["files"]]
                    for _, r in table.iterrows()]
            d.table(["op", "variant", "comm", "dtype", "nodes", "ranks"] + at
                    + ["largest size", "busbw GB/s at largest", "files"], rows, numeric=range(4, 6 + len(at) + 3))
        if not kernels.empty:
            d.heading(3, cluster, ": kernels")
            rows = [[r.kernel, r.backend, r.dtype, r.shape, r.dims, fmt(r.time_s * 1e6, "s"),
                     fmt(r.flop_per_s / 1e9, "tflops"), fmt(r.bytes_per_s / micro.GB, "tflops"),
                     fmt(r.peak_fraction, "pct"), r.files] for r in kernels.itertuples()]
            d.table(["kernel", "backend", "dtype", "preset", "dims", "time µs", "GFLOP/s", "GB/s", "% of peak",
                     "files"], rows, numeric=(5, 6, 7, 8, 9))

    def micro_side_by_side(self, clusters, gemm, busbw):
        d = self.doc
        base = self.micro_baseline
        others = [c for c in clusters if c != base]
        ratio = lambda a, b: a / b if not missing(a) and not missing(b) and b else math.nan
        d.heading(3, "Across clusters: GEMM")
        d.para("TFLOP/s per shape on each cluster, and each cluster's ratio to ", Markup("**"), base, Markup("**"),
               " (above 1× is faster).")
        if not gemm.empty:
            rows = []
            for (backend, dtype, label), g in gemm.groupby(["backend", "dtype", "shape_label"], sort=False):
                value = {c: float(g[g["cluster"] == c]["flop_per_s"].median()) if c in set(g["cluster"]) else math.nan
                         for c in clusters}
                rows.append([backend, dtype, label] + [fmt(value[c] / micro.TERA, "tflops") for c in clusters]
                            + [fmt(ratio(value[c], value[base]), "ratio") for c in others])
            d.table(["backend", "dtype", "shape"] + [f"{c} TFLOP/s" for c in clusters]
                    + [f"{c} / {base}" for c in others], rows, numeric=range(3, 3 + len(clusters) + len(others)))
        d.heading(3, "Across clusters: collectives")
        d.para("Bus bandwidth in GB/s at 1 MiB, 256 MiB and the largest size every cluster measured, at equal op, "
               "variant, dtype and node count (the ranks per node are each cluster's), and the ratio to ",
               Markup("**"), base, Markup("**"), ".")
        if busbw.empty:
            return
        rows = []
        for (op, variant, dtype, nodes), g in busbw.groupby(["op", "variant", "dtype", "nodes"], sort=False):
            present = [c for c in clusters if c in set(g["cluster"])]
            common = set.intersection(*(set(g[g["cluster"] == c]["size"]) for c in present))
            sizes = sorted(set(micro.TABLE_SIZES) | ({max(common)} if common else set()))
            for size in sizes:
                at = g[g["size"] == size]
                if at.empty:
                    continue
                value = {c: float(at[at["cluster"] == c]["busbw"].median()) if c in set(at["cluster"]) else math.nan
                         for c in clusters}
                ranks = {c: ", ".join(str(int(r)) for r in sorted(set(at[at["cluster"] == c]["ranks"]))) or DASH
                         for c in clusters}
                rows.append([op, variant.replace("_", " "), dtype, int(nodes), micro.size_label(size)]
                            + [ranks[c] for c in clusters] + [fmt(value[c] / micro.GB, "tflops") for c in clusters]
                            + [fmt(ratio(value[c], value[base]), "ratio") for c in others])
        d.table(["op", "variant", "dtype", "nodes", "size"] + [f"{c} ranks" for c in clusters]
                + [f"{c} busbw GB/s" for c in clusters] + [f"{c} / {base}" for c in others], rows,
                numeric=range(3, 5 + 2 * len(clusters) + len(others)))

    def micro_plots(self, clusters, gemm, busbw):
        d = self.doc
        d.heading(3, "Micro-benchmark plots")
        if busbw.empty and gemm.empty:
            d.para("Needs complete parabench-micro files with valid results.")
            return
        if not busbw.empty:
            fig, data = micro.busbw_figure(busbw, clusters, "bus bandwidth against message size")
            d.image(self.save(fig, "micro_busbw", data), "bus bandwidth against message size, one panel per op")
            d.para("Bus bandwidth (GB/s, log) against the message size (log), one panel per op (out of place where "
                   "the op has both variants), one line per cluster (color) and job size (line style: the node "
                   "count); the median over a cluster's files at each size.")
        if not gemm.empty:
            fig, data = micro.gemm_figure(gemm, clusters, "GEMM TFLOP/s per shape")
            d.image(self.save(fig, "micro_gemm", data), "GEMM TFLOP/s per shape and cluster")
            d.para("GEMM TFLOP/s (10¹² flop/s) per shape, one panel per backend and dtype, one bar per cluster.")

    def micro_flags(self, flagged, failed):
        d = self.doc
        if not flagged.empty:
            d.heading(3, "Collectives with wrong results")
            d.para(Markup("**Flagged**: these files' collectives delivered wrong elements (`errors` > 0 in "
                          "`/micro/collectives/<op>`); none of their collectives is in the tables or plots above."))
            d.table(["cluster", "file", "op", "variant", "sizes", "wrong elements"],
                    [[r.cluster, r.file, r.op, r.variant.replace("_", " "), r.sizes, r.errors]
                     for r in flagged.itertuples()], numeric=(5,))
        if not failed.empty:
            d.heading(3, "Benchmarks that reported an error")
            d.para("Left out of the tables and plots above.")
            d.table(["cluster", "file", "table", "benchmark", "error"],
                    [[r.cluster, r.file, r.table, r.name, r.error] for r in failed.itertuples()])

    # ---- the planner's step time against the apps' ---------------------------------------------------

    def step_model_section(self):
        d = self.doc
        table = self.step_model
        self.section += 1
        d.heading(2, f"{self.section}. Step time: the planner against measurement")
        fig = micro.step_model_figure(table)
        d.image(self.save(fig, "step_model", table), "predicted against measured step time")
        inside = sum(1 for r in table["ratio"] if not missing(r) and micro.in_band(r))
        d.para(Markup(f"`parabench-plan`'s predicted step time against the apps' measured one (the median step of "
                      f"`/summary`). Left: log-log, the y = x line and the band {micro.BAND[0]}–{micro.BAND[1]}× "
                      f"(grey); a point outside it has a black edge. Right: the prediction's parts (compute, exposed "
                      f"communication, pipeline bubble) beside the measurement. "), f"{inside} of {len(table)} "
                      f"configuration(s) within the band.")
        rows = [[r.app, r.config, fmt(r.predicted_step_s, "s"), fmt(r.measured_step_s, "s"), fmt(r.ratio, "ratio"),
                 fmt(r.compute_s, "s"), fmt(r.exposed_comm_s, "s"), fmt(r.bubble_s, "s"),
                 DASH if missing(r.ratio) else ("yes" if micro.in_band(r.ratio) else "no")]
                for r in table.itertuples()]
        d.table(["app", "configuration", "predicted s", "measured s", "ratio", "compute s", "exposed comm s",
                 "bubble s", f"within {micro.BAND[0]}–{micro.BAND[1]}"], rows, numeric=(2, 3, 4, 5, 6, 7))

    def not_complete(self):
        d = self.doc
        d.heading(2, "4. Runs not complete")
        if self.others.empty:
            d.para("None: every run completed.")
            return
        d.para("Left out of every table and plot above: their numbers, where they have any, cover only part of a run.")
        others = self.others.assign(short=short_paths(self.others)).sort_values(["cluster", "app", "file"])
        # parabench-micro runs no steps; with its files here the steps column holds floats (NaN for them)
        steps = lambda r: DASH if r.app == "micro" else \
            f"{r.finished_steps} of {DASH if missing(r.steps) else int(r.steps)}"
        rows = [[r.cluster, r.app, r.strategy, r.model or DASH, r.ranks, r.status, r.error or DASH, steps(r), r.short]
                for r in others.itertuples()]
        d.table(["cluster", "app", "strategy", "model", "ranks", "status", "error", "steps", "file"], rows,
                numeric=(4,))

    def left_out(self):
        self.section = 4
        if not self.bad:
            return
        self.section = 5
        d = self.doc
        d.heading(2, "5. Files left out")
        d.para("Not read (--skip-bad): the reason for each.")
        d.table(["file", "reason"], [[path, reason] for path, reason in self.bad])


# ---- the output folder -------------------------------------------------------------------------------

class Output:
    """The --out folder. The report is written into a hidden staging folder inside it and moved into
    place only once complete, so that an error leaves nothing half-written: no new folder (those made
    here are removed again), and an earlier report there as it was. Errors end the report with one
    line on stderr, "report: error: --out DIR: <reason>", and exit code 1 (SystemExit)."""

    REPORT_FILES = ("cost_energy.csv", "cross_cluster.csv", "report.html", "report.md")  # report.md last: it links the rest

    def __init__(self, path):
        self.path = Path(path)
        self.shown = one_line(path)
        self.created = []  # folders made here, outermost first
        self.staging = None
        if os.path.lexists(self.path) and not self.path.is_dir():
            raise SystemExit(f"report: error: --out {self.shown}: File exists and is not a directory; nothing "
                             f"written (--out names the folder the report goes to)")
        try:
            missing, parent = [], self.path
            while not os.path.lexists(parent) and parent != parent.parent:
                missing.append(parent)
                parent = parent.parent
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
            for folder in reversed(missing):
                try:
                    folder.mkdir()
                except FileExistsError:  # a/.. once a is made
                    if not folder.is_dir():
                        raise
                    continue
                self.created.append(folder)
            self.staging = Path(tempfile.mkdtemp(prefix=".report-", dir=self.path))
        except OSError as e:
            self.discard()
            raise SystemExit(self.error(e)) from None

    def error(self, e, installing=False):
        """The line for OSError e: the reason, and the path it concerns where that is not DIR itself."""
        reason = e.strerror or str(e)
        where = Path(os.fsdecode(e.filename)) if isinstance(e.filename, (str, bytes, os.PathLike)) else None
        if where is not None and self.staging is not None:
            try:  # a file of the report: named as it would be in DIR
                where = self.path / where.relative_to(self.staging)
            except ValueError:
                pass
        if where is not None and (where == self.path or where.parent == self.path and
                                  where.name.startswith(".report-")):
            where = None
        if isinstance(e, NotADirectoryError) and where is not None and where != self.path:
            detail = f" ({one_line(where)} is not a directory)"
        else:
            detail = f" ({one_line(where)})" if where is not None else ""
        outcome = "the report there may be incomplete" if installing else "nothing written"
        return f"report: error: --out {self.shown}: {reason}{detail}; {outcome}"

    def install(self):
        """Moves the staged report into DIR, replacing an earlier one: its plots/*.png and *.csv and
        report files (cross_cluster.csv and cost_energy.csv too when this report has none); nothing else there."""
        plots = self.path / "plots"
        try:
            plots.mkdir(exist_ok=True)
        except OSError as e:
            raise SystemExit(self.error(e)) from None
        try:
            new = {p.name: p for p in (self.staging / "plots").iterdir()}
            for old in list(plots.glob("*.png")) + list(plots.glob("*.csv")):
                if old.name not in new:
                    old.unlink()  # the plots of an earlier report in this folder
            for name, staged in sorted(new.items()):
                os.replace(staged, plots / name)
            for name in self.REPORT_FILES:
                if (self.staging / name).exists():
                    os.replace(self.staging / name, self.path / name)
                elif os.path.lexists(self.path / name):
                    (self.path / name).unlink()  # an earlier report's, that this one does not have
        except OSError as e:
            raise SystemExit(self.error(e, installing=True)) from None
        self.close()

    def close(self):
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    def discard(self):
        """Removes the staging folder and the folders made here (when still empty)."""
        self.close()
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m analysis.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*", metavar="RESULTS", help="result files or directories of them")
    parser.add_argument("--out", required=True, metavar="DIR", help="where report.md, report.html and plots/ go")
    parser.add_argument("--baseline", metavar="CLUSTER", help="the cluster the ratios are relative to "
                                                              "(default: the first by name)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="write the report from the readable files and list the others, instead of failing")
    parser.add_argument("--step-model", metavar="CSV",
                        help="the planner's predicted against measured step times (columns: "
                             f"{', '.join(micro.STEP_MODEL_COLUMNS)}): a plot and a table")
    args = parser.parse_args(argv)
    if not args.results and args.step_model is None:
        parser.error("give RESULTS (result files or directories), or --step-model CSV, or both")
    output = Output(args.out)  # first: a --out that cannot be written fails before the results are read
    try:
        step_model = None
        if args.step_model is not None:
            try:
                step_model = micro.read_step_model(args.step_model)
            except micro.StepModelError as e:
                raise SystemExit(f"report: error: --step-model {one_line(args.step_model)}: {e}; nothing written")
        complete, others, micro_runs, bad = read_runs(args.results, args.skip_bad)
        report = Report(complete, others, micro_runs, bad, args.baseline, args.results, step_model)
        try:
            report.write(output.staging)
        except OSError as e:
            raise SystemExit(output.error(e)) from None
        output.install()
    except BaseException:
        output.discard()
        raise
    out = output.path
    print(f"report: {len(complete) + len(report.micro)} complete and {len(others)} other run(s) from "
          f"{len(report.clusters)} cluster(s)"
          f"{f', {len(bad)} file(s) left out' if bad else ''}; wrote {out / 'report.md'}, {out / 'report.html'} "
          f"and {report.figures} plot(s) in {out / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
