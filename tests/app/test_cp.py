"""parabench-cp (SPEC sections 2.4, 3, 4 and 6; bench/cp/README.md): context parallelism, each sequence
split over cp ranks, with ring, all-gather and all-to-all (Ulysses) attention, zigzag or contiguous
chunks, combined with data parallelism.

* Each algorithm at cp 2 and 4 and cp 2 × dp 2, each layout, with and without --recompute full (and
  alltoall with selective), trains the model of the single-rank parabench-dp run with the same global
  batch: each step's loss and grad_norm and the final parameter L2 norm within a relative 1e-5;
* /comm accounts exactly the sends and receives, all-gathers and reduce-scatters, all-to-alls and the
  gradient all-reduce of the README's formula, per rank;
* /memory/measured equals /memory/predicted per rank and category (peak_total: at most predicted), and
  at cp 4 each algorithm keeps at most 0.3× the activations of the cp 1 run at the same S;
* /cp/attention_time_s holds [steps, ranks] and /summary the slowest/fastest ratio (its values are
  timings: bench/cp/scaling.py measures the load balance, not a test);
* wrong command lines exit 2 naming the option.
"""

import h5py
import numpy as np
import pytest

from conftest import padded_vocab, assert_memory_matches_prediction, check_rejected

COMM_OPS = ["all_reduce", "reduce_scatter", "all_gather", "all_to_all", "send", "recv", "broadcast"]
STEPS = 10
MICRO = 2
GLOBAL_BATCH = 4
RTOL = 1e-5
F32 = 4
SHAPE = dict(layers=2, hidden=24, heads=4, seq=24, vocab=68, ffn=40)
SHAPE_ARGS = [a for k, v in SHAPE.items() for a in (f"--{k}", v)]
ALGOS = ["ring", "allgather", "alltoall"]
CP_LAYOUTS = ["zigzag", "contiguous"]
# (id, ranks, cp)
GRIDS = [("cp2", 2, 2), ("cp4", 4, 4), ("cp2xdp2", 4, 2)]
RUNS = [(algo, layout, grid, recompute) for algo in ALGOS for layout in CP_LAYOUTS for grid in GRIDS
        for recompute in ("none", "full")] + [("alltoall", "zigzag", GRIDS[0], "selective")]
RUN_IDS = [f"{a}-{lay}-{g[0]}-{r}" for a, lay, g, r in RUNS]


def args_of(algo, layout, cp, recompute="none"):
    args = [*SHAPE_ARGS, "--micro-batch", MICRO, "--global-batch", GLOBAL_BATCH, "--steps", STEPS, "--cp", cp,
            "--cp-algo", algo, "--cp-layout", layout]
    return args + (["--recompute", recompute] if recompute != "none" else [])


@pytest.fixture(scope="module")
def reference(cached_run):
    return cached_run("dp", 1, [*SHAPE_ARGS, "--micro-batch", MICRO, "--global-batch", GLOBAL_BATCH, "--steps", STEPS])


def params():
    """As stored: the vocabulary padded (SPEC 2)."""
    h, f, V, S, L = SHAPE["hidden"], SHAPE["ffn"], padded_vocab(SHAPE["vocab"]), SHAPE["seq"], SHAPE["layers"]
    return V * h + S * h + L * (4 * h + 3 * h * h + 3 * h + h * h + h + 2 * h * f + f + h) + 2 * h + h * V


