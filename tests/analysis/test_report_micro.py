"""python3 -m analysis.report on parabench-micro files (bench/micro's result-file schema), written
here with h5py: two clusters, alpha (CPU, 1 and 2 nodes) and beta (GPU, one node, two files of which
one found wrong elements in a collective), a micro run killed before its end and one that failed its
data check; then the step-time plot from a planner CSV (--step-model). The expected numbers are
computed here from the values written, and compared with report.md (tables parsed back) and the
numbers behind each plot."""

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from test_report import csv_rows, md_tables, number  # noqa: E402  (as test_report_cp and _ep do)

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench")))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIB = 2 ** 20
SHAPES = [("small.qkv", 512, 256, 768), ("small.attn_out", 512, 256, 256), ("small.fc1", 512, 256, 1024),
          ("small.fc2", 512, 1024, 256), ("small.logits", 512, 256, 4096), ("square", 1024, 1024, 1024),
          ("square", 2048, 2048, 2048)]
# op: (busbw factor over n ranks, variants as in_place flags)
OPS = {"all_reduce": (lambda n: 2 * (n - 1) / n, [1]), "all_gather": (lambda n: (n - 1) / n, [0, 1]),
       "reduce_scatter": (lambda n: (n - 1) / n, [0]), "all_to_all": (lambda n: (n - 1) / n, [0]),
       "broadcast": (lambda n: 1.0, [1]), "send_recv_intra": (lambda n: 1.0, [0]),
       "send_recv_inter": (lambda n: 1.0, [0])}
STRING = h5py.string_dtype()


def write_column(group, name, values, units):
    if isinstance(values[0], str):
        group.create_dataset(name, data=np.array(values, dtype=object), dtype=STRING)
    else:
        group.create_dataset(name, data=np.asarray(values))
        group[name].attrs["units"] = units


