"""The HDF5 result file of parabench-dp (SPEC section 6), what rank 0 prints (section 5), --json-log,
--dry-run and --out as a directory (section 4), from a 2-rank run of the tiny model read with h5py."""

import json
import math
import re
import statistics
from datetime import datetime, timedelta, timezone

import h5py
import numpy as np
import pytest

RANKS = 2
STEPS, WARMUP = 6, 2
MICRO_BATCH, GLOBAL_BATCH = 2, 8  # grad_accum 2
BUCKET_MB = 0.01
PEAK_TFLOPS = 0.5
TAG = "app test: result file"
CLUSTER = "testcluster"
TINY = dict(layers=2, hidden=64, heads=4, seq=32, vocab=256, ffn=256)

CATEGORIES = ["parameters", "master_parameters", "gradients", "optimizer_states", "activations", "comm_buffers",
              "workspace", "peak_total"]
COMM_OPS = ["all_reduce", "reduce_scatter", "all_gather", "all_to_all", "send", "recv", "broadcast"]
UNITS = {"s", "bytes", "1", "flop/s"}
SUMMARY_ATTRS = ["measured_steps", "step_time_s", "step_time_s_min", "step_time_s_max", "tokens_per_s",
                 "model_flops_per_step", "model_flops_formula", "tflops_per_rank", "peak_tflops_per_rank", "mfu",
                 "final_loss"]
SYSTEM_ATTRS = ["cluster", "nodes", "ranks", "ranks_per_node", "cpu_model", "gpu_model", "gpu_memory_bytes",
                "gpus_per_node", "driver_version", "cuda_version", "nccl_version", "mpi_library", "blas_library",
                "hdf5_version", "compiler", "slurm_job_id", "slurm_partition"]
# Section 4: every option under its name with '_' for '-' (--help and --version are not settings).
COMMON_OPTIONS = ["model", "layers", "hidden", "heads", "seq", "vocab", "ffn", "micro_batch", "global_batch", "steps",
                  "warmup", "seed", "lr", "clip", "backend", "comm", "dtype", "recompute", "dp", "threads", "out",
                  "cluster", "tag", "peak_tflops", "trace", "json_log", "dry_run", "quiet"]
DP_CONFIG = COMMON_OPTIONS + ["app", "grad_accum", "world_size", "bucket_mb", "no_overlap"]
ISO_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z")


def text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def model_args():
    return ["--model", "tiny", "--micro-batch", MICRO_BATCH, "--global-batch", GLOBAL_BATCH, "--steps", STEPS,
            "--warmup", WARMUP, "--bucket-mb", BUCKET_MB]


@pytest.fixture(scope="module")
def run(run_app, tmp_path_factory):
    """One complete 2-rank run; the result file goes to a folder that does not exist yet."""
    base = tmp_path_factory.mktemp("result")
    path = base / "nested" / "deeper" / "dp_run.h5"
    log = base / "steps.jsonl"
    args = model_args() + ["--peak-tflops", PEAK_TFLOPS, "--cluster", CLUSTER, "--tag", TAG, "--json-log", log,
                           "--out", path]
    before = datetime.now(timezone.utc)
    rc, out, err = run_app("dp", RANKS, args, timeout=90, env={"NCCL_DEBUG": "INFO", "OMP_DISPLAY_ENV": "FALSE"})
    after = datetime.now(timezone.utc)
    assert rc == 0, run_app.describe(run_app.command("dp", RANKS, args), rc, out, err)
    return dict(path=path, log=log, args=args, stdout=out, stderr=err, before=before, after=after,
                argv=[str(run_app.command("dp", RANKS, args)[3])] + [str(a) for a in args])


@pytest.fixture(scope="module")
def h5(run):
    with h5py.File(run["path"], "r") as f:
        yield f


@pytest.fixture(scope="module")
def P(num_params):
    return num_params(TINY["layers"], TINY["hidden"], TINY["seq"], TINY["vocab"], TINY["ffn"])