@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_matches_single_rank(run, cached_run, reference):
    algo, layout, (grid, ranks, cp), recompute = run
    got = cached_run("cp", ranks, args_of(algo, layout, cp, recompute))
    what = f"{grid} {algo} {layout} {recompute}: {got['command']}"
    assert got["status"] == "complete", what
    c = got["config"]
    assert (int(c["cp"]), c["cp_algo"], c["cp_layout"], int(c["dp"])) == (cp, algo, layout, ranks // cp), what
    for key in ("loss", "grad_norm"):
        rel = np.abs(got[key] - reference[key]) / np.abs(reference[key])
        assert rel.max() <= RTOL, f"{what}\n{key} differs by {rel.max():.3g}\n{got[key]}\n{reference[key]}"
    assert abs(got["param_norm"] - reference["param_norm"]) <= RTOL * reference["param_norm"], what


def test_same_layout_twice_is_bitwise_identical(cached_run):
    first = cached_run("cp", 4, args_of("ring", "zigzag", 4))
    again = cached_run("cp", 4, ["--cp-layout", "zigzag", *args_of("ring", "zigzag", 4)[:-2]])
    assert np.array_equal(first["loss"], again["loss"]) and first["param_norm"] == again["param_norm"]


def test_dp_given_or_derived(cached_run):
    """--dp given explicitly trains exactly what the derived dp does (bitwise: the same layout)."""
    derived = cached_run("cp", 4, args_of("ring", "zigzag", 2))
    given = cached_run("cp", 4, ["--dp", 2, *args_of("ring", "zigzag", 2)])
    assert int(given["config"]["dp"]) == 2
    assert np.array_equal(derived["loss"], given["loss"]) and np.array_equal(derived["grad_norm"], given["grad_norm"])


def expected_comm(algo, ranks, cp, recompute):
    """bench/cp/README.md: per micro-batch and layer, rows = b·S/cp tokens of 2h (K|V) or 3h (Q|K|V)."""
    L, h, S = SHAPE["layers"], SHAPE["hidden"], SHAPE["seq"]
    dp = ranks // cp
    m = GLOBAL_BATCH // (MICRO * dp)
    rows = MICRO * S // cp
    calls = {op: 0 for op in COMM_OPS}
    nbytes = {op: 0 for op in COMM_OPS}

    def add(op, n, size):
        calls[op] += STEPS * m * L * n
        nbytes[op] += STEPS * m * L * n * size

    if algo == "ring":
        hops = 3 * cp - 2 + (cp - 1 if recompute == "full" else 0)
        add("send", hops, F32 * rows * 2 * h)
        add("recv", hops, F32 * rows * 2 * h)
    elif algo == "allgather":
        add("all_gather", 2 + (1 if recompute == "full" else 0), F32 * MICRO * S * 2 * h)
        add("reduce_scatter", 1, F32 * MICRO * S * 2 * h)
    else:
        forwards = 2 if recompute in ("full", "selective") else 1  # the CPU backend keeps probabilities
        add("all_to_all", forwards + 1, F32 * rows * 3 * h)
        add("all_to_all", forwards + 1, F32 * rows * h)
    if ranks > 1:  # one all-reduce of the whole gradient over dp × cp
        calls["all_reduce"] += STEPS
        nbytes["all_reduce"] += STEPS * F32 * params()
    return calls, nbytes


@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_comm_matches_formula(run, cached_run):
    algo, layout, (grid, ranks, cp), recompute = run
    got = cached_run("cp", ranks, args_of(algo, layout, cp, recompute))
    calls, nbytes = expected_comm(algo, ranks, cp, recompute)
    for op in COMM_OPS:
        assert np.all(got["calls"][op] == calls[op]), f"{grid} {algo} {op} calls {got['calls'][op]}, expected {calls[op]}"
        assert np.all(got["bytes"][op] == nbytes[op]), f"{grid} {algo} {op} bytes {got['bytes'][op]}, expected {nbytes[op]}"


@pytest.mark.parametrize("run", RUNS, ids=RUN_IDS)
def test_memory_matches_prediction(run, cached_run):
    algo, layout, (grid, ranks, cp), recompute = run
    got = cached_run("cp", ranks, args_of(algo, layout, cp, recompute))
    what = f"{grid} {algo} {layout} {recompute}"
    assert_memory_matches_prediction(got, what)
    for cat in ["parameters", "gradients", "optimizer_states", "activations", "workspace", "comm_buffers"]:
        assert np.array_equal(got["measured"][cat], got["predicted"][cat]), \
            f"{what} {cat}: measured {got['measured'][cat]}, predicted {got['predicted'][cat]}"
    assert np.all(got["measured"]["peak_total"] <= got["predicted"]["peak_total"]), what


def test_attention_times_recorded(cached_run):
    got = cached_run("cp", 4, args_of("ring", "zigzag", 4))
    with h5py.File(got["path"], "r") as f:
        t = f["cp/attention_time_s"][()]
        ratio = float(f["summary"].attrs["cp_attention_time_ratio"])
    assert t.shape == (STEPS, 4) and np.all(t > 0), t
    measured = t[2:].sum(axis=0)  # after the 2 warm-up steps
    assert ratio == pytest.approx(measured.max() / measured.min(), rel=1e-12)


LONG = dict(layers=2, hidden=32, heads=4, seq=128, vocab=64, ffn=64)


@pytest.mark.parametrize("algo", ALGOS)
def test_activations_fall_with_cp(algo, cached_run):
    """At the same S, cp 4 keeps at most 0.3× the activations per rank of the cp 1 run (measured)."""
    shape = [a for k, v in LONG.items() for a in (f"--{k}", v)]
    base = [*shape, "--micro-batch", 1, "--global-batch", 1, "--steps", 3, "--warmup", 1]
    one = cached_run("dp", 1, base)
    four = cached_run("cp", 4, [*base, "--cp", 4, "--cp-algo", algo])
    ratio = four["measured"]["activations"].max() / one["measured"]["activations"][0]
    assert ratio <= 0.3, f"{algo}: cp 4 keeps {ratio:.3f} of cp 1's activations"


BAD = [
    ("seq-not-divisible-zigzag", 2, ["--seq", "30", "--cp", "2"], "--seq"),
    ("seq-not-divisible-contiguous", 4, ["--seq", "30", "--cp", "4", "--cp-layout", "contiguous"], "--seq"),
    ("alltoall-heads", 2, ["--heads", "3", "--hidden", "48", "--cp", "2", "--cp-algo", "alltoall"], "--heads"),
    ("unknown-algo", 2, ["--cp", "2", "--cp-algo", "tree"], "--cp-algo"),
    ("unknown-layout", 2, ["--cp", "2", "--cp-layout", "striped"], "--cp-layout"),
    ("cp-zero", 1, ["--cp", "0"], "--cp"),
    ("cp-does-not-divide-world", 3, ["--cp", "2"], "--cp"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_command_line(case, run_app, tmp_path):
    _, ranks, args, name = case
    check_rejected(run_app, tmp_path, "cp", ranks, ["--model", "tiny", *args], name)


@pytest.mark.parametrize("app", ["dp", "fsdp", "tp", "pp", "ep"])
@pytest.mark.parametrize("option", [["--cp", "2"], ["--cp-algo", "ring"], ["--cp-layout", "zigzag"]],
                         ids=lambda o: o[0])
def test_cp_options_of_other_apps(app, option, run_app, tmp_path):
    check_rejected(run_app, tmp_path, app, 1, ["--model", "tiny", *option], option[0])
