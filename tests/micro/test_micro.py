"""parabench-micro (bench/micro): the names of its benchmarks, its counters and label, its --threads
option, and bench/micro/gemm_fp32_vs_bf16.sh, on the smallest shapes so that the test stays short.

Environment: PB_BIN_DIR, the folder of the built apps (default <repo>/build/bench).
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench")))
MICRO = BIN_DIR / "micro" / "parabench-micro"
SCRIPT = REPO / "bench" / "micro" / "gemm_fp32_vs_bf16.sh"
FAST = ["--benchmark_min_time=0.01"]  # Google Benchmark 1.7: seconds


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every run in a folder of its own: the result file goes to its default, results/ there."""
    monkeypatch.chdir(tmp_path)


def run(*args, check=True, ranks=None):
    if not MICRO.is_file():
        pytest.fail(f"{MICRO} does not exist: build it (cmake --build build --target parabench-micro) or set PB_BIN_DIR")
    launch = ["mpiexec", "-n", str(ranks)] if ranks else []
    result = subprocess.run([*launch, str(MICRO), *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"parabench-micro {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def test_names_carry_backend_dtype_shape_and_sizes():
    names = run("--benchmark_list_tests").stdout.split()
    # small: h 256, f 1024, V 4096, S 128 at micro-batch 4; gpt2-124m: h 768, f 3072, V 50257 (stored
    # padded to 50304, SPEC 2), S 1024.
    for expected in ["gemm/cpu/fp32/small.qkv/N512_C256_OC768", "gemm/cpu/bf16/small.fc1/N512_C256_OC1024",
                     "gemm/cpu/fp32/small.fc2/N512_C1024_OC256", "gemm/cpu/bf16/gpt2-124m.logits/N4096_C768_OC50304",
                     "gemm/cpu/fp32/gpt2-124m.attn_out/N4096_C768_OC768", "gemm/cpu/bf16/square/N2048_C2048_OC2048"]:
        assert expected + "/manual_time" in names
    cpu_names = [n for n in names if n.startswith("gemm/cpu/")]
    # two dtypes × (two presets × five products, cached and cold, + three squares, cached)
    assert len(cpu_names) == 2 * (2 * 5 * 2 + 3)
    assert "gemm/cpu/fp32/small.qkv/N512_C256_OC768/cold/manual_time" in names
    assert not any("square" in n and "/cold" in n for n in cpu_names)
    assert not any("N8192_C8192" in n for n in cpu_names)  # the largest square only on a GPU


def test_counter_label_and_context_in_json():
    out = run("--threads", "1", r"--benchmark_filter=^gemm/cpu/.*/small\.attn_out/", "--benchmark_format=json",
              *FAST).stdout
    report = json.loads(out)
    assert report["context"]["threads"] == "1"
    assert report["context"]["cuda"]
    runs = {b["name"].split("/")[2] + ("/cold" if "/cold/" in b["name"] else ""): b for b in report["benchmarks"]}
    assert set(runs) == {"fp32", "bf16", "fp32/cold", "bf16/cold"}
    for bench in runs.values():
        assert not bench.get("error_occurred"), bench
        assert bench["GFLOP/s"] > 0
        # GFLOP/s is 2·N·C·OC per iteration over the (manual) time of an iteration.
        seconds = bench["real_time"] * {"ms": 1e-3, "us": 1e-6, "ns": 1e-9, "s": 1.0}[bench["time_unit"]]
        assert bench["GFLOP/s"] == pytest.approx(2e-9 * 512 * 256 * 256 / seconds, rel=1e-3)
    assert runs["fp32"]["label"].startswith("fp32: ")  # and the sgemm library that ran: oneDNN's or OpenBLAS's
    assert runs["bf16"]["label"].startswith("bf16 operands, fp32 accumulation")
    for dtype in ("fp32", "bf16"):
        assert runs[dtype + "/cold"]["label"] == runs[dtype]["label"]


@pytest.mark.parametrize("args", [["--threads", "0"], ["--threads=two"], ["--threads"]])
def test_bad_threads_is_a_configuration_error(args):
    result = run(*args, "--benchmark_list_tests", check=False)
    assert result.returncode == 2
    assert "--threads" in result.stderr


def test_unknown_flag_is_a_configuration_error():
    assert run("--no-such-flag", check=False).returncode == 2


def test_fp32_vs_bf16_table():
    env = dict(os.environ, PB_BUILD_DIR=str(BIN_DIR.parent))
    result = subprocess.run([str(SCRIPT), "--threads", "1", r"--benchmark_filter=^gemm/cpu/.*/small\.qkv/", *FAST],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("small.")]
    assert [row[0] for row in rows] == ["small.qkv/N512_C256_OC768", "small.qkv/N512_C256_OC768/cold"]
    for shape, fp32, bf16, ratio in rows:
        assert float(fp32) > 0 and float(bf16) > 0
        assert float(ratio) == pytest.approx(float(bf16) / float(fp32), rel=0.02, abs=0.01)  # rounded columns
    assert re.search(r"median of 5 repetitions", result.stdout)


def read_table(group):
    """{column: list} of a /micro table; strings decoded."""
    return {k: [v.decode() if isinstance(v, bytes) else v for v in group[k][()]] for k in group}


def test_result_file_holds_the_gemm_table_google_benchmark_reported(tmp_path):
    h5py = pytest.importorskip("h5py")
    out = tmp_path / "micro.h5"
    report = json.loads(run("--threads", "1", r"--benchmark_filter=^gemm/cpu/fp32/small\.(qkv|fc2)/",
                            "--benchmark_format=json", "--ops", "none", "--out", str(out), "--tag", "sweep=micro",
                            *FAST).stdout)
    with h5py.File(out, "r") as f:
        assert f["config"].attrs["tag"] == "sweep=micro"
        assert f.attrs["status"] == "complete" and f.attrs["schema"] == "parabench"
        assert f["config"].attrs["app"] == "micro" and f["config"].attrs["threads"] == 1
        assert "steps" not in f  # a file of tables: no per-step datasets
        assert f["system"].attrs["ranks"] == 1
        gemm = f["micro/gemm"]
        for column, units in [("time_s", "s"), ("flop", "flop"), ("flop_per_s", "flop/s"), ("N", "1")]:
            assert gemm[column].attrs["units"] == units
        table = read_table(gemm)
    by_name = {b["name"].removesuffix("/manual_time"): b for b in report["benchmarks"]}
    assert sorted(table["name"]) == sorted(by_name)
    for i, name in enumerate(table["name"]):
        bench = by_name[name]
        seconds = bench["real_time"] * {"ms": 1e-3, "us": 1e-6, "ns": 1e-9, "s": 1.0}[bench["time_unit"]]
        assert table["time_s"][i] == pytest.approx(seconds, rel=1e-6)
        n, c, oc = table["N"][i], table["C"][i], table["OC"][i]
        cold = name.endswith("/cold")
        assert table["operands"][i] == ("cold" if cold else "cached")
        assert name.removesuffix("/cold").endswith(f"/N{n}_C{c}_OC{oc}") and table["shape"][i] in name
        assert table["flop"][i] == 2 * n * c * oc
        assert table["flop_per_s"][i] == pytest.approx(table["flop"][i] / table["time_s"][i], rel=1e-9)
        assert table["backend"][i] == "cpu" and table["dtype"][i] == "fp32" and table["error"][i] == ""
        assert table["peak_fraction"][i] != table["peak_fraction"][i]  # NaN: a CPU's peak is not known


def test_repetitions_store_the_median():
    h5py = pytest.importorskip("h5py")
    report = json.loads(run("--threads", "1", r"--benchmark_filter=^gemm/cpu/fp32/small\.attn_out/[^/]*/manual_time",
                            "--benchmark_repetitions=3", "--benchmark_format=json", "--ops", "none",
                            "--out", "m.h5", *FAST).stdout)
    times = sorted(b["real_time"] for b in report["benchmarks"] if b["run_type"] == "iteration")
    assert len(times) == 3
    unit = {"ms": 1e-3, "us": 1e-6, "ns": 1e-9, "s": 1.0}[report["benchmarks"][0]["time_unit"]]
    with h5py.File("m.h5", "r") as f:
        assert f["micro/gemm/time_s"][0] == pytest.approx(times[1] * unit, rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--ops", "all_reduce,no_such_op"], "--ops: unknown collective 'no_such_op'"),
    (["--min-bytes", "1M", "--max-bytes", "1K"], "--max-bytes 1K is below --min-bytes 1M"),
    (["--max-bytes", "0"], "--max-bytes 0 must be a size"),
    (["--min-bytes", "8Q"], "--min-bytes 8Q must be a size"),
    (["--comm", "carrier-pigeon"], "--comm"),
    (["--benchmark_filter=^no_such_benchmark$"], "no benchmark matches --benchmark_filter=^no_such_benchmark$"),
])
def test_bad_input_exits_2_with_a_message_and_leaves_no_file(args, message, tmp_path):
    result = run(*args, "--out", str(tmp_path / "bad.h5"), check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "bad.h5").exists()


def test_listing_runs_nothing_and_writes_no_file(tmp_path):
    result = run("--benchmark_list_tests", "--out", str(tmp_path / "list.h5"))
    assert "gemm/cpu/fp32/small.qkv/N512_C256_OC768/manual_time" in result.stdout.split()
    assert not (tmp_path / "list.h5").exists()


def test_an_existing_file_is_not_replaced(tmp_path):
    out = tmp_path / "taken.h5"
    out.write_bytes(b"someone else's")
    result = run("--benchmark_filter=^gemm/cpu/fp32/small.qkv/", "--ops", "none", "--out", str(out), *FAST, check=False)
    assert result.returncode == 2 and "exists" in result.stderr
    assert out.read_bytes() == b"someone else's"


@pytest.mark.parametrize("flag, env", [("--benchmark_enable_random_interleaving=true", {}),
                                       ("--benchmark_enable_random_interleaving=yes", {}),
                                       ("--benchmark_enable_random_interleaving", {}),
                                       ("--benchmark_min_time=0.01", {"BENCHMARK_ENABLE_RANDOM_INTERLEAVING": "1"})])
def test_random_interleaving_is_refused_on_several_ranks(tmp_path, monkeypatch, flag, env):
    # Each rank would shuffle the benchmarks with its own seed, and the collectives would not meet.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = run(flag, "--out", str(tmp_path / "r.h5"), ranks=2, check=False)
    assert result.returncode == 2
    assert "needs one rank" in result.stderr
    assert not (tmp_path / "r.h5").exists()
