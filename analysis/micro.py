"""The numbers and figures of the report's parabench-micro section and of its step-time plot.

parabench-micro files (analysis.results.read_micro: /micro/gemm, /micro/kernels, one
/micro/collectives/<op> per collective) become long tables here, one row per benchmark and file,
and the aggregates the report shows: per cluster the median over its files of each GEMM's FLOP/s
and of each collective's bus bandwidth at each message size. Collectives with wrong results
(errors > 0) are kept apart (flagged) and never aggregated or plotted. analysis.report writes the
tables into the document; the figures are made here.

The step-time plot reads the planner's CSV (app, config, predicted_step_s, measured_step_s, ratio,
compute_s, exposed_comm_s, bubble_s) and shows predicted against measured with the y = x line and
the band [0.75, 1.33] the planner is held to.
"""

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

MIB = 2 ** 20
GB = 1e9  # bus bandwidth in GB/s, nccl-tests' unit (10^9 bytes/s)
TERA = 1e12
TABLE_SIZES = (MIB, 256 * MIB)  # the message sizes of the tables, beside each series' largest
OP_ORDER = ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv_intra",
            "send_recv_inter"]
PRESET_ORDER = ["small", "gpt2-124m"]
DTYPE_ORDER = ["fp32", "bf16"]
LAYER_ORDER = ["qkv", "attn_out", "fc1", "fc2", "logits"]
STEP_MODEL_COLUMNS = ["app", "config", "predicted_step_s", "measured_step_s", "ratio", "compute_s", "exposed_comm_s",
                      "bubble_s"]
BAND = (0.75, 1.33)  # predicted ÷ measured the planner is held to (bench/plan/validate_step_time.py)


def size_label(n):
    """A message size in binary units: 8 B, 64 KiB, 256 MiB, 1 GiB."""
    n = int(n)
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def size_class(n):
    """The power of two nearest to n bytes: the size a row was asked for, where the op rounded its
    element count down to a multiple of the ranks (all_gather, reduce_scatter, all_to_all)."""
    return int(2 ** round(math.log2(n))) if n > 0 else 0


def dtype_order(dtype):
    return (DTYPE_ORDER.index(dtype), dtype) if dtype in DTYPE_ORDER else (len(DTYPE_ORDER), dtype)


def op_order(op):
    return (OP_ORDER.index(op), op) if op in OP_ORDER else (len(OP_ORDER), op)


def shape_order(shape, n):
    """small.* then gpt2-124m.* (each by layer), then square by size."""
    preset, _, layer = str(shape).partition(".")
    return (PRESET_ORDER.index(preset) if preset in PRESET_ORDER else len(PRESET_ORDER),
            LAYER_ORDER.index(layer) if layer in LAYER_ORDER else len(LAYER_ORDER), str(shape), int(n))


# ---- the long tables -----------------------------------------------------------------------------------

def benchmark_frame(runs, which):
    """One row per GEMM (which="gemm") or kernel ("kernels") benchmark of every file of `runs` (a
    DataFrame with cluster, file, short and micro), with the file's cluster and short name."""
    frames = []
    for r in runs.itertuples():
        table = r.micro[which] if isinstance(r.micro, dict) else {}
        if not table:
            continue
        frame = pd.DataFrame(table)
        frame.insert(0, "file", r.short)
        frame.insert(0, "cluster", r.cluster)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def collective_frame(runs):
    """One row per collective, variant and message size of every file of `runs`, with its group's
    communicator, ranks, nodes and dtype; `variant` is in_place or out_of_place, `size` the size class."""
    frames = []
    for r in runs.itertuples():
        for group in (r.micro["collectives"] if isinstance(r.micro, dict) else []):
            frame = pd.DataFrame(group["rows"])
            if frame.empty:
                continue
            frame["variant"] = np.where(frame["in_place"].astype(int) != 0, "in_place", "out_of_place")
            frame["size"] = [size_class(int(b)) for b in frame["bytes"]]
            for key in ("op", "comm", "ranks", "nodes", "dtype", "busbw_factor"):
                frame[key] = group[key]
            frame.insert(0, "file", r.short)
            frame.insert(0, "cluster", r.cluster)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def split_wrong(coll):
    """(valid rows, flagged): the rows of the files none of whose collectives found a wrong element,
    and one row per file, op and variant with errors > 0: the sizes and the wrong elements found.
    A file with one wrong result has all its collectives left out: its data check failed."""
    if coll.empty:
        return coll, pd.DataFrame()
    wrong = coll[coll["errors"].astype(np.int64) > 0]
    flagged = [{"cluster": cluster, "file": file, "op": op, "variant": variant,
                "sizes": ", ".join(size_label(b) for b in sorted(g["bytes"])), "errors": int(g["errors"].sum())}
               for (cluster, file, op, variant), g in wrong.groupby(["cluster", "file", "op", "variant"], sort=False)]
    valid = coll[~coll["file"].isin(set(wrong["file"]))]
    return valid, pd.DataFrame(flagged)


