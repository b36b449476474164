"""parabench-ep (SPEC sections 2.4, 3, 4, 6 and 9; bench/ep/README.md): the mixture-of-experts model
trained with expert parallelism (all-to-all dispatch and combine), combined with data parallelism.

* For E in {4, 8}, k in {1, 2} and capacity factors 1.0 (assignments dropped) and 0 (none dropped),
  parabench-ep with ep 1 (on 2 data-parallel ranks), ep 2, ep 4, and ep 2 × dp 2 on 4 ranks trains
  the model of the single-rank run with the same micro-batch and global batch: each step's loss and
  grad_norm and the final parameter L2 norm within a relative 1e-5, and the same tokens per expert and
  dropped counts exactly (the routing decisions of the single rank). E = 8 runs add --aux-loss 0.01,
  and ep 2 also runs with --recompute full and selective;
* /comm accounts exactly the all-to-alls and all-reduces of the README's formula, per rank;
* /memory/measured agrees with /memory/predicted per rank and category;
* /moe holds [steps, layers, experts] kept assignments, [steps, layers] dropped ones and the auxiliary
  loss, and /summary the imbalance;
* configurations that cannot be split exit 2 promptly, naming the option.

The micro-batch is the same (2) in every run, so that capacity applies to the same b·S tokens.
"""

import math

import h5py
import numpy as np
import pytest

from conftest import padded_vocab, assert_memory_matches_prediction, check_rejected

COMM_OPS = ["all_reduce", "reduce_scatter", "all_gather", "all_to_all", "send", "recv", "broadcast"]
STEPS = 10
MICRO = 2
GLOBAL_BATCH = 8
RTOL = 1e-5
F32 = 4
SHAPE = dict(layers=2, hidden=24, heads=4, seq=12, vocab=68, ffn=40)
SHAPE_ARGS = [a for k, v in SHAPE.items() for a in (f"--{k}", v)]

MOE = [(E, k, cf) for E in (4, 8) for k in (1, 2) for cf in (1.0, 0.0)]
# (id, ranks, ep, recompute)
LAYOUTS = [("ep1-dp2", 2, 1, "none"), ("ep2", 2, 2, "none"), ("ep4", 4, 4, "none"), ("ep2xdp2", 4, 2, "none")]
RECOMPUTE = [("ep2-recompute-full", 2, 2, "full"), ("ep2-recompute-selective", 2, 2, "selective")]


def moe_args(E, k, cf):
    args = ["--experts", E, "--top-k", k, "--capacity-factor", cf]
    return args + (["--aux-loss", 0.01] if E == 8 else [])


def run_args(E, k, cf, ep, recompute="none"):
    args = [*SHAPE_ARGS, "--micro-batch", MICRO, "--global-batch", GLOBAL_BATCH, "--steps", STEPS, "--ep", ep,
            *moe_args(E, k, cf)]
    return args + (["--recompute", recompute] if recompute != "none" else [])


def moe_of(run):
    with h5py.File(run["path"], "r") as f:
        return {"kept": f["moe/tokens_per_expert"][()], "dropped": f["moe/dropped"][()],
                "aux": f["moe/aux_loss"][()], "imbalance": float(f["moe/tokens_per_expert"].attrs["imbalance"]),
                "summary": dict(f["summary"].attrs)}


def capacity(E, k, cf):
    N = MICRO * SHAPE["seq"]
    return N if cf == 0 else min(N, math.ceil(cf * k * N / E))


