"""parabench-tp (SPEC sections 2.4, 3, 4 and 6; bench/tp/README.md; common/model.cpp, common/parallel.h):
tensor parallelism (Megatron-LM) with optional sequence parallelism, combined with data parallelism.

* tp = 1, 2 and 4 (one tp group), and tp 2 × dp 2 on 4 ranks, each with and without
  --sequence-parallel and with gradient accumulation 1 and 2, and --recompute full and selective with
  tp 2 + sequence parallelism, train the model of the single-rank parabench-dp run with the same global
  batch: each step's loss and grad_norm and the final parameter L2 norm within a relative 1e-5 (the spec
  allows 1e-4; they agree to about 1e-8). The file holds the global loss and norm, so this also says
  that every rank of a tp group trained on the same loss;
* /comm accounts exactly the collectives of the README's formula, per rank, over all steps;
* /memory/measured agrees with /memory/predicted per rank and category; the model states are exactly
  this tp rank's slices; sequence parallelism saves the residual-stream activations divided by tp,
  measured and predicted;
* configurations that cannot be split exit 2 promptly, naming the option, once.

The shape is awkward on purpose: one head per rank at tp 4, h/tp = 6, ffn/tp = 25, ffn ≠ 4h, and at
tp 4 with sequence parallelism a sequence shard of 6 or 3 rows does not start at a sample boundary.
The vocabulary, 67, divides by no tp: padded as by default (SPEC 2: a multiple of 128 · tp) every rank
but the first holds only padding; padded to a multiple of tp alone (`--make-vocab-size-divisible-by
1`, the "unpadded" layouts) the blocks are 34 or 17 wide (odd) and the last rank's ends in one padding
column.
"""

import math

import numpy as np
import pytest

from conftest import padded_vocab, check_rejected, MODEL_STATES, OTHER_CATEGORIES, assert_memory_matches_prediction

COMM_OPS = ["all_reduce", "reduce_scatter", "all_gather", "all_to_all", "send", "recv", "broadcast"]
STEPS = 10
GLOBAL_BATCH = 4
RTOL = 1e-5
F32 = 4  # bytes
SHAPE = dict(layers=2, hidden=24, heads=4, seq=12, vocab=67, ffn=100)
SHAPE_ARGS = [a for k, v in SHAPE.items() for a in (f"--{k}", v)]


class Layout:
    def __init__(self, layout_id, ranks, tp, micro, sp, recompute="none", divisor=128):
        self.id, self.ranks, self.tp, self.micro, self.sp, self.recompute = layout_id, ranks, tp, micro, sp, recompute
        self.divisor = divisor  # --make-vocab-size-divisible-by
        self.dp = ranks // tp
        self.accum = GLOBAL_BATCH // (self.dp * micro)

    def args(self):
        args = [*SHAPE_ARGS, "--global-batch", GLOBAL_BATCH, "--micro-batch", self.micro, "--steps", STEPS,
                "--tp", self.tp]
        if self.sp:
            args.append("--sequence-parallel")
        if self.recompute != "none":
            args += ["--recompute", self.recompute]
        if self.divisor != 128:
            args += ["--make-vocab-size-divisible-by", self.divisor]
        return args


