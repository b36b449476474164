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


def run(*args, check=True):
    if not MICRO.is_file():
        pytest.fail(f"{MICRO} does not exist: build it (cmake --build build --target parabench-micro) or set PB_BIN_DIR")
    result = subprocess.run([str(MICRO), *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"parabench-micro {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def test_names_carry_backend_dtype_shape_and_sizes():
    names = run("--benchmark_list_tests").stdout.split()
    # small: h 256, f 1024, V 4096, S 128 at micro-batch 4; gpt2-124m: h 768, f 3072, V 50257, S 1024.
    for expected in ["gemm/cpu/fp32/small.qkv/N512_C256_OC768", "gemm/cpu/bf16/small.fc1/N512_C256_OC1024",
                     "gemm/cpu/fp32/small.fc2/N512_C1024_OC256", "gemm/cpu/bf16/gpt2-124m.logits/N4096_C768_OC50257",
                     "gemm/cpu/fp32/gpt2-124m.attn_out/N4096_C768_OC768", "gemm/cpu/bf16/square/N2048_C2048_OC2048"]:
        assert expected + "/manual_time" in names
    cpu_names = [n for n in names if n.startswith("gemm/cpu/")]
    assert len(cpu_names) == 2 * (2 * 5 + 2)  # two dtypes × (two presets × five products + two squares)
    assert not any("N4096_C4096" in n for n in cpu_names)  # the large squares only on a GPU


def test_counter_label_and_context_in_json():
    out = run("--threads", "1", r"--benchmark_filter=^gemm/cpu/.*/small\.attn_out/", "--benchmark_format=json",
              *FAST).stdout
    report = json.loads(out)
    assert report["context"]["threads"] == "1"
    assert report["context"]["cuda"]
    runs = {b["name"].split("/")[2]: b for b in report["benchmarks"]}
    assert set(runs) == {"fp32", "bf16"}
    for bench in runs.values():
        assert not bench.get("error_occurred"), bench
        assert bench["GFLOP/s"] > 0
        # GFLOP/s is 2·N·C·OC per iteration over the (manual) time of an iteration.
        seconds = bench["real_time"] * {"ms": 1e-3, "us": 1e-6, "ns": 1e-9, "s": 1.0}[bench["time_unit"]]
        assert bench["GFLOP/s"] == pytest.approx(2e-9 * 512 * 256 * 256 / seconds, rel=1e-3)
    assert runs["fp32"]["label"] == "fp32"
    assert runs["bf16"]["label"].startswith("bf16 operands, fp32 accumulation")


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
    assert len(rows) == 1
    shape, fp32, bf16, ratio = rows[0]
    assert shape == "small.qkv/N512_C256_OC768"
    assert float(fp32) > 0 and float(bf16) > 0
    assert float(ratio) == pytest.approx(float(bf16) / float(fp32), rel=0.02, abs=0.01)  # rounded columns
    assert re.search(r"median of 5 repetitions", result.stdout)
