"""Activation recomputation, --recompute none|selective|full (SPEC section 4; GptModel::forward_backward
in common/model.cpp), and the activation memory model (common/memory_model.cpp):

* every mode, on parabench-dp (1 and 2 ranks) and on parabench-fsdp FULL_SHARD (4 ranks), trains the
  model of the single-rank no-recompute run with the same global batch (SPEC 2.4, relative 1e-5), and
  its measured memory agrees with the prediction per rank and category;
* activation memory grows linearly with the micro-batch, measured and predicted (everything the model
  keeps is per sample: tokens, activations, attention probabilities), and exactly as the model
  allocates it;
* recomputation lowers the activation peak by the predicted amount: full < selective < none.
"""

import math

import numpy as np
import pytest

from conftest import MODEL_STATES, assert_memory_matches_prediction

STEPS = 10
GLOBAL_BATCH = 8
RTOL = 1e-5
F32 = 4
MODES = ["none", "selective", "full"]
SHAPE = dict(layers=2, hidden=30, heads=3, seq=16, vocab=67, ffn=99)  # as test_fsdp.py: the runs are shared
SHAPE_ARGS = [a for k, v in SHAPE.items() for a in (f"--{k}", v)]
TINY = dict(layers=2, hidden=64, heads=4, seq=32, vocab=256, ffn=256)
MICRO_BATCHES = [1, 2, 4, 8]

# (id, app, ranks, micro-batch, extra); grad_accum = GLOBAL_BATCH / (ranks · micro-batch)
LAYOUTS = [
    ("dp-1rank", "dp", 1, 8, []),
    ("dp-1rank-accum2", "dp", 1, 4, []),
    ("dp-2ranks-accum2", "dp", 2, 2, []),
    ("fsdp-FULL_SHARD-4ranks", "fsdp", 4, 2, ["--shard", "FULL_SHARD"]),
]


def train_args(micro_batch, mode, extra=()):
    return [*SHAPE_ARGS, "--global-batch", GLOBAL_BATCH, "--micro-batch", micro_batch, "--steps", STEPS,
            *extra, *(["--recompute", mode] if mode != "none" else [])]


@pytest.fixture(scope="module")
def reference(cached_run):
    """The single-rank parabench-dp run without recomputation (the reference of test_fsdp.py too)."""
    return cached_run("dp", 1, [*SHAPE_ARGS, "--global-batch", GLOBAL_BATCH, "--micro-batch", GLOBAL_BATCH,
                                "--steps", STEPS])


@pytest.fixture(scope="module")
def layout_run(cached_run):
    by_id = {layout[0]: layout for layout in LAYOUTS}

    def get(layout_id, mode):
        _, app, ranks, micro, extra = by_id[layout_id]
        args = train_args(micro, mode, extra)
        if app == "fsdp" and mode == "none":
            # exactly test_fsdp.py's FULL_SHARD run (--shard before the mode), so a session runs it once
            args = [*SHAPE_ARGS, "--global-batch", GLOBAL_BATCH, "--micro-batch", micro, "--steps", STEPS, *extra]
        return cached_run(app, ranks, args)

    return get