LAYOUTS = [
    Layout("tp1", 1, 1, 4, False),
    Layout("tp1-sp-accum2", 1, 1, 2, True),
    Layout("tp2", 2, 2, 4, False),
    Layout("tp2-sp", 2, 2, 4, True),
    Layout("tp2-accum2", 2, 2, 2, False),
    Layout("tp2-sp-accum2", 2, 2, 2, True),
    Layout("tp4", 4, 4, 4, False),
    Layout("tp4-sp", 4, 4, 4, True),
    Layout("tp4-accum2", 4, 4, 2, False),
    Layout("tp4-sp-accum2", 4, 4, 2, True),
    Layout("tp2xdp2", 4, 2, 2, False),
    Layout("tp2xdp2-sp", 4, 2, 2, True),
    Layout("tp2xdp2-accum2", 4, 2, 1, False),
    Layout("tp2xdp2-sp-accum2", 4, 2, 1, True),
    Layout("tp2-sp-recompute-selective", 2, 2, 4, True, "selective"),
    Layout("tp2-sp-recompute-full", 2, 2, 4, True, "full"),
    Layout("tp4-unpadded", 4, 4, 4, False, divisor=1),
    Layout("tp2xdp2-sp-unpadded", 4, 2, 2, True, divisor=1),
]
BY_ID = {layout.id: layout for layout in LAYOUTS}
LAYOUT_IDS = list(BY_ID)
NO_RECOMPUTE_IDS = [layout.id for layout in LAYOUTS if layout.recompute == "none"]
# (without, with --sequence-parallel): the same layout otherwise
SP_PAIRS = [(i, f"{i.split('-')[0]}-sp" + i[len(i.split('-')[0]):]) for i in NO_RECOMPUTE_IDS
            if not BY_ID[i].sp and BY_ID[i].tp > 1]
SP_PAIRS = [(i, j) for i, j in SP_PAIRS if j in BY_ID]


def p_local(tp, divisor=128):
    """Parameters of one tp rank (bench/tp/README.md): the vocabulary-parallel embedding, the position
    table, per block the LayerNorms (whole), qkv column-parallel, out row-parallel (bias whole), fc1
    column-parallel, fc2 row-parallel (bias whole), then the final LayerNorm and the column-parallel head;
    the vocabulary as stored, padded to a multiple of divisor · tp (SPEC 2)."""
    h, f, S, L = SHAPE["hidden"], SHAPE["ffn"], SHAPE["seq"], SHAPE["layers"]
    V = padded_vocab(SHAPE["vocab"], tp, divisor)
    block = 4 * h + h * 3 * h // tp + 3 * h // tp + h // tp * h + h + h * f // tp + f // tp + f // tp * h + h
    return V // tp * h + S * h + L * block + 2 * h + h * V // tp


@pytest.fixture(scope="module")
def reference(cached_run):
    """The single-rank parabench-dp run with the same global batch (micro-batch 4, no accumulation)."""
    return cached_run("dp", 1, [*SHAPE_ARGS, "--global-batch", GLOBAL_BATCH, "--micro-batch", GLOBAL_BATCH,
                                "--steps", STEPS])


@pytest.fixture(scope="module")
def layout_run(cached_run):
    def get(layout_id):
        layout = BY_ID[layout_id]
        return cached_run("tp", layout.ranks, layout.args())

    return get


# ---- the model shape -------------------------------------------------------------------------------------