def params(E, ep):
    """Replicated parameters (embedding, per block the LayerNorms, attention and router, the head) and
    this rank's experts' parameters, as stored (the vocabulary padded, SPEC 2)."""
    h, f, V, S, L = SHAPE["hidden"], SHAPE["ffn"], padded_vocab(SHAPE["vocab"]), SHAPE["seq"], SHAPE["layers"]
    replicated = V * h + S * h + L * (4 * h + 3 * h * h + 3 * h + h * h + h + h * E) + 2 * h + h * V
    experts = L * (E // ep) * (2 * h * f + f + h)
    return replicated, experts


@pytest.fixture(scope="module")
def reference(cached_run):
    def get(E, k, cf, recompute="none"):
        return cached_run("ep", 1, run_args(E, k, cf, 1))
    return get


@pytest.mark.parametrize("moe", MOE, ids=[f"E{E}-k{k}-cf{cf:g}" for E, k, cf in MOE])
@pytest.mark.parametrize("layout", LAYOUTS + RECOMPUTE, ids=[lay[0] for lay in LAYOUTS + RECOMPUTE])
def test_matches_single_rank(layout, moe, cached_run, reference):
    layout_id, ranks, ep, recompute = layout
    E, k, cf = moe
    if recompute != "none" and (E, k, cf) != (4, 2, 1.0):
        pytest.skip("recomputation is checked on one MoE configuration")
    ref = reference(E, k, cf)
    got = cached_run("ep", ranks, run_args(E, k, cf, ep, recompute))
    what = f"{layout_id} E{E} k{k} cf{cf}: {got['command']}"
    assert got["status"] == "complete", what
    c = got["config"]
    assert (int(c["ep"]), int(c["experts"]), int(c["top_k"]), int(c["dp"]), int(c["grad_accum"])) == \
        (ep, E, k, ranks, GLOBAL_BATCH // (MICRO * ranks)), what
    rel = np.abs(got["loss"] - ref["loss"]) / np.abs(ref["loss"])
    assert rel.max() <= RTOL, f"{what}\nloss differs by {rel.max():.3g}\n{got['loss']}\n{ref['loss']}"
    rel = np.abs(got["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"]
    assert rel.max() <= RTOL, f"{what}\ngrad_norm differs by {rel.max():.3g}"
    assert abs(got["param_norm"] - ref["param_norm"]) <= RTOL * ref["param_norm"], what
    a, b = moe_of(got), moe_of(ref)
    assert a["kept"].shape == (STEPS, SHAPE["layers"], E) and a["dropped"].shape == (STEPS, SHAPE["layers"]), what
    assert np.array_equal(a["kept"], b["kept"]), f"{what}\ntokens per expert differ\n{a['kept']}\n{b['kept']}"
    assert np.array_equal(a["dropped"], b["dropped"]), f"{what}\ndropped differ\n{a['dropped']}\n{b['dropped']}"
    assert np.allclose(a["aux"], b["aux"], rtol=RTOL, atol=0), what


@pytest.mark.parametrize("moe", MOE, ids=[f"E{E}-k{k}-cf{cf:g}" for E, k, cf in MOE])
def test_routing_statistics(moe, reference):
    """Kept + dropped = k assignments per token of the global batch, in every step and layer; capacity 0
    drops nothing; capacity 1.0 never keeps more than C per expert and micro-batch; the auxiliary loss
    is there exactly when asked for; the imbalance is max/mean of the worst layer."""
    E, k, cf = moe
    m = moe_of(reference(E, k, cf))
    tokens = GLOBAL_BATCH * SHAPE["seq"]
    assert np.all(m["kept"].sum(axis=2) + m["dropped"] == k * tokens)
    micro_batches = GLOBAL_BATCH // MICRO
    assert np.all(m["kept"] <= capacity(E, k, cf) * micro_batches)
    if cf == 0:
        assert not m["dropped"].any()
    if E == 8:
        assert np.all(m["aux"] > 0)
    else:
        assert not m["aux"].any()
    totals = m["kept"].sum(axis=0)  # [layers, experts]
    expected = max(t.max() / t.mean() for t in totals)
    assert m["imbalance"] == pytest.approx(expected, rel=1e-12)
    assert float(m["summary"]["moe_imbalance"]) == pytest.approx(expected, rel=1e-12)
    dropped_fraction = m["dropped"].sum() / (k * tokens * STEPS * SHAPE["layers"])
    assert float(m["summary"]["moe_dropped_fraction"]) == pytest.approx(dropped_fraction, rel=1e-12)


def test_dp_given_or_derived(cached_run):
    """--dp given explicitly trains exactly what the derived dp does (bitwise: the same layout)."""
    derived = cached_run("ep", 4, run_args(4, 2, 1.0, 2))
    given = cached_run("ep", 4, ["--dp", 4, *run_args(4, 2, 1.0, 2)])
    assert int(given["config"]["dp"]) == 4
    assert np.array_equal(derived["loss"], given["loss"]) and np.array_equal(derived["grad_norm"], given["grad_norm"])


# Edge cases against their own single-rank runs: every expert chosen (k = E), one expert, and a capacity
# of one slot (factor 0.01): (E, k, capacity factor, ep, ranks).
EDGES = [(4, 4, 1.0, 2, 2), (1, 1, 0.0, 1, 2), (8, 2, 0.01, 4, 4)]


@pytest.mark.parametrize("edge", EDGES, ids=[f"E{e[0]}-k{e[1]}-cf{e[2]:g}-ep{e[3]}" for e in EDGES])
def test_edge_cases_match_single_rank(edge, cached_run):
    E, k, cf, ep, ranks = edge
    base = [*SHAPE_ARGS, "--micro-batch", MICRO, "--global-batch", GLOBAL_BATCH, "--steps", 4, "--experts", E,
            "--top-k", k, "--capacity-factor", cf, "--aux-loss", 0.01]
    ref = cached_run("ep", 1, [*base, "--ep", 1])
    got = cached_run("ep", ranks, [*base, "--ep", ep])
    rel = np.abs(got["loss"] - ref["loss"]) / np.abs(ref["loss"])
    assert rel.max() <= RTOL, f"{got['command']}\nloss differs by {rel.max():.3g}"
    a, b = moe_of(got), moe_of(ref)
    assert np.array_equal(a["kept"], b["kept"]) and np.array_equal(a["dropped"], b["dropped"]), got["command"]
    if cf == 0.01:  # C = 1: each expert keeps one assignment per micro-batch
        assert np.all(a["kept"] <= GLOBAL_BATCH // MICRO), a["kept"]
    # the memory terms are exact here too (aux loss on, the router's buffers the larger when C = 1)
    for cat in ["activations", "workspace", "comm_buffers"]:
        assert np.array_equal(got["measured"][cat], got["predicted"][cat]), (got["command"], cat)


def test_capacity_drops_tokens(reference):
    """Capacity factor 1.0 with k = 1 and E = 4 drops assignments of the untrained router."""
    assert moe_of(reference(4, 1, 1.0))["dropped"].sum() > 0


# ---- /comm: bench/ep/README.md ------------------------------------------------------------------------------

@pytest.mark.parametrize("moe", [(4, 2, 1.0), (8, 1, 0.0)], ids=["E4-k2-cf1", "E8-k1-cf0"])
@pytest.mark.parametrize("layout", LAYOUTS + RECOMPUTE, ids=[lay[0] for lay in LAYOUTS + RECOMPUTE])
def test_comm_matches_formula(layout, moe, cached_run):
    layout_id, ranks, ep, recompute = layout
    E, k, cf = moe
    if recompute != "none" and (E, k, cf) != (4, 2, 1.0):
        pytest.skip("recomputation is checked on one MoE configuration")
    got = cached_run("ep", ranks, run_args(E, k, cf, ep, recompute))
    L, h, dp = SHAPE["layers"], SHAPE["hidden"], ranks
    m = GLOBAL_BATCH // (MICRO * dp)
    calls = {op: 0 for op in COMM_OPS}
    nbytes = {op: 0 for op in COMM_OPS}
    if ep > 1:  # per micro-batch and block: dispatch and combine, forward and backward (+2 recomputed)
        per = m * L * (4 + (2 if recompute == "full" else 0))
        calls["all_to_all"] = STEPS * per
        nbytes["all_to_all"] = STEPS * per * F32 * E * capacity(E, k, cf) * h
    replicated, experts = params(E, ep)
    if dp > 1:  # replicated tensors over dp: L + 1 runs
        calls["all_reduce"] += STEPS * (L + 1)
        nbytes["all_reduce"] += STEPS * F32 * replicated
    if dp // ep > 1:  # experts over their holders: one run per block
        calls["all_reduce"] += STEPS * L
        nbytes["all_reduce"] += STEPS * F32 * experts
    for op in COMM_OPS:
        assert np.all(got["calls"][op] == calls[op]), f"{layout_id} {op} calls {got['calls'][op]}, expected {calls[op]}"
        assert np.all(got["bytes"][op] == nbytes[op]), f"{layout_id} {op} bytes {got['bytes'][op]}, expected {nbytes[op]}"


@pytest.mark.parametrize("layout", LAYOUTS + RECOMPUTE, ids=[lay[0] for lay in LAYOUTS + RECOMPUTE])
def test_memory_matches_prediction(layout, cached_run):
    layout_id, ranks, ep, recompute = layout
    got = cached_run("ep", ranks, run_args(4, 2, 1.0, ep, recompute))
    assert_memory_matches_prediction(got, layout_id)
    # The MoE's terms are exact (bench/ep/README.md); peak_total is an upper bound (docs/memory-model.md 8).
    for cat in ["parameters", "gradients", "optimizer_states", "activations", "workspace", "comm_buffers"]:
        assert np.array_equal(got["measured"][cat], got["predicted"][cat]), \
            f"{layout_id} {cat}: measured {got['measured'][cat]}, predicted {got['predicted'][cat]}"
    assert np.all(got["measured"]["peak_total"] <= got["predicted"]["peak_total"]), layout_id
    replicated, experts = params(4, ep)
    assert np.all(got["measured"]["parameters"] == F32 * (replicated + experts)), layout_id
    assert np.all(got["predicted"]["parameters"] == F32 * (replicated + experts)), layout_id
    # the all-to-all buffers: two (E, C, h) at a time
    expected_comm = 2 * F32 * 4 * capacity(4, 2, 1.0) * SHAPE["hidden"] if ep > 1 else 0
    assert np.all(got["measured"]["comm_buffers"] == expected_comm), layout_id


# ---- wrong command lines --------------------------------------------------------------------------------------

BAD = [
    ("experts-not-divisible-by-ep", 2, ["--experts", "3", "--ep", "2"], "--experts"),
    ("top-k-above-experts", 1, ["--experts", "4", "--top-k", "5"], "--top-k"),
    ("top-k-zero", 1, ["--top-k", "0"], "--top-k"),
    ("capacity-factor-negative", 1, ["--capacity-factor", "-1"], "--capacity-factor"),
    ("capacity-factor-nan", 1, ["--capacity-factor", "nan"], "--capacity-factor"),
    ("aux-loss-negative", 1, ["--aux-loss", "-0.1"], "--aux-loss"),
    ("ep-does-not-divide-dp", 2, ["--experts", "8", "--ep", "4"], "--ep"),
    ("ep-zero", 1, ["--ep", "0"], "--ep"),
    ("experts-zero", 1, ["--experts", "0"], "--experts"),
    ("dump-gradients-with-ep", 2, ["--ep", "2", "--dump-gradients", "g.h5"], "--dump-gradients"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_command_line(case, run_app, tmp_path):
    _, ranks, args, name = case
    check_rejected(run_app, tmp_path, "ep", ranks, ["--model", "tiny", *args], name)


@pytest.mark.parametrize("app", ["dp", "fsdp", "tp", "pp"])
@pytest.mark.parametrize("option", [["--ep", "2"], ["--experts", "4"], ["--top-k", "1"], ["--capacity-factor", "1"],
                                    ["--aux-loss", "0.01"]], ids=lambda o: o[0])
def test_ep_options_of_other_apps(app, option, run_app, tmp_path):
    check_rejected(run_app, tmp_path, app, 1, ["--model", "tiny", *option], option[0])


def test_model_flops_count_the_active_experts(reference):
    """SPEC 6 model FLOPs with the MoE's matrix products: k experts' MLPs and the router per token."""
    m = moe_of(reference(8, 2, 1.0))["summary"]
    G, S, L, h, V, f, E, k = GLOBAL_BATCH, SHAPE["seq"], SHAPE["layers"], SHAPE["hidden"], SHAPE["vocab"], \
        SHAPE["ffn"], 8, 2
    expected = 6 * G * S * (L * (4 * h * h + k * 2 * h * f + h * E + 2 * S * h) + h * V)
    assert float(m["model_flops_per_step"]) == pytest.approx(expected, rel=1e-12)
    formula = m["model_flops_formula"]
    assert (formula.decode() if isinstance(formula, bytes) else formula) == \
        "6*G*S*(L*(4h^2 + k*2*h*f + h*E + 2*S*h) + h*V)"
