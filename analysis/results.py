"""Reads parabench result files (docs/SPEC.md section 6, schema version 1) into flat records, one
per run, for analysis.report: what ran (app, strategy, model, ranks, batch), where (cluster, nodes),
how fast (the /summary), and its memory per category next to the prediction (max over ranks); for
parabench-ep also the routing statistics of /moe over the finished steps (read_moe), for parabench-cp
each rank's attention time of /cp over the finished steps after warm-up (read_cp). A parabench-micro
file (/config app "micro": no model, batch or steps) is a run too, with its tables of /micro
(read_micro) in place of the training numbers.

A file that is not a readable parabench result of schema version 1 raises ResultError with the
reason; a run that did not complete is still read (status, error, finished steps), without the
numbers it never wrote.
"""

import math
import multiprocessing
import os
import re
import traceback
from pathlib import Path

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")  # before h5py: read files a job still writes

import h5py  # noqa: E402
import numpy as np  # noqa: E402

SCHEMA = "parabench"
SCHEMA_VERSION = 1
CATEGORIES = ["parameters", "master_parameters", "gradients", "optimizer_states", "activations",
              "comm_buffers", "workspace"]
PEAK = "peak_total"
PRESETS = {  # SPEC section 4: (layers, hidden, heads, seq, vocab); ffn = 4 hidden
    "tiny": (2, 64, 4, 32, 256), "small": (4, 256, 8, 128, 4096), "gpt2-124m": (12, 768, 12, 1024, 50257),
    "gpt2-350m": (24, 1024, 16, 1024, 50257), "gpt2-1.5b": (48, 1600, 25, 1024, 50257),
    "block-4k": (4, 4096, 32, 2048, 32000),
}
# /config options that say how a run was made or where it wrote, not what it computed: runs that
# differ only in these are the same configuration (the cross-cluster comparison matches on the rest).
NOT_CONFIGURATION = {"cluster", "out", "tag", "trace", "json_log", "quiet", "dry_run", "dump_gradients",
                     "threads", "backend", "comm", "peak_tflops", "steps", "warmup", "seed", "model",
                     "matmul_precision"}  # the library and kernel of the products: the machine's, as backend
APP_ORDER = ["dp", "fsdp", "tp", "pp", "ep", "cp", "hybrid"]
SHARD_ORDER = ["NO_SHARD", "ZERO1", "SHARD_GRAD_OP", "FULL_SHARD", "HYBRID_SHARD"]


class ResultError(Exception):
    """A file that is not a readable parabench result of a supported schema version."""