def test_shape_is_awkward(num_params):
    h, f, V = SHAPE["hidden"], SHAPE["ffn"], SHAPE["vocab"]
    assert f != 4 * h
    for tp in (2, 4):
        assert SHAPE["heads"] % tp == 0 and f % tp == 0 and V % tp != 0
    assert (f // 4) % 2 and padded_vocab(V, 4, 1) // 4 % 2 and SHAPE["heads"] // 4 == 1
    assert padded_vocab(V, 2) == 256 and padded_vocab(V, 4) == 512 and padded_vocab(V, 4, 1) == 68
    assert p_local(1) == num_params(SHAPE["layers"], h, SHAPE["seq"], V, f)
    # the sliced parameters add up to the whole model as stored at that tp; the whole ones are held by
    # every tp rank
    whole = SHAPE["seq"] * h + SHAPE["layers"] * (4 * h + 2 * h) + 2 * h
    for tp, divisor in ((2, 128), (4, 128), (4, 1)):
        stored = p_local(1) + 2 * h * (padded_vocab(V, tp, divisor) - padded_vocab(V))
        assert tp * (p_local(tp, divisor) - whole) + whole == stored, (tp, divisor)


def test_reference_is_sane(reference):
    assert reference["status"] == "complete"
    loss = reference["loss"]
    assert np.all(np.isfinite(loss)) and abs(loss[0] - math.log(SHAPE["vocab"])) < 0.1, loss
    assert loss[-1] < loss[0], loss


# ---- SPEC 2.4: the loss curve of the single-rank run -------------------------------------------------------

@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_matches_single_rank(layout_id, layout_run, reference):
    layout = BY_ID[layout_id]
    got = layout_run(layout_id)
    assert got["status"] == "complete"
    c = got["config"]
    assert c["app"] == "tp" and c["recompute"] == layout.recompute
    assert (int(c["world_size"]), int(c["tp"]), int(c["dp"]), int(c["global_batch"]), int(c["micro_batch"]),
            int(c["grad_accum"])) == (layout.ranks, layout.tp, layout.dp, GLOBAL_BATCH, layout.micro, layout.accum)
    assert bool(c["sequence_parallel"]) == layout.sp
    what = f"{layout_id}: {got['command']}"
    assert got["loss"].shape == got["grad_norm"].shape == reference["loss"].shape == (STEPS,), what
    rel = np.abs(got["loss"] - reference["loss"]) / np.abs(reference["loss"])
    assert rel.max() <= RTOL, f"{what}\nloss differs from the single-rank run by {rel.max():.3g} " \
                              f"(step {rel.argmax() + 1})\n{got['loss']}\n{reference['loss']}"
    rel_grad = np.abs(got["grad_norm"] - reference["grad_norm"]) / reference["grad_norm"]
    assert rel_grad.max() <= RTOL, f"{what}\ngrad_norm differs by {rel_grad.max():.3g} (step {rel_grad.argmax() + 1})" \
                                   f"\n{got['grad_norm']}\n{reference['grad_norm']}"
    rel_norm = abs(got["param_norm"] - reference["param_norm"]) / reference["param_norm"]
    assert rel_norm <= RTOL, f"{what}\nfinal_param_norm {got['param_norm']} differs from " \
                             f"{reference['param_norm']} by {rel_norm:.3g}"


def test_same_layout_twice_is_bitwise_identical(layout_run, cached_run):
    """SPEC 2.4: the same layout run twice gives bitwise identical losses (the options in another order,
    so that the session's cache runs it again)."""
    first = layout_run("tp4-sp")
    args = BY_ID["tp4-sp"].args()
    again = cached_run("tp", 4, ["--sequence-parallel", *[a for a in args if a != "--sequence-parallel"]])
    assert np.array_equal(first["loss"], again["loss"]), (first["loss"], again["loss"])
    assert np.array_equal(first["grad_norm"], again["grad_norm"])
    assert first["param_norm"] == again["param_norm"]


# ---- SPEC 6: /comm, the formula of bench/tp/README.md ------------------------------------------------------

def expected_comm(layout):
    """Calls and bytes per rank over the run, per collective (4-byte floats; all_gather and reduce_scatter
    count the full, unsharded buffer). N tokens per micro-batch, m micro-batches per step:
      without sequence parallelism, per micro-batch: all_reduce 4L + 4 calls, 4·(N·h·(4L + 2) + 3N) bytes
        (embedding g; per block two g's and two f's; the head's f; the softmax max (N) and sums (2N));
      with it, per micro-batch: all_gather 6L + 3 calls of 4·N·h; reduce_scatter 4L + 2 of 4·N·h;
        all_reduce 2 calls, 4·3N bytes; and per step 4L + 2 all_reduce of the LayerNorm gradients, 4·h each;
      with dp > 1, per step one all_reduce of this rank's whole gradient, 4·P_local bytes.
    --recompute full runs each block's forward again in backward: per micro-batch and layer its two
    all_gathers and two reduce_scatters with sequence parallelism, its two g all_reduces without
    (not in the README's formula); selective recomputes attention only, which communicates nothing."""
    calls = {op: 0 for op in COMM_OPS}
    nbytes = {op: 0 for op in COMM_OPS}
    tp, m, L, h = layout.tp, layout.accum, SHAPE["layers"], SHAPE["hidden"]
    N = layout.micro * SHAPE["seq"]
    if tp > 1:
        if layout.sp:
            calls["all_gather"] += m * (6 * L + 3)
            nbytes["all_gather"] += m * F32 * N * h * (6 * L + 3)
            calls["reduce_scatter"] += m * (4 * L + 2)
            nbytes["reduce_scatter"] += m * F32 * N * h * (4 * L + 2)
            calls["all_reduce"] += m * 2 + (4 * L + 2)
            nbytes["all_reduce"] += m * F32 * 3 * N + (4 * L + 2) * F32 * h
            if layout.recompute == "full":
                for op in ("all_gather", "reduce_scatter"):
                    calls[op] += m * 2 * L
                    nbytes[op] += m * 2 * L * F32 * N * h
        else:
            calls["all_reduce"] += m * (4 * L + 4)
            nbytes["all_reduce"] += m * F32 * (N * h * (4 * L + 2) + 3 * N)
            if layout.recompute == "full":
                calls["all_reduce"] += m * 2 * L
                nbytes["all_reduce"] += m * 2 * L * F32 * N * h
    if layout.dp > 1:
        calls["all_reduce"] += 1
        nbytes["all_reduce"] += F32 * p_local(tp, layout.divisor)
    return ({op: STEPS * v for op, v in calls.items()}, {op: STEPS * v for op, v in nbytes.items()})


@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_comm_accounting(layout_id, layout_run):
    layout = BY_ID[layout_id]
    run = layout_run(layout_id)
    calls, nbytes = expected_comm(layout)
    got_calls = {op: run["calls"][op].tolist() for op in COMM_OPS}
    got_bytes = {op: run["bytes"][op].tolist() for op in COMM_OPS}
    what = f"{layout_id}: {run['command']}"
    assert got_calls == {op: [v] * layout.ranks for op, v in calls.items()}, f"/comm/*/calls\n{what}"
    assert got_bytes == {op: [v] * layout.ranks for op, v in nbytes.items()}, f"/comm/*/bytes\n{what}"


# ---- SPEC 6: memory, measured against predicted -------------------------------------------------------------

@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_memory_matches_prediction(layout_id, layout_run):
    assert_memory_matches_prediction(layout_run(layout_id), layout_id)


@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_model_states_are_this_ranks_slices(layout_id, layout_run):
    """fp32: parameters and gradients 4·P_local, AdamW m and v 8·P_local, no master copy, on every rank."""
    layout = BY_ID[layout_id]
    run = layout_run(layout_id)
    P = p_local(layout.tp, layout.divisor)
    expected = {"parameters": F32 * P, "gradients": F32 * P, "optimizer_states": 2 * F32 * P, "master_parameters": 0}
    for kind in ("measured", "predicted"):
        for cat, value in expected.items():
            assert run[kind][cat].tolist() == [value] * layout.ranks, (layout_id, kind, cat, value)


@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_sequence_parallel_comm_buffer(layout_id, layout_run):
    """Sequence parallelism holds one (micro-batch · seq, h) buffer at a time (a gathered input, a partial
    row-parallel output or a gathered gradient); without it tp allocates no communication buffer."""
    layout = BY_ID[layout_id]
    run = layout_run(layout_id)
    N = layout.micro * SHAPE["seq"]
    value = F32 * N * SHAPE["hidden"] if layout.sp and layout.tp > 1 else 0
    for kind in ("measured", "predicted"):
        assert run[kind]["comm_buffers"].tolist() == [value] * layout.ranks, (layout_id, kind)


def residual_stream_saving(layout):
    """Sequence parallelism keeps only N/tp rows of the residual-stream tensors (Korthikanti et al. 2022):
    the embedding output, per block the LayerNorm outputs ln1 and ln2, x_mid and x_out and the four
    LayerNorm statistics (mean, rstd; fp32), and the final LayerNorm's output and two statistics. What it
    saves per rank is that, times (N − N/tp)."""
    h, L = SHAPE["hidden"], SHAPE["layers"]
    N = layout.micro * SHAPE["seq"]
    per_row = F32 * (h + L * (4 * h + 4) + (h + 2))
    return (N - N // layout.tp) * per_row


@pytest.mark.parametrize("without, with_sp", SP_PAIRS, ids=[w for _, w in SP_PAIRS])
def test_sequence_parallel_activation_saving(without, with_sp, layout_run):
    a, b = layout_run(without), layout_run(with_sp)
    saving = residual_stream_saving(BY_ID[with_sp])
    measured = a["measured"]["activations"] - b["measured"]["activations"]
    predicted = a["predicted"]["activations"] - b["predicted"]["activations"]
    assert np.all(b["measured"]["activations"] < a["measured"]["activations"]), \
        (a["measured"]["activations"], b["measured"]["activations"])
    assert np.all(predicted == saving), (predicted, saving)
    assert np.all(np.abs(measured - predicted) <= 0.10 * predicted), (measured, predicted)
    assert np.all(measured == saving), (measured, saving)  # in fact exact
    # sequence parallelism changes the arithmetic's layout, not the model states
    for cat in MODEL_STATES:
        assert np.array_equal(a["measured"][cat], b["measured"][cat]), cat


def test_recompute_lowers_activations_with_sequence_parallelism(layout_run):
    none, selective, full = (layout_run(i) for i in ("tp2-sp", "tp2-sp-recompute-selective",
                                                       "tp2-sp-recompute-full"))
    for kind in ("measured", "predicted"):
        n, s, f = (r[kind]["activations"] for r in (none, selective, full))
        assert np.all(f < s) and np.all(s < n), (kind, f, s, n)


# ---- SPEC 3 to 5: configurations that cannot be split -----------------------------------------------------

# (id, ranks, arguments after --model tiny --steps 2 --warmup 1, what stderr must name)
BAD = [
    ("heads-not-divisible", 3, ["--tp", "3"], ["--heads 4", "--tp 3"]),
    ("ffn-not-divisible", 4, ["--ffn", "250", "--tp", "4"], ["--ffn 250", "--tp 4"]),
    ("sp-tokens-not-divisible", 4, ["--seq", "30", "--tp", "4", "--sequence-parallel"], ["--seq", "--tp 4"]),
    ("sp-micro-batch-tokens-not-divisible", 4, ["--seq", "6", "--micro-batch", "1", "--global-batch", "2",
                                                "--tp", "4", "--sequence-parallel"], ["--micro-batch", "--tp 4"]),
    ("world-smaller-than-tp", 2, ["--tp", "4"], ["--tp"]),
    ("world-not-divisible-by-tp", 4, ["--tp", "3"], ["--tp"]),
    ("tp-zero", 4, ["--tp", "0"], ["--tp"]),
    ("tp-negative", 2, ["--tp", "-1"], ["--tp"]),
    ("tp-not-a-number", 2, ["--tp", "two"], ["--tp"]),
    ("dump-gradients-with-tp", 2, ["--dump-gradients", "x.h5", "--tp", "2"], ["--dump-gradients"]),
    ("fsdp-option", 2, ["--tp", "2", "--shard", "FULL_SHARD"], ["--shard"]),
    ("dp-option", 2, ["--tp", "2", "--bucket-mb", "5"], ["--bucket-mb"]),
    ("missing-tp-value", 2, ["--tp"], ["--tp"]),
]


@pytest.mark.parametrize("ranks, args, names", [pytest.param(r, a, n, id=i) for i, r, a, n in BAD])
def test_rejected(ranks, args, names, run_app, tmp_path):
    check_rejected(run_app, tmp_path, "tp", ranks, ["--model", "tiny", "--steps", "2", "--warmup", "1", *args], names)


def test_help_lists_tp_options(run_app, tmp_path):
    rc, out, err = run_app("tp", 1, ["--help"], timeout=20, cwd=tmp_path)
    assert rc == 0, err
    for option in ("--tp", "--sequence-parallel", "--recompute", "--dp"):
        assert option in out, option
    words = out.split()
    assert "--shard" not in words and "--bucket-mb" not in words and "--no-overlap" not in words
