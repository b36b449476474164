"""parabench-pp (SPEC sections 2.4, 3, 4 and 6; bench/pp/schedule.h, bench/pp/pipeline_parallel.h,
common/trace.cpp): pipeline parallelism with the naive, GPipe, 1F1B and interleaved schedules, combined
with data parallelism.

* every schedule at pp 2 and 4 with m = 1, 4 and 8 micro-batches per step (interleaved, v = 2: m = 4 and
  8, which pp divides), and pp 2 × dp 2 on 4 ranks, trains the model of the single-rank parabench-dp run
  with the same global batch: each step's loss and grad_norm and the final parameter L2 norm within a
  relative 1e-5 (the spec allows 1e-4; they agree to a few 1e-8); so do interleaved and 1F1B runs whose
  boundary messages (64 KiB) exceed MPI's eager limits, where a send-wait cycle would hang;
* /memory/measured agrees with /memory/predicted per rank and category; the model states are exactly
  those of the stage's units; the activations follow the schedule: a stage holds the activations of
  1 (naive), m (gpipe) or min(p − s, m) (1f1b) micro-batches at its peak, measured against the naive
  run of the same layout, which holds exactly one;
* /comm counts the point-to-point messages of the schedule exactly;
* the Chrome trace (--trace) holds, per rank and step, exactly one F and one B span per micro-batch in
  the schedule's order (compared with a Python re-implementation: 1F1B as PipeDream-Flush's in-flight
  limit, interleaved as Megatron-LM's chunk mapping with per-chunk FIFO micro-batch queues), with args
  that name the chunk and virtual stage, and no overlapping spans on a track;
* /pipeline/bubble_fraction: [ranks] values in [0, 1), attribute `theoretical` by the schedule's
  formula; with a core per rank and stages of equal speed, the measured bubble agrees with it on every
  rank (skipped on this project's 2-core test machine);
* bad command lines exit 2 promptly, naming the option, once.
"""

import json
import os
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import padded_vocab, MODEL_STATES, assert_memory_matches_prediction, check_rejected

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "pp"))
import bubble_replay  # noqa: E402

COMM_OPS = ["all_reduce", "reduce_scatter", "all_gather", "all_to_all", "send", "recv", "broadcast"]
STEPS = 3
WARMUP = 1
RTOL = 1e-5
F32 = 4  # bytes
# 8 layers: divisible by pp · v for pp 2 and 4, v 1 and 2. Odd vocabulary, ffn ≠ 4h.
SHAPE = dict(layers=8, hidden=12, heads=3, seq=6, vocab=37, ffn=40)
SHAPE_ARGS = [a for k, v in SHAPE.items() for a in (f"--{k}", v)]


class Layout:
    def __init__(self, ranks, pp, schedule, m, v=1, micro=1):
        self.ranks, self.pp, self.schedule, self.m, self.v, self.micro = ranks, pp, schedule, m, v, micro
        self.dp = ranks // pp
        self.global_batch = m * micro * self.dp
        dp = f"xdp{self.dp}" if self.dp > 1 else ""
        vs = f"-v{v}" if v > 1 else ""
        self.id = f"pp{pp}{dp}-{schedule}{vs}-m{m}"

    def args(self, trace):
        args = [*SHAPE_ARGS, "--pp", self.pp, "--schedule", self.schedule, "--global-batch", self.global_batch,
                "--micro-batch", self.micro, "--steps", STEPS, "--warmup", WARMUP, "--trace", trace]
        if self.v > 1:
            args += ["--virtual-stages", self.v]
        return args

    def stage(self, rank):
        """SPEC 3: rank = dp_i + dp · pp_i (tp = cp = 1)."""
        return rank // self.dp