def plain(value):
    """An HDF5 attribute as a Python str, int, float or bool (strings may come back as bytes)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def attrs(node):
    return {k: plain(v) for k, v in node.attrs.items()} if node is not None else {}


def result_files(paths):
    """The files named, with directories searched recursively for *.h5; raises ResultError for a
    path that does not exist or a directory without result files."""
    files = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            found = sorted(path.rglob("*.h5"))
            if not found:
                raise ResultError(f"{path}: no *.h5 files in this directory")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ResultError(f"{path}: no such file or directory")
    return list(dict.fromkeys(files))  # each once, in order


def model_label(config, seq=True):
    """The preset name when the shape is a preset's, else the shape (L, h, a, S, V, and f when not 4h).
    seq=False: the shape but the sequence length (the model of a sequence sweep, whose S varies), a
    preset's name when the rest is the preset's."""
    keys = ("layers", "hidden", "heads", "seq", "vocab") if seq else ("layers", "hidden", "heads", "vocab")
    shape = tuple(config.get(k) for k in keys)
    ffn = config.get("ffn")
    for name, preset in PRESETS.items():
        if shape == (preset if seq else preset[:3] + preset[4:]) and ffn in (None, 4 * preset[1]):
            return name
    label = ("L{} h{} a{} S{} V{}" if seq else "L{} h{} a{} V{}").format(*shape)
    return label if ffn in (None, 4 * (shape[1] or 0)) else f"{label} f{ffn}"


def strategy_label(config):
    """How the app split the work, in the words of its options: FULL_SHARD, tp4+sp, pp4 1f1b, ..."""
    app = config.get("app", "?")
    if app == "fsdp":
        label = config.get("shard", "fsdp")
        if label == "HYBRID_SHARD" and config.get("shard_group"):
            label += f" g{config['shard_group']}"
        if config.get("no_prefetch"):
            label += " no-prefetch"
    elif app == "tp":
        label = f"tp{config.get('tp', '?')}" + ("+sp" if config.get("sequence_parallel") else "")
    elif app == "pp":
        label = f"pp{config.get('pp', '?')} {config.get('schedule', '')}".rstrip()
        if config.get("schedule") == "interleaved":
            label += f" v{config.get('virtual_stages', '?')}"
    elif app == "dp":
        label = "dp" + (" no-overlap" if config.get("no_overlap") else "")
    elif app == "ep":  # ep4 E8 k2 cf1, ep2 E4 k1 dropless aux0.01
        label = f"ep{config.get('ep', '?')} E{config.get('experts', '?')} k{config.get('top_k', '?')}"
        number = lambda x: f"{x:g}" if isinstance(x, (int, float)) else str(x)  # 1.0 as 1, 0.01 as 0.01
        capacity = config.get("capacity_factor")
        if capacity is not None:
            label += " dropless" if capacity == 0 else f" cf{number(capacity)}"
        if config.get("aux_loss"):
            label += f" aux{number(config['aux_loss'])}"
    elif app == "cp":  # cp4 ring zigzag
        label = f"cp{config.get('cp', '?')} {config.get('cp_algo', '')} {config.get('cp_layout', '')}".rstrip()
    elif app == "hybrid":  # tp2+sp pp2 1f1b cp2 dp2 ZERO1: every degree above 1, dp and the sharding always
        parts = []
        tp = config.get("tp", 1)
        if tp != 1:
            parts.append(f"tp{tp}" + ("+sp" if config.get("sequence_parallel") else ""))
        if config.get("pp", 1) != 1:
            parts.append(f"pp{config['pp']} {config.get('schedule', '')}".rstrip() +
                         (f" v{config.get('virtual_stages')}" if config.get("schedule") == "interleaved" else ""))
        if config.get("cp", 1) != 1:
            parts.append(f"cp{config['cp']}")
        if config.get("moe"):
            parts.append(f"ep{config.get('ep', 1)} E{config.get('experts', '?')}")
        parts.append(f"dp{config.get('dp', '?')}")
        shard = config.get("shard", "NO_SHARD")
        parts.append(shard + (f" g{config['shard_group']}" if shard == "HYBRID_SHARD" and config.get("shard_group")
                              else ""))
        label = " ".join(parts)
    else:
        label = app
    if config.get("recompute", "none") != "none":
        label += f" recompute={config['recompute']}"
    return label


def strategy_order(app, strategy):
    """A sort key: apps in SPEC order, shard strategies from least to most sharded."""
    app_index = APP_ORDER.index(app) if app in APP_ORDER else len(APP_ORDER)
    first = strategy.split()[0]
    shard_index = SHARD_ORDER.index(first) if first in SHARD_ORDER else len(SHARD_ORDER)
    degree = int(re.search(r"\d+", first).group()) if re.search(r"\d+", first) else 0
    return (app_index, shard_index, degree, strategy)


def configuration_key(config):
    """What must be equal for two runs to be the same configuration, as a hashable tuple."""
    return tuple(sorted((k, v) for k, v in config.items() if k not in NOT_CONFIGURATION))


def max_over_ranks(group, category):
    if group is None or category not in group:
        return None
    data = np.asarray(group[category][()])
    return int(data.max()) if data.size else None


def load(path):
    """One run as a flat dict (see the module doc); raises ResultError.

    The file is read in a child process: a damaged file can crash the HDF5 library itself (a
    segmentation fault in its metadata code, not an exception), and that must cost the report the file,
    not the report."""
    path = Path(path)
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_load_into, args=(path, send), daemon=True)
    child.start()
    send.close()
    try:
        kind, value = receive.recv()
    except EOFError:  # the child died before it could answer
        child.join()
        raise ResultError(f"cannot read (the HDF5 library crashed reading it: exit code {child.exitcode}); "
                          f"a truncated or corrupt file") from None
    finally:
        receive.close()
    child.join()
    if kind == "run":
        return value
    if kind == "bad":
        raise ResultError(value)
    raise RuntimeError(f"reading {path} failed:\n{value}")  # a bug of this module: its traceback


def _load_into(path, send):
    """The child of load: the run, the ResultError's reason, or any other exception's traceback."""
    try:
        send.send(("run", _load(path)))
    except ResultError as e:
        send.send(("bad", str(e)))
    except Exception:  # noqa: BLE001: handed to the parent, which raises it
        send.send(("bug", traceback.format_exc()))
    finally:
        send.close()


def _load(path):
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ResultError(f"cannot open as HDF5 ({e}); not an HDF5 file, or a truncated or corrupt one") from None
    try:
        with f:
            return _read(f, path)
    except ResultError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ResultError(f"cannot read ({type(e).__name__}: {e}); a truncated or corrupt file") from None


def finished_rows(f, name):
    """The rows of a per-step dataset that hold finished steps. A file still running (or killed) before
    its first step has its per-step datasets allocated for every step and filled with NaN; the
    attribute /steps/finished says how many rows hold data (docs/SPEC.md section 6)."""
    if name not in f:
        return np.empty(0)
    data = f[name][()]
    finished = f["steps"].attrs.get("finished") if "steps" in f else None
    return data if finished is None else data[:int(finished)]


def read_moe(f):
    """parabench-ep's routing statistics over the finished steps (finished_rows), or None when the file
    has no /moe/tokens_per_expert (a run killed before its end writes none: /moe is written last).

    tokens [layers, experts]: kept assignments per expert summed over the steps; dropped [layers] or
    None; aux_loss [steps]; steps; layer_imbalance [layers]: max/mean of tokens per layer (NaN for a
    layer without tokens); imbalance: the worst layer's (the file's /moe/tokens_per_expert attribute
    `imbalance` for a complete run); dropped_fraction: dropped / (kept + dropped), NaN without
    /moe/dropped or assignments."""
    if "moe/tokens_per_expert" not in f:
        return None
    tokens = np.asarray(finished_rows(f, "moe/tokens_per_expert"))
    if tokens.ndim != 3 or not np.issubdtype(tokens.dtype, np.integer):
        raise ResultError(f"/moe/tokens_per_expert is {tokens.dtype} of shape {tokens.shape}, not integers "
                          f"[steps, layers, experts]")
    steps, layers, experts = tokens.shape
    total = tokens.sum(axis=0, dtype=np.int64)
    dropped = None
    if "moe/dropped" in f:
        rows = np.asarray(finished_rows(f, "moe/dropped"))
        if rows.ndim != 2 or rows.shape[1] != layers:
            raise ResultError(f"/moe/dropped has shape {rows.shape}, not [steps, {layers}]")
        dropped = rows.sum(axis=0, dtype=np.int64)
    aux = np.asarray(finished_rows(f, "moe/aux_loss"), dtype=float).reshape(-1)
    sums = total.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        layer_imbalance = np.where(sums > 0, total.max(axis=1, initial=0) * experts / np.maximum(sums, 1), np.nan)
    assigned = int(sums.sum()) + (int(dropped.sum()) if dropped is not None else 0)
    return {
        "steps": int(steps), "layers": int(layers), "experts": int(experts), "tokens": total, "dropped": dropped,
        "aux_loss": aux, "layer_imbalance": layer_imbalance,
        "imbalance": float(np.nanmax(layer_imbalance)) if np.isfinite(layer_imbalance).any() else math.nan,
        "dropped_fraction": (int(dropped.sum()) / assigned if dropped is not None and assigned else math.nan),
    }


def read_cp(f, ranks, warmup):
    """parabench-cp's attention time per rank, or None when the file has no /cp/attention_time_s (cp 1
    writes none; a run killed before its end has its finished rows).

    The steps used are the finished ones (finished_rows) after the first `warmup`, where more than
    `warmup` finished, else all of them (a run killed during warm-up). total [ranks]: each rank's
    seconds in the attention core summed over those steps; per_step [ranks]: total / steps; step_min,
    step_max [ranks]: its fastest and slowest step; ratio: the slowest rank's total over the fastest's
    (the app's /summary cp_attention_time_ratio for a complete run; NaN without steps or with a rank
    at 0 s); steps, skipped (warm-up steps left out)."""
    if "cp/attention_time_s" not in f:
        return None
    times = np.asarray(finished_rows(f, "cp/attention_time_s"))
    if times.ndim != 2 or not np.issubdtype(times.dtype, np.floating) or times.shape[1] != ranks:
        raise ResultError(f"/cp/attention_time_s is {times.dtype} of shape {times.shape}, not floats "
                          f"[steps, {ranks} ranks]")
    skipped = warmup if times.shape[0] > warmup else 0
    used = times[skipped:]
    total = used.sum(axis=0)
    steps = int(used.shape[0])
    fastest = float(total.min()) if steps else math.nan
    ratio = float(total.max()) / fastest if steps and np.isfinite(total).all() and fastest > 0 else math.nan
    return {
        "steps": steps, "skipped": int(skipped), "ranks": int(ranks), "total": total,
        "per_step": total / steps if steps else total,
        "step_min": used.min(axis=0) if steps else total, "step_max": used.max(axis=0) if steps else total,
        "ratio": ratio,
    }


def _read(f, path):
    root = attrs(f)
    if root.get("schema") != SCHEMA:
        raise ResultError(f"not a parabench result (schema = {root.get('schema')!r})")
    version = root.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultError(f"schema_version {version!r} is not supported: this report reads schema version "
                          f"{SCHEMA_VERSION} (docs/SPEC.md section 6); use the analysis/ of the parabench "
                          f"that wrote the file")
    if "config" not in f or "system" not in f:
        raise ResultError("no /config or /system group")
    config, system = attrs(f["config"]), attrs(f["system"])
    micro = config.get("app") == "micro"  # parabench-micro: no model, batch or steps
    for key in ("app", "world_size") + (() if micro else ("micro_batch", "global_batch")):
        if key not in config:
            raise ResultError(f"/config has no attribute {key!r}")
    status = root.get("status", "")
    loss = finished_rows(f, "steps/loss")
    tag = config.get("tag", "") or ""
    sweep = re.search(r"(?:^|\s)sweep=(\S+)", tag)
    run = {
        "file": str(path),
        "status": status,
        "error": root.get("error", ""),
        "created": root.get("created", ""),
        "cluster": system.get("cluster") or config.get("cluster") or "?",
        "app": config["app"],
        "strategy": strategy_label(config),
        "model": "" if micro else model_label(config),
        "ranks": int(config["world_size"]),
        "nodes": system.get("nodes"),
        "micro_batch": None if micro else int(config["micro_batch"]),
        "global_batch": None if micro else int(config["global_batch"]),
        "grad_accum": config.get("grad_accum"),
        "dtype": config.get("dtype", ""),
        "recompute": config.get("recompute", "none"),
        "backend": config.get("backend", ""),
        "tag": tag,
        "sweep": sweep.group(1) if sweep else "",
        "steps": config.get("steps"),
        "finished_steps": int(loss.shape[0]),
        "device": system.get("gpu_model") or system.get("cpu_model") or "",
        "slurm_job_id": system.get("slurm_job_id", ""),
        "key": configuration_key(config),
    }
    summary = attrs(f["summary"]) if "summary" in f else {}
    if status == "complete" and not micro:
        missing = [k for k in ("step_time_s", "tokens_per_s") if k not in summary]
        if missing:
            raise ResultError(f"status is complete but /summary lacks {', '.join(missing)}")
        if "memory/measured" not in f or "memory/predicted" not in f:
            raise ResultError("status is complete but /memory/measured or /memory/predicted is missing")
    for key in ("step_time_s", "step_time_s_min", "step_time_s_max", "tokens_per_s", "tflops_per_rank", "mfu",
                "final_loss", "moe_imbalance", "moe_dropped_fraction", "cp_attention_time_ratio",
                "energy_j_per_step", "joules_per_token", "tokens_per_joule"):
        value = summary.get(key)
        run[key] = float(value) if value is not None else math.nan
    # energy (SPEC 6 /energy: the sources with counters) and the profile's prices (/system; NaN: not stated)
    run["energy_sources"] = summary.get("energy_sources", "") or ""
    run["gpus"] = run["ranks"] if run["backend"] == "cuda" else 0
    for key in ("price_per_gpu_hour", "price_per_node_hour", "electricity_price_per_kwh"):
        value = system.get(key)
        run[key] = float(value) if isinstance(value, (int, float)) else math.nan
    run["currency"] = system.get("currency", "") or ""
    run["moe"] = read_moe(f) if config["app"] == "ep" else None
    # The layout sweep's points (jobs/lib/sweep.sh): the planner's rank and step time, from the tag.
    planned_rank = re.search(r"(?:^|\s)planned_rank=(\d+)(?:\s|$)", tag)
    planned_step = re.search(r"(?:^|\s)planned_step_s=(\S+)(?:\s|$)", tag)
    run["planned_rank"] = int(planned_rank.group(1)) if planned_rank else None
    try:
        run["planned_step_s"] = float(planned_step.group(1)) if planned_step else math.nan
    except ValueError:
        run["planned_step_s"] = math.nan
    # parabench-cp: the degree, its algorithm and layout, and the shape but the sequence length (the
    # model of a sequence sweep, where S grows with cp).
    run["seq"] = config.get("seq")
    run["model_without_seq"] = model_label(config, seq=False)
    run["cp"] = int(config.get("cp", 1)) if config["app"] == "cp" else None
    run["cp_algo"], run["cp_layout"] = config.get("cp_algo", ""), config.get("cp_layout", "")
    warmup = config.get("warmup", 0)
    run["cp_attention"] = (read_cp(f, run["ranks"], int(warmup) if isinstance(warmup, (int, float)) else 0)
                           if config["app"] == "cp" else None)
    measured, predicted = f.get("memory/measured"), f.get("memory/predicted")
    for category in CATEGORIES + [PEAK]:
        run[f"measured_{category}"] = max_over_ranks(measured, category)
        run[f"predicted_{category}"] = max_over_ranks(predicted, category)
    # parabench-micro's tables. A run that did not complete may have written them (one whose data check
    # failed is "failed"): the report flags their wrong results, and needs nothing else of them.
    run["micro"] = None
    if micro and status == "complete":
        run["micro"] = read_micro(f)
    elif micro and "micro" in f:
        try:
            run["micro"] = read_micro(f)
        except ResultError:
            pass  # listed as not complete with its status and error all the same
    if run["micro"] is not None:
        run["backend"] = ", ".join(sorted(set(run["micro"]["gemm"].get("backend", [])) |
                                          set(run["micro"]["kernels"].get("backend", []))))
    return run


# The columns of parabench-micro's tables that the report reads (the result-file schema of
# bench/micro/README.md); a complete file without one of them is not a readable result.
MICRO_COLUMNS = {
    "gemm": ("name", "backend", "dtype", "shape", "N", "C", "OC", "time_s", "flop", "flop_per_s", "peak_fraction",
             "label", "error"),
    "kernels": ("name", "backend", "dtype", "kernel", "shape", "dims", "time_s", "flop", "bytes", "flop_per_s",
                "bytes_per_s", "peak_fraction", "label", "error"),
    "collectives": ("bytes", "count", "in_place", "time_s", "algbw", "busbw", "errors"),
}


def micro_table(group, where, columns):
    """The 1-D datasets of `group` as {name: array} (strings decoded), all of one length; raises
    ResultError naming `where` for a missing column or one of another shape."""
    table, length = {}, None
    for name in columns:
        if name not in group or not isinstance(group[name], h5py.Dataset):
            raise ResultError(f"{where} has no column {name!r}")
    for name, node in group.items():
        if not isinstance(node, h5py.Dataset):
            continue
        if node.ndim != 1 or (length is not None and node.shape[0] != length):
            raise ResultError(f"{where}/{name} has shape {node.shape}, not [{length if length is not None else 'rows'}]"
                              f" like the table's other columns")
        length = node.shape[0]
        if h5py.check_string_dtype(node.dtype) is not None or node.dtype.kind == "S":
            table[name] = np.array([plain(v) for v in node[()]], dtype=object)
        else:
            table[name] = np.asarray(node[()])
    return table


def read_micro(f):
    """parabench-micro's tables: gemm and kernels as {column: array}, one row per benchmark (empty
    where the file has no such table); collectives as a list, one per /micro/collectives/<op>, of
    {"op", "comm", "ranks", "nodes", "dtype", "busbw_factor", "rows": {column: array}}."""
    if "micro" not in f:
        raise ResultError("status is complete but there is no /micro group (parabench-micro's tables)")
    tables = {}
    for name in ("gemm", "kernels"):
        where = f"/micro/{name}"
        tables[name] = micro_table(f[where], where, MICRO_COLUMNS[name]) if name in f["micro"] else {}
    tables["collectives"] = []
    if "collectives" in f["micro"]:
        for op, group in sorted(f["micro/collectives"].items()):
            where = f"/micro/collectives/{op}"
            if not isinstance(group, h5py.Group):
                raise ResultError(f"{where} is not a group")
            info = attrs(group)
            tables["collectives"].append({
                "op": op, "comm": info.get("comm", ""), "ranks": info.get("ranks"), "nodes": info.get("nodes"),
                "dtype": info.get("dtype", ""), "busbw_factor": info.get("busbw_factor"),
                "rows": micro_table(group, where, MICRO_COLUMNS["collectives"])})
    return tables