# ---- SPEC 2.4: recomputation changes memory, never the model trained -------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_matches_single_rank(layout, mode, layout_run, reference):
    layout_id, app, ranks, micro, _ = layout
    got = layout_run(layout_id, mode)
    assert got["status"] == "complete"
    c = got["config"]
    assert (c["app"], c["recompute"], int(c["world_size"]), int(c["global_batch"]), int(c["grad_accum"])) == \
        (app, mode, ranks, GLOBAL_BATCH, GLOBAL_BATCH // (ranks * micro))
    what = f"{layout_id} --recompute {mode}: {got['command']}"
    assert got["loss"].shape == reference["loss"].shape == (STEPS,), what
    rel = np.abs(got["loss"] - reference["loss"]) / np.abs(reference["loss"])
    assert rel.max() <= RTOL, f"{what}\nloss differs from the single-rank run by {rel.max():.3g} (step {rel.argmax() + 1})"
    rel_grad = np.abs(got["grad_norm"] - reference["grad_norm"]) / reference["grad_norm"]
    assert rel_grad.max() <= RTOL, f"{what}\ngrad_norm differs by {rel_grad.max():.3g}"
    rel_norm = abs(got["param_norm"] - reference["param_norm"]) / reference["param_norm"]
    assert rel_norm <= RTOL, f"{what}\nfinal_param_norm differs by {rel_norm:.3g}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_memory_matches_prediction(layout, mode, layout_run):
    assert_memory_matches_prediction(layout_run(layout[0], mode), f"{layout[0]} --recompute {mode}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_recompute_saves_the_predicted_activations(layout, layout_run):
    """Per rank: full < selective < none, measured and predicted, and each mode saves exactly (within
    1%) the predicted amount; recomputation touches no other category but peak_total."""
    runs = {mode: layout_run(layout[0], mode) for mode in MODES}
    for kind in ("measured", "predicted"):
        act = {mode: runs[mode][kind]["activations"] for mode in MODES}
        assert np.all(act["full"] < act["selective"]) and np.all(act["selective"] < act["none"]), (kind, act)
        for cat in MODEL_STATES + ["workspace", "comm_buffers"]:
            for mode in ("selective", "full"):
                assert np.array_equal(runs[mode][kind][cat], runs["none"][kind][cat]), (kind, mode, cat)
    for mode in ("selective", "full"):
        saved_measured = runs["none"]["measured"]["activations"] - runs[mode]["measured"]["activations"]
        saved_predicted = runs["none"]["predicted"]["activations"] - runs[mode]["predicted"]["activations"]
        assert np.all(np.abs(saved_measured - saved_predicted) <= 0.01 * saved_predicted), \
            (mode, saved_measured, saved_predicted)
        saved_peak = runs["none"]["measured"]["peak_total"] - runs[mode]["measured"]["peak_total"]
        assert np.all(saved_peak > 0), (mode, saved_peak)


# ---- activation memory against the micro-batch (tiny model, one rank) ------------------------------------

@pytest.fixture(scope="module")
def by_micro_batch(cached_run):
    """{mode: {b: result}} of single-rank dp runs of the tiny model with micro-batch b = global batch."""
    def run(mode, b):
        return cached_run("dp", 1, ["--model", "tiny", "--micro-batch", b, "--global-batch", b, "--steps", 2,
                                    "--warmup", 1, *(["--recompute", mode] if mode != "none" else [])])
    return {mode: {b: run(mode, b) for b in MICRO_BATCHES} for mode in MODES}


def expected_activations(mode, b, L, h, a, S, V, f):
    """Bytes of the activations peak and the workspace for micro-batch b, as forward_backward allocates
    them (fp32, the CPU backend keeps the attention probabilities a·b·S² and uses as much scratch)."""
    N = b * S
    tokens = 2 * N * 4                                   # inputs and targets, int32
    embed = N * h * F32                                  # x0
    no_att = 4 * N * 4 + F32 * (N * h + 3 * N * h + N * h + N * h + N * h + N * f + N * f + N * h)
    att = a * b * S * S * F32                            # attention probabilities, per sample
    block, block_out = no_att + att, N * h * F32
    head = 2 * N * 4 + F32 * (N * h + N * V)             # lnf statistics, lnf out, logits
    if mode == "none":
        peak = tokens + embed + L * block + head
    elif mode == "selective":
        # forward drops the probabilities; backward recomputes them and a copy of the attention output
        peak = max(tokens + embed + L * no_att + head, tokens + embed + L * no_att + att + N * h * F32)
    else:
        # forward keeps block outputs; one block's full set exists while it runs (forward or backward)
        peak = max(tokens + embed + L * block_out + head, tokens + embed + (L - 1) * block_out + block)
    workspace = 8 + F32 * (3 * N * h + 3 * N * h + N * f) + att  # loss (double), dres dln datt dqkv dfc, scratch
    return peak, workspace


@pytest.mark.parametrize("mode", MODES)
def test_activations_grow_linearly_with_micro_batch(mode, by_micro_batch):
    runs = by_micro_batch[mode]
    for kind in ("measured", "predicted"):
        act = {b: int(runs[b][kind]["activations"][0]) for b in MICRO_BATCHES}
        per_sample = act[2] - act[1]
        assert per_sample > 0, (kind, act)
        assert act[4] - act[2] == 2 * per_sample, (kind, act)
        for b in MICRO_BATCHES:
            assert act[b] - act[1] == (b - 1) * per_sample, (kind, b, act)
        work = {b: int(runs[b][kind]["workspace"][0]) for b in MICRO_BATCHES}
        assert work[4] - work[2] == 2 * (work[2] - work[1]) > 0, (kind, work)
    for b in MICRO_BATCHES:
        assert_memory_matches_prediction(runs[b], f"recompute {mode}, micro-batch {b}")


@pytest.mark.parametrize("mode", MODES)
def test_activations_as_the_model_allocates_them(mode, by_micro_batch):
    """An independent count of what forward_backward holds at its peak, from the shapes alone."""
    for b in MICRO_BATCHES:
        peak, workspace = expected_activations(mode, b, L=TINY["layers"], h=TINY["hidden"], a=TINY["heads"],
                                               S=TINY["seq"], V=TINY["vocab"], f=TINY["ffn"])
        run = by_micro_batch[mode][b]
        for kind in ("measured", "predicted"):
            assert int(run[kind]["activations"][0]) == peak, (mode, b, kind, int(run[kind]["activations"][0]), peak)
            assert int(run[kind]["workspace"][0]) == workspace, (mode, b, kind)


@pytest.mark.parametrize("b", MICRO_BATCHES)
def test_recompute_lowers_the_activation_peak_by_the_predicted_amount(b, by_micro_batch):
    act = {kind: {mode: int(by_micro_batch[mode][b][kind]["activations"][0]) for mode in MODES}
           for kind in ("measured", "predicted")}
    for kind in act:
        assert act[kind]["full"] < act[kind]["selective"] < act[kind]["none"], (kind, act[kind])
    for mode in ("selective", "full"):
        saved_measured = act["measured"]["none"] - act["measured"][mode]
        saved_predicted = act["predicted"]["none"] - act["predicted"][mode]
        assert abs(saved_measured - saved_predicted) <= 0.01 * saved_predicted, (mode, saved_measured, saved_predicted)


def test_tiny_reference_starts_near_ln_v(by_micro_batch):
    loss = by_micro_batch["none"][8]["loss"]
    assert np.all(np.isfinite(loss)) and abs(loss[0] - math.log(TINY["vocab"])) < 0.1