def failed_benchmarks(gemm, kernels, coll):
    """The benchmarks that reported an error (their `error` column): cluster, file, table, name, error."""
    rows = []
    for which, frame in (("gemm", gemm), ("kernels", kernels)):
        if frame.empty:
            continue
        for r in frame[frame["error"] != ""].itertuples():
            rows.append({"cluster": r.cluster, "file": r.file, "table": which, "name": r.name, "error": r.error})
    if not coll.empty and "error" in coll:
        for r in coll[coll["error"].fillna("") != ""].itertuples():
            rows.append({"cluster": r.cluster, "file": r.file, "table": f"collectives/{r.op}",
                         "name": f"{r.variant} {size_label(r.bytes)}", "error": r.error})
    return pd.DataFrame(rows)


# ---- aggregates ----------------------------------------------------------------------------------------

GEMM_KEY = ["backend", "dtype", "shape", "N", "C", "OC"]


def gemm_medians(gemm):
    """Per cluster and GEMM (backend, dtype, shape, N, C, OC): the median over the files of its time,
    FLOP/s and share of the peak, the files, and its label (the matmul precision); fp32 before bf16, in
    shape order, with `shape_label` the shape, and its size where the shape has several (square 1024)."""
    ok = gemm[gemm["error"] == ""] if not gemm.empty else gemm
    if ok.empty:
        return pd.DataFrame()
    out = ok.groupby(["cluster"] + GEMM_KEY, sort=False).agg(
        time_s=("time_s", "median"), flop=("flop", "first"), flop_per_s=("flop_per_s", "median"),
        peak_fraction=("peak_fraction", "median"), files=("file", "nunique"),
        label=("label", lambda s: "; ".join(sorted(set(s) - {""})))).reset_index()
    several = out.groupby("shape")[["N", "C", "OC"]].nunique().max(axis=1)
    out["shape_label"] = [s if several[s] == 1 else f"{s} {n}" if n == c == oc else f"{s} {n}×{c}×{oc}"
                          for s, n, c, oc in zip(out["shape"], out["N"], out["C"], out["OC"])]
    out["order"] = [(dtype_order(d), shape_order(s, n)) for d, s, n in zip(out["dtype"], out["shape"], out["N"])]
    return out.sort_values(["cluster", "backend", "order"]).reset_index(drop=True)


KERNEL_KEY = ["backend", "dtype", "kernel", "shape", "dims"]


def kernel_medians(kernels):
    ok = kernels[kernels["error"] == ""] if not kernels.empty else kernels
    if ok.empty:
        return pd.DataFrame()
    out = ok.groupby(["cluster"] + KERNEL_KEY, sort=True).agg(
        time_s=("time_s", "median"), flop_per_s=("flop_per_s", "median"), bytes_per_s=("bytes_per_s", "median"),
        peak_fraction=("peak_fraction", "median"), files=("file", "nunique")).reset_index()
    return out


SERIES_KEY = ["cluster", "op", "variant", "comm", "dtype", "nodes", "ranks"]


def primary_variant(coll):
    """Per op the variant the plots show: out of place where the op has it (nccl-tests' first
    column), else in place (all_reduce and broadcast run in place only)."""
    return {op: "out_of_place" if (g["variant"] == "out_of_place").any() else "in_place"
            for op, g in coll.groupby("op")}


def busbw_medians(valid):
    """Per series (cluster, op, variant, communicator, dtype, nodes, ranks) and size class: the
    median over the files of the bus bandwidth (bytes/s) and time per call, and the files."""
    valid = valid.dropna(subset=["busbw"]) if not valid.empty else valid  # a benchmark that reported an error
    if valid.empty:
        return pd.DataFrame()
    out = valid.groupby(SERIES_KEY + ["size"], sort=False).agg(
        busbw=("busbw", "median"), algbw=("algbw", "median"), time_s=("time_s", "median"),
        files=("file", "nunique")).reset_index()
    out["order"] = [op_order(op) for op in out["op"]]
    out = out.sort_values(["cluster", "order", "variant", "nodes", "ranks", "comm", "dtype", "size"])
    return out.drop(columns="order").reset_index(drop=True)


