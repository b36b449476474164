"""parabench-micro's kernel benchmarks (bench/micro/kernels.cpp): every kernel of a training step is
registered for the gpt presets and both CPU dtypes, the kernels of the Llama-style block (SPEC 2.5) for
the llama presets, and the small and llama-tiny presets' run on the CPU without errors, each with a time
and its counter (GFLOP/s for attention, GB/s for the rest) equal to the cost formula of
bench/micro/README.md over that time, and with its row in the result file's /micro/kernels.

Environment: PB_BIN_DIR, the folder of the built apps (default <repo>/build/bench).
"""

import json
import os
import subprocess
from pathlib import Path

import h5py
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench")))
MICRO = BIN_DIR / "micro" / "parabench-micro"
FAST = ["--benchmark_min_time=0.01"]  # Google Benchmark 1.7: seconds
MICRO_BATCH = 4

# SPEC section 4's presets: layers, hidden, heads, sequence, vocabulary (MLP width 4·hidden).
PRESETS = {"small": (4, 256, 8, 128, 4096), "gpt2-124m": (12, 768, 12, 1024, 50257)}
# SPEC 2.5's llama presets: hidden, heads, key/value heads, sequence, MLP width.
LLAMA_PRESETS = {"llama-tiny": (64, 4, 2, 32, 192), "llama3-1b": (2048, 32, 8, 2048, 8192)}
ELEMENT_BYTES = {"fp32": 4, "bf16": 2}