def micro_file(path, cluster, *, nodes, ranks_per_node, backends, max_bytes, speed, status="complete", error="",
               wrong=None, tables=True):
    """A parabench-micro result file as bench/micro writes it. speed scales every rate (a cluster's
    own); wrong = (op, [sizes]) plants errors > 0 there. Returns what the file holds, for the checks."""
    ranks = nodes * ranks_per_node
    rng = np.random.default_rng(abs(hash((cluster, path.name))) % 2 ** 32)
    path.parent.mkdir(parents=True, exist_ok=True)
    held = {"gemm": {}, "busbw": {}}
    with h5py.File(path, "w") as f:
        f.attrs.update({"schema": "parabench", "schema_version": np.int64(1), "software_version": "test",
                        "git_commit": "0" * 40, "created": "2026-12-02T12:00:00Z", "status": status, "error": error})
        config = f.create_group("config")
        config.attrs.update({"app": "micro", "world_size": np.int64(ranks), "threads": np.int64(2), "comm":
                             "nccl" if "cuda" in backends else "mpi", "ops": ",".join(OPS), "min_bytes": np.int64(8),
                             "max_bytes": np.int64(max_bytes), "dtype": "fp32", "cluster": cluster, "out": str(path)})
        config.create_dataset("argv", data=np.array(["parabench-micro"], dtype=object), dtype=STRING)
        system = f.create_group("system")
        system.attrs.update({"cluster": cluster, "nodes": np.int64(nodes), "ranks": np.int64(ranks),
                             "ranks_per_node": np.int64(ranks_per_node), "cpu_model": f"{cluster} CPU",
                             "gpu_model": "H100" if "cuda" in backends else "", "slurm_job_id": ""})
        system.create_dataset("hostnames", data=np.array([f"n{r // ranks_per_node}" for r in range(ranks)],
                                                          dtype=object), dtype=STRING)
        if not tables:
            return held
        rows = {k: [] for k in ("name", "backend", "dtype", "shape", "N", "C", "OC", "time_s", "flop", "flop_per_s",
                                "peak_fraction", "label", "error")}
        for backend in backends:
            for dtype in ("fp32", "bf16"):
                for shape, n, c, oc in SHAPES:
                    flop = 2.0 * n * c * oc
                    rate = speed * (40 if backend == "cuda" else 1) * 1e11 * rng.uniform(0.5, 1.5)
                    for key, value in (("name", f"gemm/{backend}/{dtype}/{shape}/N{n}_C{c}_OC{oc}"),
                                       ("backend", backend), ("dtype", dtype), ("shape", shape), ("N", n), ("C", c),
                                       ("OC", oc), ("time_s", flop / rate), ("flop", flop), ("flop_per_s", rate),
                                       ("peak_fraction", rate / 1e15 if backend == "cuda" else math.nan),
                                       ("label", f"{backend} {dtype} product"), ("error", "")):
                        rows[key].append(value)
                    held["gemm"][(backend, dtype, shape, n)] = rate
        gemm = f.create_group("micro/gemm")
        for key, values in rows.items():
            write_column(gemm, key, values, {"time_s": "s", "flop": "flop", "flop_per_s": "flop/s"}.get(key, "1"))
        kernels = f.create_group("micro/kernels")
        for key, values in {"name": ["kernel/cpu/fp32/gelu_forward/small/B4_T128_C256"], "backend": ["cpu"],
                            "dtype": ["fp32"], "kernel": ["gelu_forward"], "shape": ["small"],
                            "dims": ["B4_T128_C256"], "time_s": [1e-4 / speed], "flop": [0.0], "bytes": [1e6],
                            "flop_per_s": [math.nan], "bytes_per_s": [1e10 * speed], "peak_fraction": [math.nan],
                            "label": [""], "error": [""]}.items():
            write_column(kernels, key, values, "1")
        sizes = [2 ** k for k in range(3, int(math.log2(max_bytes)) + 1)]
        for op, (factor, variants) in OPS.items():
            if op == "send_recv_inter" and nodes == 1:
                continue
            n = 2 if op.startswith("send_recv") else ranks
            group = f.create_group(f"micro/collectives/{op}")
            group.attrs.update({"comm": config.attrs["comm"], "ranks": np.int64(n), "nodes": np.int64(nodes),
                                "dtype": "fp32", "busbw_factor": factor(n)})
            columns = {k: [] for k in ("bytes", "count", "in_place", "time_s", "algbw", "busbw", "errors", "error")}
            for size in sizes:
                for in_place in variants:
                    # a latency of 20 us and a bandwidth that grows with the size up to speed x 10 GB/s
                    time_s = 2e-5 + size / (speed * 1e10 * rng.uniform(0.8, 1.2))
                    errors = 7 if wrong and wrong[0] == op and size in wrong[1] else 0
                    for key, value in (("bytes", size), ("count", size // 4), ("in_place", in_place),
                                       ("time_s", time_s), ("algbw", size / time_s),
                                       ("busbw", size / time_s * factor(n)), ("errors", errors), ("error", "")):
                        columns[key].append(value)
                    held["busbw"][(op, in_place, size)] = size / time_s * factor(n)
            for key, values in columns.items():
                write_column(group, key, values, {"bytes": "bytes", "time_s": "s", "algbw": "bytes/s",
                                                  "busbw": "bytes/s"}.get(key, "1"))
    return held


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    files, held = {}, {}
    specs = {
        "alpha_n1": ("alpha", dict(nodes=1, ranks_per_node=4, backends=["cpu"], max_bytes=256 * MIB, speed=1.0)),
        "alpha_n2": ("alpha", dict(nodes=2, ranks_per_node=4, backends=["cpu"], max_bytes=256 * MIB, speed=1.0)),
        "beta_n1": ("beta", dict(nodes=1, ranks_per_node=4, backends=["cpu", "cuda"], max_bytes=1024 * MIB,
                                 speed=20.0)),
        # beta, once more: its all_reduce found wrong elements at 1 KiB and 1 MiB (status complete all the same)
        "beta_wrong": ("beta", dict(nodes=1, ranks_per_node=4, backends=["cpu", "cuda"], max_bytes=1024 * MIB,
                                    speed=2.0, wrong=("all_reduce", [1024, MIB]))),
        # killed before its end: status running, no tables
        "alpha_killed": ("alpha", dict(nodes=1, ranks_per_node=4, backends=["cpu"], max_bytes=256 * MIB, speed=1.0,
                                       status="running", tables=False)),
        # the data check failed: status failed, its tables written
        "beta_failed": ("beta", dict(nodes=1, ranks_per_node=4, backends=["cpu", "cuda"], max_bytes=MIB, speed=20.0,
                                     status="failed", error="1 benchmark run(s) failed (see their error above)",
                                     wrong=("all_gather", [64]))),
    }
    for name, (cluster, spec) in specs.items():
        files[name] = root / cluster / f"{name}.h5"
        held[name] = micro_file(files[name], cluster, **spec)
    return {"files": files, "held": held, "root": root}


def report(*args):
    return subprocess.run([sys.executable, "-m", "analysis.report", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def three_digits(x):
    return float(f"{x:.3g}")


@pytest.fixture(scope="module")
def made(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    done = report(results["root"], "--out", out)
    assert done.returncode == 0, done.stderr
    md = (out / "report.md").read_text()
    return {"run": done, "out": out, "md": md, "tables": md_tables(md)}


def test_counts_and_sections(made):
    assert re.fullmatch(r"report: 4 complete and 2 other run\(s\) from 2 cluster\(s\); wrote .* and 2 plot\(s\) in .*\n",
                        made["run"].stdout)
    headings = re.findall(r"^## (.*)$", made["md"], flags=re.M)
    assert headings[-2:] == ["4. Runs not complete", "5. Micro-benchmarks (parabench-micro)"]
    header = {r["cluster"]: r for r in made["tables"]["parabench report"]}
    assert (header["alpha"]["complete runs"], header["alpha"]["not complete"], header["alpha"]["apps"]) == \
        ("2", "1", "micro")
    assert (header["beta"]["complete runs"], header["beta"]["backend"]) == ("2", "cpu, cuda")


def test_gemm_tables_show_each_files_rate(results, made):
    held = results["held"]
    rows = made["tables"]["alpha: GEMM"]
    assert len(rows) == len(SHAPES) * 2  # cpu fp32 and bf16
    assert [(r["dtype"], r["shape"]) for r in rows[:len(SHAPES) + 1]] == [("fp32", s) for s in (
        "small.qkv", "small.attn_out", "small.fc1", "small.fc2", "small.logits", "square 1024", "square 2048")] + \
        [("bf16", "small.qkv")]
    for row in rows:
        shape, n = row["shape"].split()[0], int(row["N"])
        # two files on alpha: the median of their two rates
        expected = np.median([held[f]["gemm"][("cpu", row["dtype"], shape, n)] for f in ("alpha_n1", "alpha_n2")])
        assert number(row["TFLOP/s"]) == pytest.approx(three_digits(expected / 1e12), rel=1e-9)
        assert row["files"] == "2" and row["% of peak"] == "–"
    beta = {(r["backend"], r["dtype"], r["shape"]): r for r in made["tables"]["beta: GEMM"]}
    row = beta[("cuda", "bf16", "small.fc1")]
    expected = np.median([held[f]["gemm"][("cuda", "bf16", "small.fc1", 512)] for f in ("beta_n1", "beta_wrong")])
    assert number(row["TFLOP/s"]) == pytest.approx(three_digits(expected / 1e12), rel=1e-9)
    assert number(row["% of peak"]) == pytest.approx(round(expected / 1e15 * 100, 1), abs=0.051)


def test_collective_tables_leave_out_wrong_results(results, made):
    held = results["held"]
    alpha = {(r["op"], r["variant"], r["nodes"]): r for r in made["tables"]["alpha: collectives"]}
    assert ("send_recv_inter", "out of place", "2") in alpha and ("send_recv_inter", "out of place", "1") not in alpha
    for (op, variant, nodes), row in alpha.items():
        in_place = int(variant == "in place")
        data = held["alpha_n1" if nodes == "1" else "alpha_n2"]["busbw"]
        assert number(row["busbw GB/s at 1 MiB"]) == pytest.approx(three_digits(data[(op, in_place, MIB)] / 1e9))
        assert row["largest size"] == "256 MiB"
        assert number(row["busbw GB/s at largest"]) == number(row["busbw GB/s at 256 MiB"])
        assert row["ranks"] == ("2" if op.startswith("send_recv") else str(4 * int(nodes)))
    # beta: the file with wrong results is left out, every op of it, not only all_reduce
    beta = {(r["op"], r["variant"]): r for r in made["tables"]["beta: collectives"]}
    for (op, variant), row in beta.items():
        key = (op, int(variant == "in place"))
        assert number(row["busbw GB/s at 256 MiB"]) == \
            pytest.approx(three_digits(held["beta_n1"]["busbw"][key + (256 * MIB,)] / 1e9))
        assert row["largest size"] == "1 GiB" and row["files"] == "1"


def test_wrong_results_are_flagged(made):
    rows = made["tables"]["Collectives with wrong results"]
    got = {(Path(r["file"]).stem, r["op"], r["variant"], r["sizes"], r["wrong elements"]) for r in rows}
    assert got == {("beta_wrong", "all_reduce", "in place", "1 KiB, 1 MiB", "14"),
                   ("beta_failed", "all_gather", "out of place", "64 B", "7"),
                   ("beta_failed", "all_gather", "in place", "64 B", "7")}
    assert "**Flagged**" in made["md"]


def test_runs_not_complete_are_listed(made):
    rows = made["tables"]["4. Runs not complete"]
    got = {(Path(r["file"]).stem, r["app"], r["status"], r["steps"]) for r in rows}
    assert got == {("alpha_killed", "micro", "running", "–"), ("beta_failed", "micro", "failed", "–")}
    assert next(r for r in rows if r["status"] == "failed")["error"] == \
        "1 benchmark run(s) failed (see their error above)"


def test_clusters_side_by_side(results, made):
    held = results["held"]
    rows = made["tables"]["Across clusters: GEMM"]
    cpu = next(r for r in rows if (r["backend"], r["dtype"], r["shape"]) == ("cpu", "fp32", "small.qkv"))
    alpha = np.median([held[f]["gemm"][("cpu", "fp32", "small.qkv", 512)] for f in ("alpha_n1", "alpha_n2")])
    beta = np.median([held[f]["gemm"][("cpu", "fp32", "small.qkv", 512)] for f in ("beta_n1", "beta_wrong")])
    assert number(cpu["beta / alpha"]) == pytest.approx(round(beta / alpha, 2), abs=0.0051)
    cuda = next(r for r in rows if r["backend"] == "cuda")
    assert cuda["alpha TFLOP/s"] == "–" and cuda["beta / alpha"] == "–"  # alpha has no GPU
    rows = made["tables"]["Across clusters: collectives"]
    one_node = [r for r in rows if r["op"] == "all_reduce" and r["nodes"] == "1"]
    # 1 MiB, 256 MiB: 256 MiB is also the largest size both measured
    assert [r["size"] for r in one_node] == ["1 MiB", "256 MiB"]
    row = one_node[1]
    assert (row["alpha ranks"], row["beta ranks"]) == ("4", "4")
    ratio = held["beta_n1"]["busbw"][("all_reduce", 1, 256 * MIB)] / held["alpha_n1"]["busbw"][("all_reduce", 1, 256 * MIB)]
    assert number(row["beta / alpha"]) == pytest.approx(round(ratio, 2), abs=0.0051)
    # two nodes: alpha alone
    assert {r["beta busbw GB/s"] for r in rows if r["nodes"] == "2"} == {"–"}


def test_plots_and_their_numbers(results, made):
    plots = made["out"] / "plots"
    linked = sorted(re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", made["md"]))
    assert linked == ["plots/micro_busbw.png", "plots/micro_gemm.png"]
    for name in ("micro_busbw", "micro_gemm"):
        data = (plots / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    rows = csv_rows(plots / "micro_busbw.csv")
    # the primary variant only (all_gather out of place), every op, no point of a flagged file
    assert {(r["op"], r["variant"]) for r in rows} == {
        ("all_reduce", "in_place"), ("all_gather", "out_of_place"), ("reduce_scatter", "out_of_place"),
        ("all_to_all", "out_of_place"), ("broadcast", "in_place"), ("send_recv_intra", "out_of_place"),
        ("send_recv_inter", "out_of_place")}
    beta = [r for r in rows if r["cluster"] == "beta" and r["op"] == "all_reduce"]
    assert sorted(int(r["size"]) for r in beta) == [2 ** k for k in range(3, 31)]
    for r in beta:
        assert float(r["busbw"]) == pytest.approx(results["held"]["beta_n1"]["busbw"][("all_reduce", 1, int(r["size"]))])
        assert r["files"] == "1"
    gemm = csv_rows(plots / "micro_gemm.csv")
    assert {(r["backend"], r["dtype"]) for r in gemm} == {("cpu", "fp32"), ("cpu", "bf16"), ("cuda", "fp32"),
                                                          ("cuda", "bf16")}
    cuda_alpha = [r for r in gemm if r["backend"] == "cuda" and r["cluster"] == "alpha"]
    assert cuda_alpha and all(r["tflop_per_s"] == "" for r in cuda_alpha)  # no bar: alpha has no GPU


def test_html_has_the_micro_tables(made):
    page = (made["out"] / "report.html").read_text()
    separators = [line for line in made["md"].splitlines() if line.startswith("|---")]
    assert page.count("<table>") == len(separators) > 0
    assert "<h2>5. Micro-benchmarks (parabench-micro)</h2>" in page


def test_a_complete_micro_file_without_its_tables_is_bad(results, tmp_path):
    broken = tmp_path / "broken.h5"
    micro_file(broken, "gamma", nodes=1, ranks_per_node=2, backends=["cpu"], max_bytes=MIB, speed=1.0)
    with h5py.File(broken, "r+") as f:
        del f["micro/gemm/flop_per_s"]
    done = report(broken, "--out", tmp_path / "out")
    assert done.returncode == 1
    assert f"{broken}: /micro/gemm has no column 'flop_per_s'" in done.stderr
    with h5py.File(broken, "r+") as f:
        f["micro/gemm"].create_dataset("flop_per_s", data=np.ones(3))
    done = report(broken, "--out", tmp_path / "out")
    assert done.returncode == 1 and "/micro/gemm/flop_per_s has shape (3,), not [" in done.stderr


def test_summarize_lists_a_micro_file(results):
    done = subprocess.run([sys.executable, str(REPO / "analysis" / "summarize.py"), "--csv",
                           results["files"]["alpha_n1"]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (row,) = list(csv.DictReader(done.stdout.splitlines()))
    assert (row["app"], row["cluster"], row["status"], row["ranks"]) == ("micro", "alpha", "complete", "4")


def test_micro_files_beside_app_runs(results, tmp_path):
    """A parabench-dp run, complete and killed, beside the micro files: its tables as without them."""
    app = BIN_DIR / "dp" / "parabench-dp"
    runs = tmp_path / "runs"
    dp = runs / "alpha" / "dp.h5"
    cmd = ["mpiexec", "-n", "1", str(app), "--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16",
           "--vocab", "64", "--steps", "3", "--warmup", "1", "--quiet", "--cluster", "alpha", "--out", str(dp)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PARABENCH_"))}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    killed = runs / "alpha" / "killed.h5"
    killed.write_bytes(dp.read_bytes())
    with h5py.File(killed, "r+") as f:
        f.attrs["status"] = "running"
        del f["summary"]
    done = report(runs, results["files"]["alpha_n1"], results["files"]["alpha_killed"], "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    tables = md_tables((tmp_path / "out" / "report.md").read_text())
    (row,) = tables["alpha: dp"]
    assert (row["micro-batch"], row["global batch"], row["ranks"]) == ("1", "1", "1")
    steps = {Path(r["file"]).stem: r["steps"] for r in tables["4. Runs not complete"]}
    assert steps == {"killed": "3 of 3", "alpha_killed": "–"}
    assert "alpha: micro" not in tables and "alpha: GEMM" in tables


STEP_MODEL = [  # app, config, predicted, measured, compute, exposed comm, bubble
    ("dp", "small 2 ranks", 0.30, 0.33, 0.25, 0.05, 0.0),
    ("fsdp", "small FULL_SHARD 2 ranks", 0.40, 0.36, 0.30, 0.10, 0.0),
    ("tp", "small tp2", 0.20, 0.31, 0.12, 0.08, 0.0),
    ("pp", "small pp2 1f1b", 0.50, 0.45, 0.30, 0.05, 0.15),
]


def step_model_csv(path, rows=STEP_MODEL):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["app", "config", "predicted_step_s", "measured_step_s", "ratio", "compute_s", "exposed_comm_s",
                    "bubble_s"])
        for app, config, predicted, measured, compute, comm, bubble in rows:
            w.writerow([app, config, predicted, measured, predicted / measured, compute, comm, bubble])


def test_step_model_plot_and_table(tmp_path):
    table = tmp_path / "plan.csv"
    step_model_csv(table)
    done = report("--step-model", table, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    rows = md_tables(md)["1. Step time: the planner against measurement"]
    assert [r["app"] for r in rows] == [r[0] for r in STEP_MODEL]
    for row, (_, _, predicted, measured, *_) in zip(rows, STEP_MODEL):
        ratio = predicted / measured
        assert number(row["ratio"]) == pytest.approx(round(ratio, 2))
        assert row["within 0.75–1.33"] == ("yes" if 0.75 <= ratio <= 1.33 else "no")
    inside = sum(0.75 <= p / m <= 1.33 for _, _, p, m, *_ in STEP_MODEL)
    assert f"{inside} of {len(STEP_MODEL)} configuration(s) within the band." in md
    png = (tmp_path / "out" / "plots" / "step_model.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    assert len(csv_rows(tmp_path / "out" / "plots" / "step_model.csv")) == len(STEP_MODEL)


def test_step_model_beside_results_comes_last(results, tmp_path):
    table = tmp_path / "plan.csv"
    step_model_csv(table)
    done = report(results["files"]["alpha_n1"], "--step-model", table, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    headings = re.findall(r"^## (.*)$", (tmp_path / "out" / "report.md").read_text(), flags=re.M)
    assert headings[-3:] == ["4. Runs not complete", "5. Micro-benchmarks (parabench-micro)",
                             "6. Step time: the planner against measurement"]


@pytest.mark.parametrize("content, message", [
    ("app,config,predicted_step_s\ndp,x,1\n", "no column measured_step_s, ratio, compute_s, exposed_comm_s, bubble_s"),
    ("app,config,predicted_step_s,measured_step_s,ratio,compute_s,exposed_comm_s,bubble_s\n",  "no rows"),
    ("app,config,predicted_step_s,measured_step_s,ratio,compute_s,exposed_comm_s,bubble_s\ndp,x,fast,1,1,1,0,0\n",
     "line 2: predicted_step_s 'fast' is not a number"),
])
def test_a_bad_step_model_csv_is_an_error(tmp_path, content, message):
    table = tmp_path / "plan.csv"
    table.write_text(content)
    done = report("--step-model", table, "--out", tmp_path / "out")
    assert done.returncode == 1
    assert f"report: error: --step-model {table}: {message}" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
    done = report("--out", tmp_path / "out")
    assert done.returncode == 2 and "give RESULTS" in done.stderr