def test_root_attributes(h5, run):
    a = h5.attrs
    assert text(a["schema"]) == "parabench"
    assert int(a["schema_version"]) == 1
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", text(a["software_version"])), a["software_version"]
    assert text(a["git_commit"]), "git_commit must not be empty"
    created = text(a["created"])
    assert ISO_UTC.fullmatch(created), created
    stamp = datetime.strptime(created[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    assert run["before"] - timedelta(seconds=2) <= stamp <= run["after"] + timedelta(seconds=2), created
    assert text(a["status"]) == "complete"
    assert "error" in a and text(a["error"]) == ""


def test_config(h5, run):
    c = h5["config"].attrs
    missing = [k for k in DP_CONFIG if k not in c]
    assert not missing, f"/config lacks {missing}"
    expected = dict(app="dp", model="tiny", micro_batch=MICRO_BATCH, global_batch=GLOBAL_BATCH, grad_accum=2,
                    steps=STEPS, warmup=WARMUP, seed=1234, backend="cpu", comm="mpi", dtype="fp32", recompute="none",
                    dp=RANKS, world_size=RANKS, out=str(run["path"]), cluster=CLUSTER, tag=TAG, trace="",
                    json_log=str(run["log"]), **TINY)
    for key, value in expected.items():
        got = text(c[key]) if isinstance(value, str) else int(c[key])
        assert got == value, f"/config {key} = {c[key]!r}, expected {value!r}"
    for key, value in dict(lr=3e-4, clip=1.0, peak_tflops=PEAK_TFLOPS, bucket_mb=BUCKET_MB).items():
        assert float(c[key]) == pytest.approx(value, rel=1e-12), key
    assert int(c["threads"]) >= 1
    for flag in ("dry_run", "quiet", "no_overlap"):
        assert int(c[flag]) == 0, flag
    argv = [text(s) for s in h5["config/argv"][()]]
    assert argv == run["argv"]


def test_system(h5):
    s = h5["system"].attrs
    missing = [k for k in SYSTEM_ATTRS if k not in s]
    assert not missing, f"/system lacks {missing}"
    assert text(s["cluster"]) == CLUSTER
    assert int(s["ranks"]) == RANKS and int(s["nodes"]) == 1 and int(s["ranks_per_node"]) == RANKS
    assert text(s["mpi_library"]) and text(s["hdf5_version"]) and text(s["compiler"])
    assert text(s["hdf5_version"]).count(".") == 2
    hostnames = [text(x) for x in h5["system/hostnames"][()]]
    assert len(hostnames) == RANKS and all(hostnames)
    env = [text(x) for x in h5["system/environment"][()]]
    assert "NCCL_DEBUG=INFO" in env and "OMP_DISPLAY_ENV=FALSE" in env, env
    for entry in env:
        key = entry.split("=", 1)[0]
        assert "=" in entry and (key.startswith(("SLURM_", "NCCL_", "OMP_", "OPENBLAS_"))
                                 or key == "CUDA_VISIBLE_DEVICES"), f"unexpected environment entry {entry!r}"


def test_steps(h5):
    loss, norm, times = h5["steps/loss"], h5["steps/grad_norm"], h5["steps/time_s"]
    assert loss.shape == (STEPS,) and norm.shape == (STEPS,) and times.shape == (STEPS, RANKS)
    for ds in (loss, norm, times):
        assert ds.dtype == np.float64
    assert np.all(np.isfinite(loss[()])) and np.all(norm[()] > 0) and np.all(times[()] > 0)
    assert abs(loss[0] - math.log(TINY["vocab"])) < 0.1


def test_summary(h5):
    s = h5["summary"].attrs
    missing = [k for k in SUMMARY_ATTRS if k not in s]
    assert not missing, f"/summary lacks {missing}"
    per_step = h5["steps/time_s"][()].max(axis=1)[WARMUP:]
    assert int(s["measured_steps"]) == STEPS - WARMUP
    step_time = statistics.median(per_step)
    assert float(s["step_time_s"]) == pytest.approx(step_time, rel=1e-12)
    assert float(s["step_time_s_min"]) == pytest.approx(per_step.min(), rel=1e-12)
    assert float(s["step_time_s_max"]) == pytest.approx(per_step.max(), rel=1e-12)
    G, S, L, h, V = GLOBAL_BATCH, TINY["seq"], TINY["layers"], TINY["hidden"], TINY["vocab"]
    assert float(s["tokens_per_s"]) == pytest.approx(G * S / step_time, rel=1e-9)
    flops = 72 * G * S * L * h * h * (1 + S / (6 * h) + V / (12 * h * L))
    assert float(s["model_flops_per_step"]) == pytest.approx(flops, rel=1e-12)
    assert text(s["model_flops_formula"])
    tflops = flops / step_time / RANKS / 1e12
    assert float(s["tflops_per_rank"]) == pytest.approx(tflops, rel=1e-9)
    assert float(s["peak_tflops_per_rank"]) == pytest.approx(PEAK_TFLOPS)
    assert float(s["mfu"]) == pytest.approx(tflops / PEAK_TFLOPS, rel=1e-9)
    assert float(s["final_loss"]) == h5["steps/loss"][-1]
    norm = float(s["final_param_norm"])  # project extension of the schema
    assert math.isfinite(norm) and norm > 0


def test_memory(h5, P):
    for kind in ("measured", "predicted"):
        for cat in CATEGORIES:
            ds = h5[f"memory/{kind}/{cat}"]
            assert ds.shape == (RANKS,) and ds.dtype == np.int64, f"{kind}/{cat}"
            assert np.all(ds[()] >= 0)
    m = {cat: h5[f"memory/measured/{cat}"][()] for cat in CATEGORIES}
    p = {cat: h5[f"memory/predicted/{cat}"][()] for cat in CATEGORIES}
    # fp32 dp: weights, gradients and AdamW m, v of the whole model on every rank
    assert np.all(p["parameters"] == 4 * P) and np.all(p["gradients"] == 4 * P)
    assert np.all(p["optimizer_states"] == 8 * P)
    for cat in CATEGORIES[:-1]:  # to the byte; none of master_parameters and comm_buffers in fp32 dp (buckets
        assert np.all(m[cat] == p[cat]), f"{cat}: measured {m[cat]} vs predicted {p[cat]}"  # view the gradients)
    # the sum of the peaks (docs/memory-model.md 8): an upper bound of the peak of the sum, at most 10 % above
    assert np.all(m["peak_total"] <= p["peak_total"]) and np.all(p["peak_total"] <= 1.10 * m["peak_total"]), \
        f"peak_total: measured {m['peak_total']} vs predicted {p['peak_total']}"
    # the peak of the sum at any instant, never more than the sum of the peaks
    parts = sum(m[cat] for cat in CATEGORIES if cat != "peak_total")
    assert np.all(m["peak_total"] <= parts) and np.all(m["peak_total"] >= m["parameters"] + m["optimizer_states"])
    device = h5["memory/device_peak_bytes"]
    assert device.shape == (RANKS,) and device.dtype == np.int64
    assert np.all(device[()] >= m["peak_total"]), (device[()], m["peak_total"])


def test_comm(h5, P):
    for op in COMM_OPS:
        for name in ("calls", "bytes", "time_s"):
            ds = h5[f"comm/{op}/{name}"]
            assert ds.shape == (RANKS,), f"{op}/{name}"
            assert np.all(ds[()] >= 0)
    calls = h5["comm/all_reduce/calls"][()]
    assert np.all(calls == STEPS * 4), calls  # 4 buckets of 0.01 MiB, one all-reduce each per step
    assert np.all(h5["comm/all_reduce/bytes"][()] == STEPS * P * 4)
    assert np.all(h5["comm/all_reduce/time_s"][()] > 0)
    for op in COMM_OPS[1:]:  # dp communicates with all-reduce only
        assert np.all(h5[f"comm/{op}/calls"][()] == 0) and np.all(h5[f"comm/{op}/bytes"][()] == 0), op


def test_every_dataset_has_units(h5):
    datasets = []
    h5.visititems(lambda name, obj: datasets.append(name) if isinstance(obj, h5py.Dataset) else None)
    assert len(datasets) >= 5 + 2 * len(CATEGORIES) + 1 + 3 * len(COMM_OPS)
    for name in datasets:
        assert "units" in h5[name].attrs, f"{name} has no units"
        assert text(h5[name].attrs["units"]) in UNITS, f"{name}: units {h5[name].attrs['units']!r}"
    expected = {"steps/time_s": "s", "steps/loss": "1", "memory/device_peak_bytes": "bytes",
                "memory/measured/peak_total": "bytes", "comm/all_reduce/bytes": "bytes",
                "comm/all_reduce/calls": "1", "comm/all_reduce/time_s": "s"}
    for name, unit in expected.items():
        assert text(h5[name].attrs["units"]) == unit, name


def test_result_line(run, h5, parse_result_line):
    r = parse_result_line(run["stdout"])
    s = h5["summary"].attrs
    assert r["app"] == "dp" and int(r["ranks"]) == RANKS and r["status"] == "complete"
    assert r["file"] == str(run["path"])
    assert float(r["step_time_s"]) == pytest.approx(float(s["step_time_s"]), rel=1e-5)
    assert float(r["tokens_per_s"]) == pytest.approx(float(s["tokens_per_s"]), rel=1e-5)
    assert float(r["tflops_per_rank"]) == pytest.approx(float(s["tflops_per_rank"]), rel=1e-5)
    mfu = float(s["mfu"])
    assert abs(float(r["mfu"]) - mfu) <= max(1e-5 * mfu, 5e-7), (r["mfu"], mfu)
    assert int(r["peak_mem_bytes"]) == h5["memory/measured/peak_total"][()].max()


def test_rank0_prints_once(run):
    out = run["stdout"]
    assert out.count("parabench-dp ") == 1, "the header must be printed once (by rank 0)"
    step_lines = [l for l in out.splitlines() if re.match(r"step\s+\d+/%d\b" % STEPS, l)]
    assert len(step_lines) == STEPS, out
    assert run["stderr"].strip() == "", run["stderr"]


def test_json_log(run, h5):
    lines = run["log"].read_text().splitlines()
    assert len(lines) == STEPS
    records = [json.loads(line) for line in lines]
    loss, norm = h5["steps/loss"][()], h5["steps/grad_norm"][()]
    for i, rec in enumerate(records):
        assert isinstance(rec, dict)
        assert rec["step"] == i + 1
        assert rec["loss"] == pytest.approx(loss[i], rel=1e-12)
        assert rec["grad_norm"] == pytest.approx(norm[i], rel=1e-12)
        assert rec["warmup"] == (i < WARMUP)


def test_dry_run(run_app, run, h5, tmp_path):
    """--dry-run validates, prints the layout and the predicted memory per rank, exits 0 and writes nothing."""
    out_dir = tmp_path / "out"
    log = tmp_path / "log.jsonl"
    args = model_args() + ["--dry-run", "--json-log", log, "--out", out_dir / "dry.h5"]
    rc, out, err = run_app("dp", RANKS, args, timeout=30, cwd=tmp_path)
    assert rc == 0, run_app.describe(run_app.command("dp", RANKS, args), rc, out, err)
    assert "PARABENCH_RESULT" not in out
    for cat in CATEGORIES:
        assert cat in out, f"dry run output lacks {cat}"
    # the predicted peak_total of each rank, in MiB as the table prints it, matches the file of the real run
    predicted = h5["memory/predicted/peak_total"][()]
    for rank in range(RANKS):
        row = [l for l in out.splitlines() if re.match(rf"\s*{rank}\s+\d", l)]
        assert len(row) == 1, out
        assert f"{predicted[rank] / 2**20:.2f}" in row[0].split(), (row[0], predicted[rank])
    assert list(tmp_path.iterdir()) == [], f"dry run wrote {list(tmp_path.iterdir())}"


def test_out_directory_makes_a_name(run_app, tmp_path, parse_result_line):
    """--out DIR: DIR/dp_<cluster>_<UTC time>_<job id>.h5, a fresh name for every run."""
    out_dir = tmp_path / "runs"  # does not exist yet
    args = ["--model", "tiny", "--steps", 3, "--warmup", 1, "--quiet", "--cluster", CLUSTER, "--out", out_dir]
    files = []
    for attempt in range(2):
        before = datetime.now(timezone.utc).replace(microsecond=0)
        rc, out, err = run_app("dp", RANKS, args, timeout=60, env={"SLURM_JOB_ID": "424242"})
        after = datetime.now(timezone.utc)
        assert rc == 0, run_app.describe(run_app.command("dp", RANKS, args), rc, out, err)
        r = parse_result_line(out)
        assert r["mfu"] == "nan"  # no --peak-tflops and no GPU
        new = sorted(set(out_dir.iterdir()) - set(files))
        assert len(new) == 1, new
        files += new
        assert r["file"] == str(new[0])
        m = re.fullmatch(r"dp_testcluster_(\d{8}T\d{6}Z)_424242(-\d+)?\.h5", new[0].name)
        assert m, new[0].name
        stamp = datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        assert before - timedelta(seconds=1) <= stamp <= after + timedelta(seconds=1), (stamp, before, after)
        with h5py.File(new[0], "r") as f:
            assert text(f.attrs["status"]) == "complete"
            assert text(f["system"].attrs["slurm_job_id"]) == "424242"
            assert math.isnan(float(f["summary"].attrs["mfu"]))
            assert "SLURM_JOB_ID=424242" in [text(x) for x in f["system/environment"][()]]
    assert len(files) == 2
