#!/usr/bin/env python3
"""Print one row per parabench result file (SPEC.md section 6): what ran, where, and how fast.

usage: analysis/summarize.py [--csv] RESULT.h5|DIR ...

Directories are searched recursively for *.h5. A file that cannot be opened, is not a parabench
result or has another schema version is reported on stderr and makes the exit code 1; the other
files are still listed. Values a run did not write (a run killed before its summary) are shown as
"-" (empty in CSV); for such a run the step time and tokens/s are taken from /steps/time_s.
"""

import argparse
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or as analysis.summarize
try:
    import h5py
    import numpy as np

    from analysis.results import SCHEMA, SCHEMA_VERSION, ResultError, finished_rows, plain
except ImportError as e:
    sys.exit(f"summarize: error: {e}; install analysis/requirements.txt (h5py, numpy) "
             f"for {sys.executable}, or run it with a python3 that has them")

MIB = 2**20

# (CSV name, table heading, table format)
COLUMNS = [
    ("file", "file", "{}"),
    ("app", "app", "{}"),
    ("cluster", "cluster", "{}"),
    ("status", "status", "{}"),
    ("ranks", "ranks", "{}"),
    ("model", "model", "{}"),
    ("micro_batch", "micro-batch", "{}"),
    ("global_batch", "global batch", "{}"),
    ("step_time_s", "step time s", "{:.4f}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
    ("tflops_per_rank", "TFLOP/s/rank", "{:.3f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("peak_mem_mib", "peak mem MiB", "{:.1f}"),
]


def attr(node, name):
    """Attribute `name` of a group, or None when the group or the attribute is missing."""
    if node is None or name not in node.attrs:
        return None
    return plain(node.attrs[name])


def measured_step_time(f, config):
    """Median over the measured steps of the slowest rank's step time, from /steps/time_s."""
    if "steps/time_s" not in f:
        return None
    times = np.asarray(finished_rows(f, "steps/time_s"), dtype=float)
    if times.ndim == 1:
        times = times[:, None]
    warmup = attr(config, "warmup") or 0
    measured = times[int(warmup):]
    if measured.size == 0:
        return None
    return float(np.median(measured.max(axis=1)))


def summarize_file(path):
    """The row of one result file, as a dict keyed by the CSV column names."""
    if not Path(path).is_file():
        raise ResultError("no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ResultError(f"cannot open as HDF5: {e}") from None
    with f:
        schema = attr(f, "schema")
        if schema != SCHEMA:
            raise ResultError(f"not a parabench result (schema = {schema!r})")
        version = attr(f, "schema_version")
        if version != SCHEMA_VERSION:
            raise ResultError(
                f"schema_version {version!r} is not supported (this tool reads {SCHEMA_VERSION})")

        config = f.get("config")
        system = f.get("system")
        summary = f.get("summary")
        row = {
            "file": str(path),
            "app": attr(config, "app"),
            "cluster": attr(system, "cluster"),
            "status": attr(f, "status"),
            "ranks": attr(config, "world_size"),
            "model": attr(config, "model"),
            "micro_batch": attr(config, "micro_batch"),
            "global_batch": attr(config, "global_batch"),
            "step_time_s": attr(summary, "step_time_s"),
            "tokens_per_s": attr(summary, "tokens_per_s"),
            "tflops_per_rank": attr(summary, "tflops_per_rank"),
            "mfu": attr(summary, "mfu"),
            "peak_mem_mib": None,
        }
        if row["ranks"] is None:
            row["ranks"] = attr(system, "ranks")

        if row["step_time_s"] is None:
            row["step_time_s"] = measured_step_time(f, config)
            seq = attr(config, "seq")
            if row["step_time_s"] and seq and row["global_batch"]:
                row["tokens_per_s"] = row["global_batch"] * seq / row["step_time_s"]

        peak = f.get("memory/measured/peak_total")
        if isinstance(peak, h5py.Dataset) and peak.size > 0:
            row["peak_mem_mib"] = float(np.max(peak[()])) / MIB
        return row


def result_files(args):
    """The files named on the command line, with directories expanded to their *.h5 files."""
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(path.rglob("*.h5"))
            if not found:
                yield path, ResultError("no *.h5 files in this directory")
            for p in found:
                yield p, None
        else:
            yield path, None


def missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value))


def print_table(rows, out):
    heads = [head for _, head, _ in COLUMNS]
    cells = [[
        "-" if missing(row[key]) else fmt.format(row[key]) for key, _, fmt in COLUMNS
    ] for row in rows]
    widths = [max(len(c) for c in column) for column in zip(heads, *cells)]
    numeric = [fmt != "{}" or key in ("ranks", "micro_batch", "global_batch")
               for key, _, fmt in COLUMNS]
    for line in [heads] + cells:
        out.write("  ".join(
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(line, widths, numeric)).rstrip() + "\n")


def print_csv(rows, out):
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([key for key, _, _ in COLUMNS])
    for row in rows:
        writer.writerow(["" if row[key] is None else row[key] for key, _, _ in COLUMNS])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="One row per parabench result file: configuration, throughput, memory.")
    parser.add_argument("paths", nargs="+", metavar="RESULT.h5|DIR")
    parser.add_argument("--csv", action="store_true", help="write CSV instead of a table")
    args = parser.parse_args(argv)

    rows, failed = [], False
    for path, error in result_files(args.paths):
        try:
            if error is not None:
                raise error
            rows.append(summarize_file(path))
        except ResultError as e:
            print(f"summarize: error: {path}: {e}", file=sys.stderr)
            failed = True
        except (OSError, KeyError, ValueError, TypeError) as e:
            print(f"summarize: error: {path}: cannot read: {e}", file=sys.stderr)
            failed = True

    if rows:
        (print_csv if args.csv else print_table)(rows, sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
