"""Mixed precision, --dtype bf16 (docs/SPEC.md 2.3): parameters and activations stored in bf16, fp32
master weights and AdamW moments, gradients in --grad-dtype (fp32 by default, or bf16); LayerNorm and
softmax statistics, the loss and the optimizer in fp32; collectives in the dtype of what they move.

* Every app and layout (dp, fsdp with each sharding strategy, tp with and without sequence parallelism,
  pp 1F1B, cp ring and alltoall, ep) trained in bf16 agrees with the single-rank bf16 run of the same
  model within SAME_PRECISION_RTOL per step (loss and grad_norm) and in the final parameter norm.
* Each layout's bf16 losses stay within 2e-2 relative of its fp32 losses over 10 steps, and differ from
  them (by more than 1e-6: the rounding happened).
* /config records the precision recipe; /memory/measured equals /memory/predicted per category and rank
  (peak_total: at most the prediction), and the model state is exactly 18 bytes per parameter at
  NO_SHARD with fp32 gradients (bf16 parameters 2, fp32 gradients 4, fp32 master weights 4, AdamW 8),
  16 with bf16 gradients, and FULL_SHARD's shards the same per padded shard element.
"""

import numpy as np
import pytest

from conftest import padded_vocab, gpt_num_parameters

STEPS = 10
MICRO = 1
GLOBAL_BATCH = 4
SAME_PRECISION_RTOL = 1e-3
BF16_VS_FP32_RTOL = 2e-2
SHAPE = dict(layers=2, hidden=32, heads=4, seq=16, vocab=64, ffn=64)
SHAPE_ARGS = [a for k, v in SHAPE.items() for a in (f"--{k}", v)]
MOE = ["--experts", 4, "--top-k", 2, "--capacity-factor", 0]
PARAMS = gpt_num_parameters(SHAPE["layers"], SHAPE["hidden"], SHAPE["seq"], SHAPE["vocab"], SHAPE["ffn"])

# (id, app, ranks, app options); the reference is the app's single-rank run of the same model
LAYOUTS = [
    ("dp2", "dp", 2, []),
    ("dp4", "dp", 4, []),
    *[(f"fsdp4-{s}", "fsdp", 4, ["--shard", s]) for s in ("NO_SHARD", "ZERO1", "SHARD_GRAD_OP", "FULL_SHARD")],
    ("fsdp4-HYBRID_SHARD", "fsdp", 4, ["--shard", "HYBRID_SHARD", "--shard-group", 2]),
    ("tp2-sp", "tp", 2, ["--tp", 2, "--sequence-parallel"]),
    ("tp2xdp2", "tp", 4, ["--tp", 2]),
    ("pp2-1f1b", "pp", 2, ["--pp", 2, "--schedule", "1f1b"]),
    ("cp2-ring", "cp", 2, ["--cp", 2, "--cp-algo", "ring"]),
    ("cp2-alltoall", "cp", 2, ["--cp", 2, "--cp-algo", "alltoall"]),
    ("ep2", "ep", 2, [*MOE, "--ep", 2]),
]
# bf16 gradients: accumulated, reduced and clipped in bf16
BF16_GRAD_LAYOUTS = [("dp2", "dp", 2, []), ("fsdp4-FULL_SHARD", "fsdp", 4, ["--shard", "FULL_SHARD"]),
                     ("tp2-sp", "tp", 2, ["--tp", 2, "--sequence-parallel"])]


def run_args(dtype, extra=(), grad_dtype="fp32"):
    args = [*SHAPE_ARGS, "--micro-batch", MICRO, "--global-batch", GLOBAL_BATCH, "--steps", STEPS, "--dtype", dtype,
            "--threads", 1, *extra]
    return args + (["--grad-dtype", grad_dtype] if grad_dtype != "fp32" else [])


def reference(cached_run, app, dtype, grad_dtype="fp32"):
    """The single-rank run of the layout's model: parabench-dp, or parabench-ep for the MoE model."""
    if app == "ep":
        return cached_run("ep", 1, run_args(dtype, [*MOE, "--ep", 1], grad_dtype))
    return cached_run("dp", 1, run_args(dtype, grad_dtype=grad_dtype))


def rel(a, b):
    return np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b)) / np.abs(np.asarray(b, dtype=np.float64))


def assert_matches(got, ref, name):
    for key in ("loss", "grad_norm"):
        r = rel(got[key], ref[key])
        assert r.max() <= SAME_PRECISION_RTOL, f"{name} {key} off by {r.max():.3g}\n{got[key]}\n{ref[key]}\n{got['command']}"
    assert rel(got["param_norm"], ref["param_norm"]) <= SAME_PRECISION_RTOL, name


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_bf16_layout_matches_single_rank_bf16(layout, cached_run):
    name, app, ranks, extra = layout
    assert_matches(cached_run(app, ranks, run_args("bf16", extra)), reference(cached_run, app, "bf16"), name)


