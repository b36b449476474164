"""Every app on the GPU (CUDA backend), against the single-rank loss curve (SPEC 2.4).

Several ranks share the one GPU through --comm mpi (device buffers staged through pinned host
memory); NCCL is checked with one rank, since it refuses two ranks on one GPU. The baseline is the
single-rank CUDA run in fp32; every layout's losses and final parameter norm must agree within 1e-5.
bf16 (bf16 tensor-core matrix products, fp32 accumulation) must train, and stay within 1e-2 of fp32.
"""

import numpy as np
import pytest

from conftest import assert_memory_matches_prediction

MODEL = ["--layers", "4", "--hidden", "128", "--heads", "4", "--seq", "64", "--vocab", "512",
         "--global-batch", "8", "--steps", "6", "--warmup", "1", "--backend", "cuda"]
FP32 = [*MODEL, "--dtype", "fp32"]
RTOL = 1e-5

# (app, ranks, extra arguments)
LAYOUTS = [
    ("dp", 1, ["--comm", "nccl", "--micro-batch", "4"]),
    ("dp", 2, ["--comm", "mpi", "--micro-batch", "2"]),
    ("dp", 4, ["--comm", "mpi", "--micro-batch", "1"]),
    ("dp", 4, ["--comm", "mpi", "--micro-batch", "1", "--no-overlap"]),
    ("dp", 2, ["--comm", "mpi", "--micro-batch", "2", "--recompute", "selective"]),
    ("dp", 2, ["--comm", "mpi", "--micro-batch", "2", "--recompute", "full"]),
    ("fsdp", 1, ["--comm", "nccl", "--micro-batch", "4", "--shard", "FULL_SHARD"]),
    ("fsdp", 2, ["--comm", "mpi", "--micro-batch", "2", "--shard", "FULL_SHARD"]),
    ("fsdp", 4, ["--comm", "mpi", "--micro-batch", "1", "--shard", "FULL_SHARD"]),
    ("fsdp", 4, ["--comm", "mpi", "--micro-batch", "1", "--shard", "SHARD_GRAD_OP"]),
    ("fsdp", 4, ["--comm", "mpi", "--micro-batch", "1", "--shard", "ZERO1"]),
    ("tp", 2, ["--comm", "mpi", "--micro-batch", "4", "--tp", "2", "--sequence-parallel"]),
    ("pp", 2, ["--comm", "mpi", "--micro-batch", "2", "--pp", "2", "--schedule", "1f1b"]),
]


@pytest.fixture(scope="module")
def baseline(cached_run):
    return cached_run("dp", 1, [*FP32, "--comm", "mpi", "--micro-batch", "8"], timeout=120)


def ident(layout):
    app, ranks, extra = layout
    return f"{app}-{ranks}-" + "-".join(a.lstrip("-") for a in extra)


@pytest.mark.parametrize("layout", LAYOUTS, ids=ident)
def test_matches_single_rank_loss_curve(cached_run, baseline, layout):
    app, ranks, extra = layout
    run = cached_run(app, ranks, [*FP32, *extra], timeout=180)
    assert run["status"] == "complete"
    np.testing.assert_allclose(run["loss"], baseline["loss"], rtol=RTOL, err_msg=run["command"])
    assert run["param_norm"] == pytest.approx(baseline["param_norm"], rel=RTOL), run["command"]
    assert run["loss"][-1] < run["loss"][0], "the loss falls"


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay[1] > 1], ids=ident)
def test_memory_matches_prediction(cached_run, layout):
    app, ranks, extra = layout
    assert_memory_matches_prediction(cached_run(app, ranks, [*FP32, *extra], timeout=180), ident(layout))


def test_same_layout_twice_is_bitwise_identical(cached_run, run_app, tmp_path):
    first = cached_run("dp", 2, [*FP32, "--comm", "mpi", "--micro-batch", "2"], timeout=180)
    again = cached_run("dp", 2, [*FP32, "--comm", "mpi", "--micro-batch", "2", "--tag", "again"], timeout=180)
    assert first["loss"].tobytes() == again["loss"].tobytes()


def test_bf16_trains_close_to_fp32(cached_run, baseline):
    run = cached_run("dp", 1, [*MODEL, "--dtype", "bf16", "--comm", "mpi", "--micro-batch", "8"], timeout=120)
    assert run["status"] == "complete"
    np.testing.assert_allclose(run["loss"], baseline["loss"], rtol=1e-2, err_msg=run["command"])
    assert run["loss"][-1] < run["loss"][0]