LAYOUTS = [Layout(pp, pp, s, m) for s in ("naive", "gpipe", "1f1b") for pp in (2, 4) for m in (1, 4, 8)]
LAYOUTS += [Layout(pp, pp, "interleaved", m, v=2) for pp in (2, 4) for m in (4, 8)]
LAYOUTS += [Layout(4, 2, "1f1b", 4), Layout(4, 2, "gpipe", 2), Layout(4, 2, "interleaved", 2, v=2)]
BY_ID = {layout.id: layout for layout in LAYOUTS}
assert len(BY_ID) == len(LAYOUTS)
LAYOUT_IDS = list(BY_ID)
NON_INTERLEAVED_IDS = [i for i in LAYOUT_IDS if BY_ID[i].schedule != "interleaved"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    return tmp_path_factory.mktemp("pp-traces")


@pytest.fixture(scope="module")
def layout_run(cached_run, traces):
    def get(layout_id):
        layout = BY_ID[layout_id]
        run = cached_run("pp", layout.ranks, layout.args(traces / f"{layout_id}.json"))
        run["trace"] = traces / f"{layout_id}.json"
        return run

    return get


@pytest.fixture(scope="module")
def reference(cached_run):
    """The single-rank parabench-dp run with a given global batch (as one micro-batch). One compute thread:
    on a busy machine OpenMP threads that wait for a descheduled sibling make each step take seconds."""

    def get(global_batch):
        return cached_run("dp", 1, [*SHAPE_ARGS, "--global-batch", global_batch, "--micro-batch", global_batch,
                                    "--steps", STEPS, "--warmup", WARMUP, "--threads", 1])

    return get


# ---- the model's units and the stages that hold them ------------------------------------------------------

def unit_parameters(unit):
    """Unit 0 the embeddings, 1..L the blocks, L + 1 the final LayerNorm and the head (SPEC 2), as stored
    (the vocabulary padded)."""
    h, f, V, S, L = SHAPE["hidden"], SHAPE["ffn"], padded_vocab(SHAPE["vocab"]), SHAPE["seq"], SHAPE["layers"]
    if unit == 0:
        return V * h + S * h
    if unit == L + 1:
        return 2 * h + h * V
    return 4 * h + 3 * h * h + 3 * h + h * h + h + h * f + f + f * h + h


def virtual_stage_units(virtual_stages, k):
    """Virtual stage k of n holds blocks [k·L/n, (k+1)·L/n), the first also the embedding, the last the head."""
    L = SHAPE["layers"]
    per = L // virtual_stages
    units = [1 + b for b in range(k * per, (k + 1) * per)]
    if k == 0:
        units.insert(0, 0)
    if k == virtual_stages - 1:
        units.append(L + 1)
    return units


def stage_parameters(layout, stage):
    return sum(unit_parameters(u) for c in range(layout.v)
               for u in virtual_stage_units(layout.pp * layout.v, c * layout.pp + stage))


def test_stages_partition_the_model(num_params):
    total = num_params(SHAPE["layers"], SHAPE["hidden"], SHAPE["seq"], SHAPE["vocab"], SHAPE["ffn"])
    assert sum(unit_parameters(u) for u in range(SHAPE["layers"] + 2)) == total
    for layout in LAYOUTS:
        assert sum(stage_parameters(layout, s) for s in range(layout.pp)) == total, layout.id


# ---- the schedules, re-implemented --------------------------------------------------------------------------

def expected_order(schedule, p, s, m, v=1):
    """The (F|B, micro-batch, chunk) steps of stage s of p.

    naive, gpipe and 1f1b as one rule with an in-flight limit (PipeDream-Flush): run the next forward while
    fewer than `limit` micro-batches await their backward, else the oldest backward; the limit is 1 for
    naive, m for gpipe and p − s for 1f1b (stage s runs p − s − 1 warm-up forwards, then alternates, then
    drains). Interleaved as Megatron-LM's forward_backward_pipelining_with_interleaving: the k-th
    forward runs on chunk (k mod p·v) // p, the k-th backward on v − 1 minus that; each chunk takes its
    micro-batches in order from its own queue; (p − s − 1)·2 + (v − 1)·p warm-up forwards (at most m·v),
    then one forward and one backward alternately, then the remaining backwards."""
    if schedule != "interleaved":
        assert v == 1
        limit = {"naive": 1, "gpipe": m, "1f1b": p - s}[schedule]
        steps, next_forward, waiting = [], 0, []
        while next_forward < m or waiting:
            if next_forward < m and len(waiting) < limit:
                steps.append(("F", next_forward, 0))
                waiting.append(next_forward)
                next_forward += 1
            else:
                steps.append(("B", waiting.pop(0), 0))
        return steps
    total = m * v

    def chunk_id(k, forward):
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    forwards_done, backwards_done = [0] * v, [0] * v

    def forward(k):
        c = chunk_id(k, True)
        forwards_done[c] += 1
        return ("F", forwards_done[c] - 1, c)

    def backward(k):
        c = chunk_id(k, False)
        backwards_done[c] += 1
        return ("B", backwards_done[c] - 1, c)

    warmup = min((p - s - 1) * 2 + (v - 1) * p, total)
    steps = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        steps.append(forward(warmup + k))
        steps.append(backward(k))
    steps += [backward(k) for k in range(total - warmup, total)]
    return steps


def test_reference_schedules_are_sane():
    """The re-implementation itself: every micro-batch forward then backward once per chunk, textbook
    1F1B warm-up, and interleaved chunks in Megatron-LM's order."""
    for schedule, p, m, v in [(s, p, m, 1) for s in ("naive", "gpipe", "1f1b") for p in (2, 4) for m in (1, 4, 8)] + \
                             [("interleaved", p, m, 2) for p in (2, 4) for m in (2, 4, 8) if m % p == 0]:
        for s in range(p):
            order = expected_order(schedule, p, s, m, v)
            assert sorted(order) == sorted((d, i, c) for d in "FB" for i in range(m) for c in range(v))
            for i in range(m):
                for c in range(v):
                    assert order.index(("F", i, c)) < order.index(("B", i, c))
    assert expected_order("1f1b", 4, 0, 8) == [("F", 0, 0), ("F", 1, 0), ("F", 2, 0), ("F", 3, 0), ("B", 0, 0),
                                               ("F", 4, 0), ("B", 1, 0), ("F", 5, 0), ("B", 2, 0), ("F", 6, 0),
                                               ("B", 3, 0), ("F", 7, 0), ("B", 4, 0), ("B", 5, 0), ("B", 6, 0),
                                               ("B", 7, 0)]
    assert [d for d, _, _ in expected_order("1f1b", 4, 3, 8)] == ["F", "B"] * 8
    # pp 2, v 2, m 4, stage 0: 4 warm-up forwards (micro-batches 0, 1 on chunk 0, then on chunk 1)
    assert expected_order("interleaved", 2, 0, 4, 2) == [
        ("F", 0, 0), ("F", 1, 0), ("F", 0, 1), ("F", 1, 1), ("F", 2, 0), ("B", 0, 1), ("F", 3, 0), ("B", 1, 1),
        ("F", 2, 1), ("B", 0, 0), ("F", 3, 1), ("B", 1, 0), ("B", 2, 1), ("B", 3, 1), ("B", 2, 0), ("B", 3, 0)]


def in_flight_peak(layout, stage):
    """Micro-batches whose activations a stage holds at once under its schedule (1 chunk)."""
    return {"naive": 1, "gpipe": layout.m, "1f1b": min(layout.pp - stage, layout.m)}[layout.schedule]


def theoretical_bubble(schedule, p, m, v=1):
    if schedule == "naive":
        return (p - 1) / p
    bubble = (p - 1) / (m + p - 1)
    return bubble / v if schedule == "interleaved" else bubble


# ---- SPEC 2.4: the loss curve of the single-rank run ---------------------------------------------------------

@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_matches_single_rank(layout_id, layout_run, reference):
    layout = BY_ID[layout_id]
    got = layout_run(layout_id)
    ref = reference(layout.global_batch)
    assert got["status"] == "complete"
    c = got["config"]
    assert c["app"] == "pp" and c["schedule"] == layout.schedule
    assert (int(c["world_size"]), int(c["pp"]), int(c["dp"]), int(c["virtual_stages"]), int(c["global_batch"]),
            int(c["micro_batch"]), int(c["grad_accum"])) == \
        (layout.ranks, layout.pp, layout.dp, layout.v, layout.global_batch, layout.micro, layout.m)
    what = f"{layout_id}: {got['command']}"
    assert got["loss"].shape == got["grad_norm"].shape == ref["loss"].shape == (STEPS,), what
    rel = np.abs(got["loss"] - ref["loss"]) / np.abs(ref["loss"])
    assert rel.max() <= RTOL, f"{what}\nloss differs from the single-rank run by {rel.max():.3g} " \
                              f"(step {rel.argmax() + 1})\n{got['loss']}\n{ref['loss']}"
    rel_grad = np.abs(got["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"]
    assert rel_grad.max() <= RTOL, f"{what}\ngrad_norm differs by {rel_grad.max():.3g} (step {rel_grad.argmax() + 1})" \
                                   f"\n{got['grad_norm']}\n{ref['grad_norm']}"
    rel_norm = abs(got["param_norm"] - ref["param_norm"]) / ref["param_norm"]
    assert rel_norm <= RTOL, f"{what}\nfinal_param_norm {got['param_norm']} differs from " \
                             f"{ref['param_norm']} by {rel_norm:.3g}"


def test_reference_is_sane(reference):
    loss = reference(8)["loss"]
    assert np.all(np.isfinite(loss)) and abs(loss[0] - np.log(SHAPE["vocab"])) < 0.1, loss


def test_same_layout_twice_is_bitwise_identical(layout_run, cached_run, traces):
    """SPEC 2.4 (the options in another order, so that the session's cache runs it again)."""
    layout_id = "pp4-1f1b-m4"
    first = layout_run(layout_id)
    args = BY_ID[layout_id].args(traces / "again.json")
    again = cached_run("pp", 4, [*args[-2:], *args[:-2]])
    assert np.array_equal(first["loss"], again["loss"]), (first["loss"], again["loss"])
    assert np.array_equal(first["grad_norm"], again["grad_norm"])
    assert first["param_norm"] == again["param_norm"]


# Boundary messages of micro_batch · seq · hidden · 4 = 64 KiB, above the eager limits of MPI libraries
# (MPICH's shared-memory eager path, Open MPI's 4 KiB): such a send completes only once the receiver has
# posted its receive, so a schedule in which two ranks each wait for their own send before receiving
# the other's message deadlocks here, where the small messages of the layouts above are buffered.
LARGE_SHAPE = dict(layers=8, hidden=64, heads=4, seq=32, vocab=37, ffn=64)
LARGE_MICRO = 8
LARGE = [pytest.param(4, "interleaved", 2, 8, id="pp4-interleaved-v2-m8"),
         pytest.param(2, "interleaved", 2, 4, id="pp2-interleaved-v2-m4"),
         pytest.param(4, "1f1b", 1, 8, id="pp4-1f1b-m8")]


@pytest.mark.parametrize("pp, schedule, v, m", LARGE)
def test_large_messages(pp, schedule, v, m, cached_run):
    """Finishes (within 60 s; a hang fails the test) and trains the single-rank run's model."""
    shape = [a for k, val in LARGE_SHAPE.items() for a in (f"--{k}", val)]
    assert LARGE_MICRO * LARGE_SHAPE["seq"] * LARGE_SHAPE["hidden"] * F32 == 64 * 1024
    G = m * LARGE_MICRO
    args = [*shape, "--pp", pp, "--schedule", schedule, "--global-batch", G, "--micro-batch", LARGE_MICRO,
            "--steps", 2, "--warmup", 1]
    if v > 1:
        args += ["--virtual-stages", v]
    got = cached_run("pp", pp, args, timeout=60)
    ref = cached_run("dp", 1, [*shape, "--global-batch", G, "--micro-batch", G, "--steps", 2, "--warmup", 1,
                               "--threads", 1])
    rel = np.abs(got["loss"] - ref["loss"]) / np.abs(ref["loss"])
    assert rel.max() <= RTOL, (got["loss"], ref["loss"], got["command"])
    assert abs(got["param_norm"] - ref["param_norm"]) <= RTOL * ref["param_norm"], got["command"]
    assert_memory_matches_prediction(got, f"large messages {pp} {schedule} v{v} m{m}")


# ---- SPEC 6: memory -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_memory_matches_prediction(layout_id, layout_run):
    assert_memory_matches_prediction(layout_run(layout_id), layout_id)


@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_model_states_are_the_stages_units(layout_id, layout_run):
    """fp32: parameters and gradients 4·P_stage, AdamW m and v 8·P_stage, no master copy."""
    layout = BY_ID[layout_id]
    run = layout_run(layout_id)
    for kind in ("measured", "predicted"):
        for rank in range(layout.ranks):
            P = stage_parameters(layout, layout.stage(rank))
            expected = {"parameters": F32 * P, "gradients": F32 * P, "optimizer_states": 2 * F32 * P,
                        "master_parameters": 0}
            got = {cat: int(run[kind][cat][rank]) for cat in MODEL_STATES}
            assert got == expected, f"{layout_id} {kind} rank {rank} (stage {layout.stage(rank)})\n{run['command']}"


def naive_layout_id(layout):
    """The naive run with the same stages and micro-batch size (dp does not change a rank's activations)."""
    return f"pp{layout.pp}-naive-m4"


@pytest.mark.parametrize("layout_id", NON_INTERLEAVED_IDS)
def test_activations_follow_the_schedule(layout_id, layout_run):
    """A stage's activation peak is the in-flight count of its schedule times the activations of one
    micro-batch on that stage, which the naive run of the same stages measures (it holds one at a time)."""
    layout = BY_ID[layout_id]
    run = layout_run(layout_id)
    naive_layout = BY_ID[naive_layout_id(layout)]
    naive = layout_run(naive_layout.id)
    for kind in ("measured", "predicted"):
        for rank in range(layout.ranks):
            stage = layout.stage(rank)
            one = int(naive[kind]["activations"][stage])  # naive runs have dp 1: rank = stage
            assert one > 0
            count = in_flight_peak(layout, stage)
            got = int(run[kind]["activations"][rank])
            assert abs(got - count * one) <= 0.10 * count * one, \
                f"{layout_id} {kind} rank {rank} (stage {stage}): activations {got} B, expected {count} × {one} B " \
                f"of the naive run\n{run['command']}"
            assert got == count * one, (layout_id, kind, rank, got, count, one)  # in fact exact


def test_activations_differ_by_schedule_as_expected(layout_run):
    """pp 4, m 8: GPipe holds 8 micro-batches everywhere, 1F1B 4, 3, 2, 1 from the first stage to the last:
    1F1B's memory advantage, measured."""
    gpipe, f1b1, naive = (layout_run(f"pp4-{s}-m8") for s in ("gpipe", "1f1b", "naive"))
    g, f, n = (r["measured"]["activations"] for r in (gpipe, f1b1, naive))
    assert np.all(f <= g) and np.all(n <= f), (n, f, g)
    assert np.all(f[:3] < g[:3]) and f[3] == n[3], (n, f, g)


# ---- SPEC 6: /comm, the schedule's point-to-point messages ---------------------------------------------------

@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_comm_accounting(layout_id, layout_run):
    """Per step and model chunk (virtual stage k of n = p·v): m activations received unless k = 0, m sent
    unless k = n − 1; m output gradients received unless k = n − 1, m input gradients sent unless k = 0;
    each micro_batch·seq·hidden floats. With dp > 1 one all-reduce of the stage's gradients per step."""
    layout = BY_ID[layout_id]
    run = layout_run(layout_id)
    n = layout.pp * layout.v
    message = F32 * layout.micro * SHAPE["seq"] * SHAPE["hidden"]
    for rank in range(layout.ranks):
        stage = layout.stage(rank)
        ks = [c * layout.pp + stage for c in range(layout.v)]
        messages = STEPS * layout.m * sum((k > 0) + (k < n - 1) for k in ks)
        expected_calls = {op: 0 for op in COMM_OPS}
        expected_bytes = {op: 0 for op in COMM_OPS}
        expected_calls["send"] = expected_calls["recv"] = messages
        expected_bytes["send"] = expected_bytes["recv"] = messages * message
        if layout.dp > 1:
            expected_calls["all_reduce"] = STEPS
            expected_bytes["all_reduce"] = STEPS * F32 * stage_parameters(layout, stage)
        got_calls = {op: int(run["calls"][op][rank]) for op in COMM_OPS}
        got_bytes = {op: int(run["bytes"][op][rank]) for op in COMM_OPS}
        assert got_calls == expected_calls, f"{layout_id} rank {rank}: /comm/*/calls\n{run['command']}"
        assert got_bytes == expected_bytes, f"{layout_id} rank {rank}: /comm/*/bytes\n{run['command']}"


# ---- --trace: the schedule as it ran -------------------------------------------------------------------------

def load_trace(path):
    with open(path) as f:
        trace = json.load(f)  # valid JSON
    assert isinstance(trace.get("traceEvents"), list), path
    return trace["traceEvents"]


@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_trace_follows_the_schedule(layout_id, layout_run):
    layout = BY_ID[layout_id]
    run = layout_run(layout_id)
    events = load_trace(run["trace"])
    what = f"{layout_id}: {run['command']}"
    meta = [e for e in events if e.get("ph") == "M"]
    spans = [e for e in events if e.get("ph") == "X"]
    assert len(meta) + len(spans) == len(events), what
    assert sorted({e["pid"] for e in spans}) == list(range(layout.ranks)), what
    for rank in range(layout.ranks):
        names = {(e["name"], e.get("tid")): e["args"] for e in meta if e["pid"] == rank}
        assert names[("process_name", None)]["name"].startswith(f"rank {rank}"), (what, names)
        for tid, track in enumerate(["compute", "communication", "idle"]):
            assert names[("thread_name", tid)] == {"name": track}, (what, rank, names)

    n = layout.pp * layout.v
    for rank in range(layout.ranks):
        stage = layout.stage(rank)
        mine = [e for e in spans if e["pid"] == rank]
        assert {e["tid"] for e in mine} <= {0, 1, 2}, what
        for e in mine:
            assert e["dur"] >= 0 and e["ts"] >= 0, (what, e)
        compute = sorted((e for e in mine if e["tid"] == 0), key=lambda e: e["ts"])
        pipeline = [e for e in compute if re.fullmatch(r"[FB]\d+", e["name"])]
        others = [e["name"] for e in compute if not re.fullmatch(r"[FB]\d+", e["name"])]
        assert others == ["optimizer"] * STEPS, f"{what}\nrank {rank}: other compute spans {others}"
        expected = expected_order(layout.schedule, layout.pp, stage, layout.m, layout.v)
        for step in range(1, STEPS + 1):
            ran = [e for e in pipeline if e["args"]["step"] == step]
            got = [(e["name"][0], int(e["name"][1:]), e["args"]["chunk"]) for e in ran]
            assert got == expected, f"{what}\nrank {rank} (stage {stage}) step {step}: the compute spans ran\n" \
                                    f"{got}\nnot the schedule's\n{expected}"
            for e in ran:
                a = e["args"]
                assert a["micro_batch"] == int(e["name"][1:]), (what, e)
                assert a["virtual_stage"] == a["chunk"] * layout.pp + stage < n, (what, e)
        assert len(pipeline) == STEPS * 2 * layout.m * layout.v, what
        # one track, one thing at a time (a rank runs its schedule on one thread)
        for tid in (0, 1, 2):
            track = sorted((e for e in mine if e["tid"] == tid), key=lambda e: e["ts"])
            for a, b in zip(track, track[1:]):
                assert a["ts"] + a["dur"] <= b["ts"] + 1e-3, \
                    f"{what}\nrank {rank} track {tid}: {a['name']} {a.get('args')} overlaps {b['name']} {b.get('args')}"


# ---- SPEC 6: /pipeline/bubble_fraction -----------------------------------------------------------------------

@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_bubble_fraction_dataset(layout_id, layout_run):
    layout = BY_ID[layout_id]
    run = layout_run(layout_id)
    with h5py.File(run["path"], "r") as f:
        assert "pipeline/bubble_fraction" in f, f"no /pipeline/bubble_fraction\n{run['command']}"
        d = f["pipeline/bubble_fraction"]
        values = d[()]
        attrs = dict(d.attrs)
    units = attrs.get("units")
    assert (units.decode() if isinstance(units, bytes) else units) == "1"
    assert values.dtype == np.float64 and values.shape == (layout.ranks,), (values, run["command"])
    assert np.all((values >= 0) & (values < 1)), (values, run["command"])
    theory = theoretical_bubble(layout.schedule, layout.pp, layout.m, layout.v)
    assert float(attrs["theoretical"]) == pytest.approx(theory, rel=1e-12), (attrs, theory, run["command"])


BALANCED = ["--layers", 8, "--hidden", 256, "--heads", 4, "--seq", 64, "--vocab", 64, "--micro-batch", 1]


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def trace_bubbles(path, ranks, first_step):
    """From a trace, per rank over the steps from first_step on: the compute time of the F and B spans,
    the idle share of the rank's own pipeline window (its first to its last span of the step) and of
    the pipeline's common window (the first span of any rank to the last of any rank)."""
    spans = [e for e in load_trace(path) if e.get("ph") == "X" and "step" in e.get("args", {})
             and e["args"]["step"] >= first_step]
    steps = sorted({e["args"]["step"] for e in spans})
    busy, own, common = (np.zeros((len(steps), ranks)) for _ in range(3))
    for i, step in enumerate(steps):
        window = {}
        for r in range(ranks):
            mine = [e for e in spans if e["pid"] == r and e["args"]["step"] == step]
            window[r] = (min(e["ts"] for e in mine), max(e["ts"] + e["dur"] for e in mine))
            busy[i, r] = sum(e["dur"] for e in mine if e["tid"] == 0)
            own[i, r] = 1 - busy[i, r] / (window[r][1] - window[r][0])
        lo, hi = min(w[0] for w in window.values()), max(w[1] for w in window.values())
        common[i] = 1 - busy[i] / (hi - lo)
    return np.median(busy, axis=0), own.mean(axis=0), common.mean(axis=0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_measured_bubble_matches_theory(schedule, run_app, tmp_path):
    """pp 4, m 8, balanced stages (2 blocks each; the embedding and the small head and vocabulary add
    little): the measured idle share of a step within 0.05 of (p − 1)/(m + p − 1), averaged over the ranks
    and on every rank. In a flushed pipeline every stage idles (p − 1)·(t_f + t_b) per step (Narayanan et
    al. 2021): stage s waits s forward slots for its first input and, after its last backward, s backward
    slots while the stages before it drain; the later stages' share is no smaller than the first's.
    The theory needs stages of equal speed: where the ranks' compute times differ by more than 10 %
    (cores of unequal speed, as on some virtual machines), the test is skipped."""
    pp, m, warmup = 4, 8, 2
    cores = usable_cores()
    if cores < pp:
        pytest.skip(f"this machine has {cores} cores for {pp} ranks: oversubscribed, a rank that waits for a "
                    f"message busy-polls (MPICH) and takes the core of a rank that computes, so the measured "
                    f"bubble says nothing about the schedule")
    path, trace = tmp_path / "bubble.h5", tmp_path / "bubble.json"
    args = [*BALANCED, "--pp", pp, "--schedule", schedule, "--global-batch", m, "--steps", 6, "--warmup", warmup,
            "--threads", 1, "--quiet", "--out", path, "--trace", trace]
    rc, out, err = run_app("pp", pp, args, timeout=120)
    command = " ".join(str(a) for a in run_app.command("pp", pp, args))
    assert rc == 0, run_app.describe(run_app.command("pp", pp, args), rc, out, err)
    with h5py.File(path, "r") as f:
        measured = f["pipeline/bubble_fraction"][()]
        theory = float(f["pipeline/bubble_fraction"].attrs["theoretical"])
    assert theory == pytest.approx(theoretical_bubble(schedule, pp, m))
    busy, own, common = trace_bubbles(trace, pp, warmup + 1)
    if busy.max() > 1.10 * busy.min():
        pytest.skip(f"the stages' compute times per step differ by more than 10 % ({np.round(busy / 1e3, 1)} ms): "
                    f"this machine's cores are not equally fast, and the theory assumes balanced stages")
    what = f"measured bubble {np.round(measured, 3)} (mean {measured.mean():.3f}), theory {theory:.3f}; from " \
           f"the trace, idle share of each rank's own window {np.round(own, 3)}, of the pipeline's common " \
           f"window {np.round(common, 3)}; compute per step {np.round(busy / 1e3, 1)} ms\n{command}"
    assert abs(measured.mean() - theory) <= 0.05, what
    off = [s for s in range(pp) if abs(measured[s] - theory) > 0.05]
    assert not off, f"stages {off}: {what}"


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_measured_bubble_matches_schedule_replay(schedule, run_app, tmp_path):
    """pp 2, m 8, on any machine with a core per rank: the measured idle share of each stage (from the trace,
    over the pipeline's window; mean over the steps) within 0.05 of the steps replayed through the schedule with its own
    measured compute times and instant messages (bench/pp/bubble_replay.py). Unlike the theory, the
    replay holds for stages and micro-batches of unequal speed, so this checks the schedule and the
    measurement where cores are uneven (virtual machines); what it cannot explain is waiting on messages."""
    pp, m, warmup = 2, 8, 2
    if usable_cores() < pp:
        pytest.skip(f"{usable_cores()} core(s) for {pp} ranks")
    path, trace = tmp_path / "bubble.h5", tmp_path / "bubble.json"
    args = [*BALANCED, "--pp", pp, "--schedule", schedule, "--global-batch", m, "--steps", 6, "--warmup", warmup,
            "--threads", 1, "--quiet", "--out", path, "--trace", trace]
    rc, out, err = run_app("pp", pp, args, timeout=120)
    assert rc == 0, run_app.describe(run_app.command("pp", pp, args), rc, out, err)
    command = " ".join(map(str, run_app.command("pp", pp, args)))
    spans = [e for e in load_trace(trace) if e.get("ph") == "X" and e.get("args", {}).get("step", 0) > warmup]
    measured, replayed = [], []
    for step, (tf, tb) in sorted(bubble_replay.step_times(trace, pp, m, warmup).items()):
        mine = [e for e in spans if e["args"]["step"] == step]
        window = max(e["ts"] + e["dur"] for e in mine) - min(e["ts"] for e in mine)  # µs
        busy = [sum(e["dur"] for e in mine if e["pid"] == s and e["tid"] == 0) for s in range(pp)]
        measured.append([1 - b / window for b in busy])
        replayed.append(bubble_replay.replay(schedule, tf, tb, m))
    measured, replayed = np.mean(measured, axis=0), np.mean(replayed, axis=0)  # per stage, over the steps
    assert np.all(np.abs(measured - replayed) <= 0.05), \
        f"measured {np.round(measured, 3)}, replayed {np.round(replayed, 3)} (means over the steps)\n{command}"


def test_schedule_replay_gives_the_theory_for_equal_stages():
    for schedule in ("gpipe", "1f1b"):
        for p, m in ((2, 8), (4, 8), (4, 1), (3, 5)):
            for tf, tb in ((1.0, 2.0), (1.0, 1.0)):
                bubbles = bubble_replay.replay(schedule, [tf] * p, [tb] * p, m)
                assert bubbles == pytest.approx([theoretical_bubble(schedule, p, m)] * p), (schedule, p, m)
    assert bubble_replay.replay("naive", [1.0] * 4, [2.0] * 4, 8) == pytest.approx([0.75] * 4)
    # A stage 30 % slower: every other stage waits for it.
    slow = bubble_replay.replay("1f1b", [1.0, 1.3, 1.0, 1.0], [2.0, 2.6, 2.0, 2.0], 8)
    assert slow[1] < theoretical_bubble("1f1b", 4, 8) < min(slow[0], slow[2], slow[3])


# ---- SPEC 3 to 5: bad command lines ------------------------------------------------------------------------

# (id, ranks, arguments after --model tiny --steps 2 --warmup 1, what stderr must name)
BAD = [
    ("fewer-layers-than-pp", 3, ["--layers", "2", "--pp", "3"], ["--layers 2", "--pp 3"]),
    ("fewer-layers-than-pp-times-v", 2, ["--layers", "3", "--pp", "2", "--schedule", "interleaved",
                                         "--virtual-stages", "2", "--global-batch", "2"],
     ["--layers 3", "--virtual-stages"]),
    ("world-smaller-than-pp", 2, ["--pp", "4"], ["--pp 4"]),
    ("world-not-divisible-by-pp", 4, ["--layers", "6", "--pp", "3"], ["--pp 3"]),
    ("unknown-schedule", 2, ["--pp", "2", "--schedule", "bogus"], ["--schedule bogus"]),
    ("virtual-stages-with-1f1b", 2, ["--pp", "2", "--schedule", "1f1b", "--virtual-stages", "2"],
     ["--virtual-stages 2"]),
    ("interleaved-with-one-virtual-stage", 2, ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "1"],
     ["--schedule interleaved", "--virtual-stages"]),
    ("interleaved-m-not-divisible-by-pp", 2, ["--layers", "4", "--pp", "2", "--schedule", "interleaved",
                                              "--virtual-stages", "2", "--global-batch", "3"], ["--pp 2"]),
    ("virtual-stages-zero", 2, ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "0"],
     ["--virtual-stages 0"]),
    ("dump-gradients-with-pp", 2, ["--pp", "2", "--dump-gradients", "x.h5"], ["--dump-gradients"]),
    ("pp-zero", 2, ["--pp", "0"], ["--pp 0"]),
    ("pp-negative", 2, ["--pp", "-2"], ["--pp"]),
    ("pp-not-a-number", 2, ["--pp", "two"], ["--pp"]),
    ("tp-option", 2, ["--pp", "2", "--tp", "2"], ["--tp"]),
    ("dp-option", 2, ["--pp", "2", "--bucket-mb", "5"], ["--bucket-mb"]),
]


@pytest.mark.parametrize("ranks, args, names", [pytest.param(r, a, n, id=i) for i, r, a, n in BAD])
def test_rejected(ranks, args, names, run_app, tmp_path):
    check_rejected(run_app, tmp_path, "pp", ranks, ["--model", "tiny", "--steps", "2", "--warmup", "1", *args], names)


def test_help_lists_pp_options(run_app, tmp_path):
    rc, out, err = run_app("pp", 1, ["--help"], timeout=20, cwd=tmp_path)
    assert rc == 0, err
    for option in ("--pp", "--schedule", "--virtual-stages", "--dp"):
        assert option in out, option
    words = out.split()
    assert "--tp" not in words and "--shard" not in words and "--bucket-mb" not in words