def busbw_table(medians):
    """Per series: the bus bandwidth at TABLE_SIZES and at its largest size (NaN where not measured)."""
    rows = []
    for key, g in medians.groupby(SERIES_KEY, sort=False):
        by_size = dict(zip(g["size"], g["busbw"]))
        largest = max(by_size)
        rows.append({**dict(zip(SERIES_KEY, key)), **{size: by_size.get(size, math.nan) for size in TABLE_SIZES},
                     "largest": largest, "at_largest": by_size[largest], "files": int(g["files"].max())})
    return pd.DataFrame(rows)


# ---- figures -------------------------------------------------------------------------------------------

def busbw_figure(medians, clusters, title):
    """Bus bandwidth against message size: one panel per op, one line per cluster and job size (color:
    the cluster; line style: the node count), log-log. Returns (figure, the points as a DataFrame)."""
    primary = primary_variant(medians)
    shown = medians[[primary[op] == v for op, v in zip(medians["op"], medians["variant"])]]
    ops = sorted(set(shown["op"]), key=op_order)
    columns = min(len(ops), 4)
    lines = math.ceil(len(ops) / columns)
    fig, axes = plt.subplots(lines, columns, squeeze=False, figsize=(4.2 * columns + 0.8, 3.6 * lines + 1.2))
    node_counts = sorted({int(n) for n in shown["nodes"]})
    styles = ["-", "--", ":", "-."]
    for i, op in enumerate(ops):
        ax = axes[i // columns][i % columns]
        for key, g in shown[shown["op"] == op].groupby(SERIES_KEY, sort=False):
            cluster, _, variant, comm, dtype, nodes, ranks = key
            g = g.sort_values("size")
            ax.plot(g["size"], g["busbw"] / GB, marker="o", markersize=3,
                    color=f"C{clusters.index(cluster) % 10}",
                    linestyle=styles[node_counts.index(int(nodes)) % len(styles)],
                    label=f"{cluster}: {int(nodes)} node(s), {comm} {dtype}")  # the job's, as for send_recv's pair
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = sorted(set(shown[shown["op"] == op]["size"]))
        ticks = sizes[::max(1, math.ceil(len(sizes) / 6))]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([size_label(s) for s in ticks], rotation=30, fontsize=7)
        ax.set_xlabel("message size (nccl-tests' size)")
        ax.set_ylabel("busbw GB/s (10⁹ B/s)")
        ax.set_title(f"{op} ({primary[op].replace('_', ' ')})", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    for extra in range(len(ops), lines * columns):
        axes[extra // columns][extra % columns].set_visible(False)
    legend = {}  # one legend for every panel: a series' label once, from whichever panel has it
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    rows = math.ceil(len(legend) / 3)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(3, len(legend)), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 1))
    data = shown.assign(busbw_GBps=shown["busbw"] / GB, algbw_GBps=shown["algbw"] / GB)
    return fig, data


def gemm_figure(medians, clusters, title):
    """GEMM TFLOP/s against shape: one panel per backend and dtype, bars grouped by shape, one bar per
    cluster. Returns (figure, the bars as a DataFrame)."""
    panels = list(dict.fromkeys(zip(medians["backend"], medians["dtype"])))
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(8.0, 0.6 * len(clusters) * medians["shape_label"].nunique() + 3),
                                      3.6 * len(panels) + 0.8))
    rows = []
    width = 0.8 / len(clusters)
    for ax, (backend, dtype) in zip(axes[:, 0], panels):
        mine = medians[(medians["backend"] == backend) & (medians["dtype"] == dtype)]
        shapes = list(dict.fromkeys(mine.sort_values("order")["shape_label"]))
        for j, cluster in enumerate(clusters):
            theirs = mine[mine["cluster"] == cluster].set_index("shape_label")
            heights = [float(theirs.at[s, "flop_per_s"]) / TERA if s in theirs.index else math.nan for s in shapes]
            ax.bar([i + (j - (len(clusters) - 1) / 2) * width for i in range(len(shapes))], heights, width * 0.95,
                   color=f"C{j % 10}", label=cluster)
            rows += [{"backend": backend, "dtype": dtype, "shape": s, "cluster": cluster, "tflop_per_s": h}
                     for s, h in zip(shapes, heights)]
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("TFLOP/s (10¹² flop/s)")
        ax.set_title(f"{backend} {dtype}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


# ---- the step-time model ------------------------------------------------------------------------------

class StepModelError(Exception):
    """A step-model CSV that cannot be read: the reason."""


def read_step_model(path):
    """The planner's CSV as a DataFrame with numeric columns (NaN where empty); raises StepModelError
    for a file that cannot be read, a missing column or a value that is not a number."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise StepModelError(f"cannot read as CSV ({e})") from None
    absent = [c for c in STEP_MODEL_COLUMNS if c not in table.columns]
    if absent:
        raise StepModelError(f"no column {', '.join(absent)} (the columns are {', '.join(STEP_MODEL_COLUMNS)})")
    if table.empty:
        raise StepModelError("no rows")
    for column in STEP_MODEL_COLUMNS[2:]:
        values = []
        for line, cell in enumerate(table[column], start=2):
            try:
                values.append(float(cell) if cell.strip() else math.nan)
            except ValueError:
                raise StepModelError(f"line {line}: {column} {cell!r} is not a number") from None
        table[column] = values
    return table[STEP_MODEL_COLUMNS]


def in_band(ratio):
    return BAND[0] <= ratio <= BAND[1]


def step_model_figure(table):
    """Left: predicted against measured step time, log-log, the y = x line and the band; right: the
    prediction's parts (compute, exposed communication, bubble) beside the measured time."""
    labels = [f"{a} {c}".strip() for a, c in zip(table["app"], table["config"])]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(12.0, 0.5 * len(table) + 9), 5.0),
                                      gridspec_kw={"width_ratios": [1, 1.2]})
    ok = table[(table["predicted_step_s"] > 0) & (table["measured_step_s"] > 0)]
    if not ok.empty:
        low = float(min(ok["predicted_step_s"].min(), ok["measured_step_s"].min())) / 1.6
        high = float(max(ok["predicted_step_s"].max(), ok["measured_step_s"].max())) * 1.6
        x = np.geomspace(low, high, 50)
        left.fill_between(x, BAND[0] * x, BAND[1] * x, color="0.85", label=f"{BAND[0]}–{BAND[1]}× measured")
        left.plot(x, x, color="black", linewidth=1, label="y = x")
        for i, r in enumerate(ok.itertuples()):
            left.scatter(r.measured_step_s, r.predicted_step_s, color=f"C{i % 10}", zorder=3,
                         edgecolor="black" if not in_band(r.ratio) else None)
            left.annotate(labels[r.Index], (r.measured_step_s, r.predicted_step_s), textcoords="offset points",
                          xytext=(4, 4), fontsize=7)
    left.set_xscale("log")
    left.set_yscale("log")
    if not ok.empty:
        left.set_xlim(low, high)
        left.set_ylim(low, high)
        # 1-2-5 ticks in plain numbers: step times span a decade or two, where powers of ten alone are few
        ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
                 for m in (1, 2, 5) if low <= m * 10.0 ** k <= high]
        for axis in (left.xaxis, left.yaxis):
            axis.set_major_locator(FixedLocator(ticks))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(NullFormatter())
    left.set_xlabel("measured step time s")
    left.set_ylabel("predicted step time s")
    left.set_title("predicted against measured (grey: the band)", fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    if not ok.empty:
        left.legend(fontsize=8, loc="upper left")
    x = np.arange(len(table))
    bottom = np.zeros(len(table))
    for column, name, color in (("compute_s", "compute", "#4c72b0"), ("exposed_comm_s", "exposed communication",
                                                                        "#dd8452"), ("bubble_s", "bubble", "#8c8c8c")):
        values = np.nan_to_num(table[column].to_numpy(dtype=float))
        right.bar(x - 0.2, values, 0.4, bottom=bottom, color=color, label=f"predicted: {name}")
        bottom += values
    right.bar(x + 0.2, table["measured_step_s"].to_numpy(dtype=float), 0.4, color="black", label="measured")
    right.set_xticks(x)
    right.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    right.set_ylabel("step time s")
    right.set_title("the prediction's parts beside the measurement", fontsize=10)
    right.grid(True, axis="y", alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