@pytest.mark.parametrize("layout", BF16_GRAD_LAYOUTS, ids=[lay[0] for lay in BF16_GRAD_LAYOUTS])
def test_bf16_gradients_layout_matches_single_rank(layout, cached_run):
    name, app, ranks, extra = layout
    got = cached_run(app, ranks, run_args("bf16", extra, "bf16"))
    assert_matches(got, reference(cached_run, app, "bf16", "bf16"), name)
    fp32 = cached_run(app, ranks, run_args("fp32", extra))
    assert rel(got["loss"], fp32["loss"]).max() <= BF16_VS_FP32_RTOL, name


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_bf16_stays_near_fp32(layout, cached_run):
    name, app, ranks, extra = layout
    bf16 = cached_run(app, ranks, run_args("bf16", extra))
    fp32 = cached_run(app, ranks, run_args("fp32", extra))
    r = rel(bf16["loss"], fp32["loss"])
    assert r.max() <= BF16_VS_FP32_RTOL, f"{name}: bf16 loss off fp32 by {r.max():.3g}\n{bf16['loss']}\n{fp32['loss']}"
    assert r.max() > 1e-6, f"{name}: bf16 and fp32 losses agree to {r.max():.3g}: was anything rounded?"


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_bf16_recipe_and_memory(layout, cached_run):
    name, app, ranks, extra = layout
    got = cached_run(app, ranks, run_args("bf16", extra))
    c = got["config"]
    assert (c["dtype"], c["grad_dtype"], c["master_weights"]) == ("bf16", "fp32", "fp32"), c
    assert c["matmul_precision"].startswith("bf16 operands, fp32 accumulation: "), c["matmul_precision"]
    assert cached_run(app, ranks, run_args("fp32", extra))["config"]["master_weights"] == "none"
    for cat, measured in got["measured"].items():
        if cat == "peak_total":
            assert np.all(measured <= got["predicted"][cat]), name
        else:
            assert np.array_equal(measured, got["predicted"][cat]), f"{name} {cat}: {measured} vs {got['predicted'][cat]}"
    assert np.all(got["measured"]["master_parameters"] > 0), name


@pytest.mark.parametrize("grad_dtype, grad_bytes", [("fp32", 4), ("bf16", 2)])
@pytest.mark.parametrize("app, ranks, extra", [("dp", 1, []), ("fsdp", 4, ["--shard", "NO_SHARD"])],
                         ids=["dp1", "fsdp4-NO_SHARD"])
def test_no_shard_model_state_is_18_or_16_bytes_per_parameter(app, ranks, extra, grad_dtype, grad_bytes, cached_run):
    got = cached_run(app, ranks, run_args("bf16", extra, grad_dtype))
    m = got["measured"]
    expected = {"parameters": 2, "master_parameters": 4, "gradients": grad_bytes, "optimizer_states": 8}
    for cat, per_param in expected.items():
        assert list(m[cat]) == [per_param * PARAMS] * ranks, (cat, list(m[cat]), per_param * PARAMS)
    state = sum(int(m[cat][0]) for cat in expected)
    assert state == (18 if grad_dtype == "fp32" else 16) * PARAMS


def test_full_shard_model_state_per_padded_shard(cached_run):
    """FULL_SHARD over 4 ranks: every state sharded, each unit padded to a multiple of 4 elements."""
    got = cached_run("fsdp", 4, run_args("bf16", ["--shard", "FULL_SHARD"]))
    h, f, V, S, L = SHAPE["hidden"], SHAPE["ffn"], padded_vocab(SHAPE["vocab"]), SHAPE["seq"], SHAPE["layers"]
    units = [V * h + S * h] + [2 * h + 3 * h * h + 3 * h + h * h + h + 2 * h + h * f + f + f * h + h] * L + [2 * h + h * V]
    shard = sum(-(-u // 4) for u in units)
    m = got["measured"]
    for cat, per_elem in {"parameters": 2, "master_parameters": 4, "gradients": 4, "optimizer_states": 8}.items():
        assert list(m[cat]) == [per_elem * shard] * 4, cat


def test_grad_dtype_needs_bf16(run_app):
    rc, out, err = run_app("dp", 1, [*SHAPE_ARGS, "--dtype", "fp32", "--grad-dtype", "bf16", "--dry-run"])
    assert rc == 2 and "--grad-dtype bf16 needs --dtype bf16" in err, (rc, out, err)