def padded(vocab):
    """The vocabulary as the model stores it (SPEC 2): a multiple of 128."""
    return -(-vocab // 128) * 128


def parameters(layers, h, seq, vocab):
    """SPEC 2's GPT as stored: per block two LayerNorms (2h each), qkv (3h² + 3h), attn.out (h² + h), fc1
    (4h² + 4h), fc2 (4h² + h); the token and position tables, the final LayerNorm and the untied head (h·V,
    no bias), the vocabulary padded."""
    vocab = padded(vocab)
    return layers * (12 * h * h + 13 * h) + vocab * h + seq * h + 2 * h + h * vocab


def kernels(preset, dtype):
    """{name: (kernel, flop, bytes)} of the kernel benchmarks of a preset and dtype, with the costs per call
    that bench/micro/README.md states."""
    layers, C, NH, T, V = PRESETS[preset]
    B, F, e = MICRO_BATCH, 4 * C, ELEMENT_BYTES[dtype]
    N, P = B * T, parameters(layers, C, T, V)
    btc = f"B{B}_T{T}_C{C}"
    costs = {
        ("attention_forward", f"{btc}_NH{NH}"): (4 * B * T * T * C, 0),
        ("attention_backward", f"{btc}_NH{NH}"): (8 * B * T * T * C, 0),
        ("layernorm_forward", f"N{N}_C{C}"): (0, (2 * N * C + 2 * C) * e + 8 * N),
        ("layernorm_backward", f"N{N}_C{C}"): (0, (4 * N * C + 5 * C) * e + 8 * N),
        ("residual_layernorm_forward", f"N{N}_C{C}"): (0, (4 * N * C + 2 * C) * e + 8 * N),
        ("gelu_forward", f"N{N}_C{F}"): (0, 2 * N * F * e),
        ("gelu_backward", f"N{N}_C{F}"): (0, 3 * N * F * e),
        ("add", f"N{N}_C{C}"): (0, 3 * N * C * e),
        ("embedding_forward", f"{btc}_V{V}"): (0, (2 * N * C + T * C) * e + 4 * N),
        ("embedding_backward", f"{btc}_V{V}"): (0, (3 * N * C + 2 * T * C) * e + 4 * N),
        ("cross_entropy_forward_backward", f"N{N}_V{padded(V)}"): (0, 2 * N * padded(V) * e + 4 * N),
        ("sum_squares", f"P{P}"): (0, P * e),
        ("zero", f"P{P}"): (0, P * e),
        ("accumulate", f"P{P}"): (0, 3 * P * e),
        ("adamw", f"P{P}"): (0, (24 + e) * P),
    }
    if dtype != "fp32":  # the master weights rounded into the parameters: mixed precision only
        costs[("convert", f"P{P}")] = (0, (4 + e) * P)
    return {f"kernel/cpu/{dtype}/{kernel}/{preset}/{dims}": (kernel, flop, nbytes)
            for (kernel, dims), (flop, nbytes) in costs.items()}


def llama_kernels(preset, dtype):
    """{name: (kernel, flop, bytes)} of a llama preset's kernels: those of its block that the gpt block has
    not, the grouped-query attention counted as multi-head attention (the full T×T products)."""
    C, NH, KV, T, F = LLAMA_PRESETS[preset]
    B, e, d = MICRO_BATCH, ELEMENT_BYTES[dtype], C // NH
    N = B * T
    btc = f"B{B}_T{T}_C{C}_NH{NH}_KV{KV}"
    rotated = (NH + KV) * d  # the Q and K columns of a token
    costs = {
        ("attention_forward", btc): (4 * B * T * T * C, 0),
        ("attention_backward", btc): (8 * B * T * T * C, 0),
        ("rmsnorm_forward", f"N{N}_C{C}"): (0, (2 * N * C + C) * e + 4 * N),
        ("rmsnorm_backward", f"N{N}_C{C}"): (0, (4 * N * C + 3 * C) * e + 4 * N),
        ("residual_rmsnorm_forward", f"N{N}_C{C}"): (0, (4 * N * C + C) * e + 4 * N),
        ("rope_forward", btc): (0, 2 * N * rotated * e + 4 * T),
        ("rope_backward", btc): (0, 2 * N * rotated * e + 4 * T),
        ("swiglu_forward", f"N{N}_C{F}"): (0, 3 * N * F * e),
        ("swiglu_backward", f"N{N}_C{F}"): (0, 5 * N * F * e),
    }
    return {f"kernel/cpu/{dtype}/{kernel}/{preset}/{dims}": (kernel, flop, nbytes)
            for (kernel, dims), (flop, nbytes) in costs.items()}


def kernels_of(preset, dtype):
    return llama_kernels(preset, dtype) if preset in LLAMA_PRESETS else kernels(preset, dtype)


def run(*args, cwd):
    if not MICRO.is_file():
        pytest.fail(f"{MICRO} does not exist: build it (cmake --build build --target parabench-micro) or set PB_BIN_DIR")
    result = subprocess.run([str(MICRO), *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    if result.returncode != 0:
        pytest.fail(f"parabench-micro {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def test_every_kernel_registered_for_both_presets_and_dtypes(tmp_path):
    listed = {name.removesuffix("/manual_time")
              for name in run("--benchmark_list_tests", "--benchmark_filter=^kernel/cpu/", cwd=tmp_path).stdout.split()}
    expected = {name for preset in [*PRESETS, *LLAMA_PRESETS] for dtype in ELEMENT_BYTES
                for name in kernels_of(preset, dtype)}
    assert listed == expected


@pytest.mark.parametrize("preset", ["small", "llama-tiny"])
def test_kernels_run_with_their_counters_and_rows(preset, tmp_path):
    out = tmp_path / "kernels.h5"
    report = json.loads(run("--threads", "1", f"--benchmark_filter=^kernel/cpu/.*/{preset}/", "--benchmark_format=json",
                            "--out", str(out), *FAST, cwd=tmp_path).stdout)
    expected = {**kernels_of(preset, "fp32"), **kernels_of(preset, "bf16")}
    runs = {bench["name"].removesuffix("/manual_time"): bench for bench in report["benchmarks"]}
    assert set(runs) == set(expected)
    for name, (kernel, flop, nbytes) in expected.items():
        bench = runs[name]
        assert not bench.get("error_occurred"), bench
        seconds = bench["real_time"] * {"ms": 1e-3, "us": 1e-6, "ns": 1e-9, "s": 1.0}[bench["time_unit"]]
        assert seconds > 0, bench
        # the counter is the cost per call over the (manual) time of a call
        counter, cost = ("GFLOP/s", flop) if flop > 0 else ("GB/s", nbytes)
        assert bench[counter] == pytest.approx(1e-9 * cost / seconds, rel=1e-3), name
        assert ("GB/s" if flop > 0 else "GFLOP/s") not in bench, name
        if kernel.startswith("attention"):
            assert bench["label"], name  # what the backend keeps for the backward

    with h5py.File(out, "r") as f:
        table = f["micro/kernels"]

        def text(column):
            return [v.decode() if isinstance(v, bytes) else v for v in table[column][()]]

        rows = {name.removesuffix("/manual_time"): i for i, name in enumerate(text("name"))}
        assert set(rows) == set(expected)
        kernel_col, shape_col, dims_col, error_col = text("kernel"), text("shape"), text("dims"), text("error")
        for name, (kernel, flop, nbytes) in expected.items():
            i = rows[name]
            assert (kernel_col[i], shape_col[i], dims_col[i]) == (kernel, preset, name.split("/")[-1])
            assert error_col[i] == ""
            assert table["flop"][i] == flop and table["bytes"][i] == nbytes, name
            assert table["time_s"][i] > 0, name
