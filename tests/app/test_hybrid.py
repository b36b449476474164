"""parabench-hybrid (SPEC sections 2.4, 3, 4 and 6; bench/hybrid/README.md): data (or sharded data), tensor,
pipeline, context and expert parallelism composed on one model.

* the layouts of the issue, on 8 ranks: tp2×pp2×dp2, tp2×cp2×dp2, pp2×cp2×tp2, FULL_SHARD×tp2 (dp 4),
  HYBRID_SHARD×pp2 (dp 4, shard groups of 2), an MoE model with ep2×tp2 and with ep2×pp2 (dp 4: expert
  data parallel 2; its routing statistics equal the single-rank run's),
  tp2×cp2×pp2 with sequence parallelism, FULL_SHARD × tp2 and ZERO1 × tp2 × cp2 with sequence
  parallelism, pp 3 on 3 ranks with uneven stages (1, 2, 1 blocks), and on 16 ranks tp2×cp2×pp2×dp2, each train the single-rank run's model (parabench-dp, or parabench-ep with the same
  experts) with the same global batch: each step's loss and grad norm and the final parameter norm within a
  relative 1e-5 (SPEC 2.4);
* /memory/measured = /memory/predicted exactly per rank for every category but peak_total (an upper bound,
  within 10 %), and the model states are this rank's tp slices of its stage's units (sharded where asked);
* /comm_groups/<group>/<op> (SPEC 6): the bytes and calls of each process group are the formula of each
  strategy: tp's f and g (bench/tp/README.md) on the stage's blocks, cp's ring hops (bench/cp/README.md) of
  this rank's heads, pp's boundary messages, the MoE's all-to-alls, and the gradient reductions over the data
  ranks (dp, or dp × cp: group dp_cp), sharded (FULL_SHARD: dp; HYBRID_SHARD: shard and replicate);
* a layout that does not fit the world, a degree that does not divide what it splits, and the combinations
  the app cannot run exit 2 naming the options.
"""

import math

import numpy as np
import pytest

from conftest import padded_vocab, MODEL_STATES, check_rejected

STEPS = 3
WARMUP = 1
RTOL = 1e-5
F32 = 4
GLOBAL_BATCH = 4
# Tiny: 16 ranks share 2 cores. Vocabulary and FFN divisible by tp 2 only; seq by 2·cp (zigzag).
SHAPE = dict(layers=4, hidden=8, heads=2, seq=8, vocab=34, ffn=24)
SHAPE_ARGS = [a for k, v in SHAPE.items() for a in (f"--{k}", v)]
MOE = dict(experts=4, top_k=2, capacity_factor=0)  # dropless: capacity = the micro-batch's tokens
MOE_ARGS = ["--experts", MOE["experts"], "--top-k", MOE["top_k"], "--capacity-factor", MOE["capacity_factor"]]
COMM_OPS = ["all_reduce", "reduce_scatter", "all_gather", "all_to_all", "send", "recv", "broadcast"]


class Layout:
    def __init__(self, layout_id, ranks, tp=1, pp=1, cp=1, ep=1, micro=1, shard="NO_SHARD", group=0, moe=False,
                 sp=False):
        self.id, self.ranks, self.tp, self.pp, self.cp, self.ep, self.sp = layout_id, ranks, tp, pp, cp, ep, sp
        self.micro, self.shard, self.group, self.moe = micro, shard, group, moe
        self.dp = ranks // (tp * pp * cp)
        self.m = GLOBAL_BATCH // (micro * self.dp)  # micro-batches per step

    def args(self):
        args = [*SHAPE_ARGS, "--global-batch", GLOBAL_BATCH, "--micro-batch", self.micro, "--steps", STEPS,
                "--warmup", WARMUP, "--tp", self.tp, "--pp", self.pp, "--cp", self.cp, "--shard", self.shard]
        if self.group:
            args += ["--shard-group", self.group]
        if self.moe:
            args += ["--moe", "--ep", self.ep, *MOE_ARGS]
        if self.sp:
            args.append("--sequence-parallel")
        return args

    def coord(self, rank):
        """SPEC 3: rank = tp_i + tp·(cp_i + cp·(dp_i + dp·pp_i))."""
        tp_i, rest = rank % self.tp, rank // self.tp
        cp_i, rest = rest % self.cp, rest // self.cp
        return dict(tp=tp_i, cp=cp_i, dp=rest % self.dp, pp=rest // self.dp)


LAYOUTS = [
    Layout("tp2xpp2xdp2", 8, tp=2, pp=2),
    Layout("tp2xcp2xdp2", 8, tp=2, cp=2),
    Layout("pp2xcp2xtp2", 8, tp=2, pp=2, cp=2),
    Layout("fullshard-tp2xdp4", 8, tp=2, shard="FULL_SHARD"),
    Layout("hybridshard-pp2xdp4", 8, pp=2, shard="HYBRID_SHARD", group=2),
    Layout("moe-ep2xtp2xdp4", 8, tp=2, ep=2, moe=True),
    Layout("moe-ep2xpp2xdp4", 8, pp=2, ep=2, moe=True),
    Layout("tp2xcp2xpp2xdp2", 16, tp=2, pp=2, cp=2),
    Layout("sp-tp2xcp2xpp2", 8, tp=2, pp=2, cp=2, sp=True),
    Layout("uneven-pp3", 3, pp=3),  # 4 layers on 3 stages: 1, 2, 1 blocks
    Layout("fullshard-sp-tp2xdp4", 8, tp=2, shard="FULL_SHARD", sp=True),
    Layout("zero1-sp-tp2xcp2xdp2", 8, tp=2, cp=2, shard="ZERO1", sp=True),
]
BY_ID = {layout.id: layout for layout in LAYOUTS}
LAYOUT_IDS = list(BY_ID)


@pytest.fixture(scope="module")
def layout_run(cached_run):
    def get(layout_id):
        layout = BY_ID[layout_id]
        return cached_run("hybrid", layout.ranks, layout.args(), timeout=240)

    return get


@pytest.fixture(scope="module")
def reference(cached_run):
    """The single-rank run of the same model and global batch (one micro-batch, one thread)."""

    def get(moe):
        base = [*SHAPE_ARGS, "--global-batch", GLOBAL_BATCH, "--micro-batch", GLOBAL_BATCH, "--steps", STEPS,
                "--warmup", WARMUP, "--threads", 1]
        return cached_run("ep", 1, [*base, *MOE_ARGS]) if moe else cached_run("dp", 1, base)

    return get


# ---- SPEC 2.4: the single-rank model, trained -----------------------------------------------------------

@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_matches_single_rank(layout_id, layout_run, reference):
    layout = BY_ID[layout_id]
    got, ref = layout_run(layout_id), reference(layout.moe)
    c = got["config"]
    assert (int(c["tp"]), int(c["pp"]), int(c["cp"]), int(c["dp"])) == (layout.tp, layout.pp, layout.cp, layout.dp)
    for key in ("loss", "grad_norm"):
        rel = np.abs(got[key] - ref[key]) / np.abs(ref[key])
        assert rel.max() <= RTOL, f"{layout_id} {key} differs by {rel.max():.3g}\n{got[key]}\n{ref[key]}\n{got['command']}"
    assert abs(got["param_norm"] - ref["param_norm"]) <= RTOL * ref["param_norm"], got["command"]


@pytest.mark.parametrize("layout_id", [i for i in LAYOUT_IDS if BY_ID[i].moe])
def test_moe_routing_matches_single_rank(layout_id, layout_run, reference):
    """/moe/tokens_per_expert [steps, layers, experts]: every layer's, summed over dp and the stages, as the
    single-rank run routed them (dropless: nothing dropped)."""
    import h5py

    got, ref = layout_run(layout_id), reference(True)
    with h5py.File(got["path"], "r") as a, h5py.File(ref["path"], "r") as b:
        assert np.array_equal(a["moe/tokens_per_expert"][()], b["moe/tokens_per_expert"][()])
        assert a["moe/dropped"][()].sum() == 0


def test_reference_learns(reference):
    ref = reference(False)
    assert ref["loss"][-1] < ref["loss"][0] and math.isclose(ref["loss"][0], math.log(SHAPE["vocab"]), rel_tol=0.05)


# ---- the parameters of a rank ----------------------------------------------------------------------------

def unit_parameters(layout):
    """This tp rank's parameters of each unit (embedding, blocks, head), and of each block its replicated part
    and its experts (MoE: attention sliced, experts whole on every tp rank)."""
    h, f, S, L = (SHAPE[k] for k in ("hidden", "ffn", "seq", "layers"))
    t = layout.tp
    V = padded_vocab(SHAPE["vocab"], t)  # as stored: a multiple of 128 · tp (SPEC 2)
    embed = V // t * h + S * h
    attention = 2 * h + h * 3 * h // t + 3 * h // t + h // t * h + h + 2 * h  # ln1, qkv, out, ln2
    if layout.moe:
        E = MOE["experts"]
        replicated = attention + h * E  # + the router
        experts = E // layout.ep * (h * f + f + f * h + h)
    else:
        replicated, experts = attention + h * f // t + f // t + f // t * h + h, 0
    head = 2 * h + h * V // t
    return [embed] + [replicated + experts] * L + [head], replicated, experts


def stage_blocks(layout):
    """bench/pp/pipeline_plan.h: ceil(L/p) blocks per stage, one fewer on as many stages as L falls short of
    p·ceil(L/p), taken in the order 0, p − 1, 1, p − 2, ..."""
    L, p = SHAPE["layers"], layout.pp
    most = -(-L // p)
    order, lo, hi = [], 0, p - 1
    while lo <= hi:
        order += [lo] if lo == hi else [lo, hi]
        lo, hi = lo + 1, hi - 1
    fewer = set(order[:most * p - L])
    return [most - (s in fewer) for s in range(p)]


def stage_units(layout, stage):
    blocks = stage_blocks(layout)
    first = sum(blocks[:stage])
    units = [1 + b for b in range(first, first + blocks[stage])]
    if stage == 0:
        units.insert(0, 0)
    if stage == layout.pp - 1:
        units.append(SHAPE["layers"] + 1)
    return units


def shard_of(n, ranks):
    return -(-n // ranks)


def layernorm_pieces(layout, unit, first, count):
    """The sizes of the LayerNorm tensors' pieces (g and b: h each) inside [first, first + count) of a unit's
    flat elements (common/model.cpp's order: ln1.g, ln1.b, attention, ln2.g, ln2.b, the MLP; the head
    unit final_ln.g, final_ln.b, head.w)."""
    h, L = SHAPE["hidden"], SHAPE["layers"]
    if unit == 0:
        return []
    if unit == L + 1:
        spans = [(0, h), (h, 2 * h)]
    else:
        attention = h * 3 * h // layout.tp + 3 * h // layout.tp + h // layout.tp * h + h
        spans = [(0, h), (h, 2 * h), (2 * h + attention, 3 * h + attention), (3 * h + attention, 4 * h + attention)]
    pieces = [min(hi, first + count) - max(lo, first) for lo, hi in spans]
    return [n for n in pieces if n > 0]


def shard_ranks(layout):
    data_ranks = layout.dp * layout.cp
    return {"NO_SHARD": 1, "ZERO1": data_ranks, "FULL_SHARD": data_ranks, "HYBRID_SHARD": layout.group}[layout.shard]


@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_memory_matches_prediction(layout_id, layout_run):
    layout = BY_ID[layout_id]
    run = layout_run(layout_id)
    for cat in MODEL_STATES + ["activations", "comm_buffers", "workspace"]:
        assert np.array_equal(run["measured"][cat], run["predicted"][cat]), \
            f"{layout_id} {cat}: measured {run['measured'][cat]}, predicted {run['predicted'][cat]}\n{run['command']}"
    m, p = run["measured"]["peak_total"], run["predicted"]["peak_total"]
    assert np.all(m <= p) and np.all(p <= 1.10 * m), (layout_id, m, p)  # the peaks summed: an upper bound
    units, _, _ = unit_parameters(layout)
    n = shard_ranks(layout)
    for rank in range(layout.ranks):
        held = [units[u] for u in stage_units(layout, layout.coord(rank)["pp"])]
        own = sum(shard_of(u, n) for u in held)  # this rank's shards (n = 1: the units whole)
        whole = sum(shard_of(u, n) * n for u in held) if layout.shard == "ZERO1" else sum(held)  # padded
        params = own if layout.shard in ("FULL_SHARD", "HYBRID_SHARD") else whole
        expected = {"parameters": F32 * params, "gradients": F32 * params, "optimizer_states": 2 * F32 * own,
                    "master_parameters": 0}
        got = {cat: int(run["measured"][cat][rank]) for cat in MODEL_STATES}
        assert got == expected, f"{layout_id} rank {rank}: {got} != {expected}\n{run['command']}"


# ---- SPEC 6: /comm_groups, each strategy's formula ---------------------------------------------------------

def expected_groups(layout, rank):
    """{group: {op: (calls, bytes)}} of one rank over the run (host reductions of norms and losses are not
    communicator traffic)."""
    h, S, L = SHAPE["hidden"], SHAPE["seq"], SHAPE["layers"]
    c = layout.coord(rank)
    m, N = layout.m, layout.micro * S // layout.cp  # micro-batches per step; a rank's tokens of one
    units, replicated, experts = unit_parameters(layout)
    held = stage_units(layout, c["pp"])
    first, last = c["pp"] == 0, c["pp"] == layout.pp - 1
    blocks = stage_blocks(layout)[c["pp"]]
    out = {}

    def add(group, op, calls, nbytes):
        if calls:
            prev = out.setdefault(group, {}).get(op, (0, 0))
            out[group][op] = (prev[0] + STEPS * calls, prev[1] + STEPS * nbytes)

    if layout.tp > 1 and layout.sp:  # bench/tp/README.md with sequence parallelism, on the stage's units
        add("tp", "all_gather", m * (6 * blocks + 2 * last + first), m * F32 * N * h * (6 * blocks + 2 * last + first))
        add("tp", "reduce_scatter", m * (4 * blocks + first + last), m * F32 * N * h * (4 * blocks + first + last))
        add("tp", "all_reduce", m * 2 * last, m * F32 * 3 * N * last)  # the softmax's max and sums
        if layout.shard == "NO_SHARD":  # each LayerNorm's g and b summed over tp once per step (sharded: below)
            layernorms = 4 * blocks + 2 * last
            add("tp", "all_reduce", layernorms, layernorms * F32 * h)
    elif layout.tp > 1:  # bench/tp/README.md without sequence parallelism; the MoE part has no f or g
        per_block = 2 if layout.moe else 4
        calls = first + per_block * blocks + 3 * last
        nbytes = F32 * (N * h * (first + per_block * blocks + last) + 3 * N * last)
        add("tp", "all_reduce", m * calls, m * nbytes)
    if layout.cp > 1:  # ring: 3·cp − 2 hops per block and micro-batch of this rank's K|V (2h/tp wide)
        hops = m * blocks * (3 * layout.cp - 2)
        for op in ("send", "recv"):
            add("cp", op, hops, hops * F32 * N * 2 * h // layout.tp)
    if layout.pp > 1:  # one boundary (this rank's rows: N, or N/tp with SP, × h) each way per micro-batch
        messages = m * ((not first) + (not last))
        rows = N // layout.tp if layout.sp else N
        for op in ("send", "recv"):
            add("pp", op, messages, messages * F32 * rows * h)
    if layout.moe and layout.ep > 1:  # dispatch and combine, forward and backward; C = N (dropless)
        n = m * blocks * 4
        add("ep", "all_to_all", n, n * F32 * MOE["experts"] * N * h)
    data = "dp_cp" if layout.cp > 1 else "dp"
    if layout.moe:  # bench/ep/README.md: replicated runs over dp, experts over their holders, on the stage's
        # units: the embedding joins the first block's replicated run, the head is a run of its own
        if layout.dp > 1:
            add("dp", "all_reduce", blocks + last, F32 * (units[0] * first + blocks * replicated + units[-1] * last))
        if layout.dp // layout.ep > 1:
            add("expert_dp", "all_reduce", blocks, F32 * blocks * experts)
    elif layout.shard == "NO_SHARD":
        if layout.dp * layout.cp > 1:  # one all-reduce of the stage's slices over the data ranks
            add(data, "all_reduce", 1, F32 * sum(units[u] for u in held))
    else:
        # FSDP (bench/fsdp/README.md) with backward right after forward (pp 1, or one micro-batch): per
        # micro-batch each unit gathered for its forward and again for its backward but the last, kept;
        # each unit's gradient reduce-scattered; gathers and reduce-scatters count the whole padded unit.
        # ZERO1: each unit's gradient reduce-scattered on the last micro-batch and its updated shard gathered
        # back after the step.
        assert layout.pp == 1 or m == 1
        n = shard_ranks(layout)
        padded = [shard_of(units[u], n) * n for u in held]
        group = "shard" if layout.shard == "HYBRID_SHARD" else data
        if layout.shard == "ZERO1":
            add(group, "reduce_scatter", len(held), F32 * sum(padded))
            add(group, "all_gather", len(held), F32 * sum(padded))
        else:
            add(group, "all_gather", m * (2 * len(held) - 1), m * F32 * (2 * sum(padded) - padded[-1]))
            add(group, "reduce_scatter", m * len(held), m * F32 * sum(padded))
        if layout.shard == "HYBRID_SHARD":  # the shards summed over the groups, once per step
            add("replicate", "all_reduce", 1, F32 * sum(shard_of(units[u], n) for u in held))
        if layout.sp:  # the LayerNorm pieces of this rank's shards summed over tp, once per step
            data_rank = c["dp"] * layout.cp + c["cp"]  # its place in the data ranks (cp inside dp)
            shard_rank = data_rank % n
            for u in held:
                k = shard_of(units[u], n)
                first = min(units[u], shard_rank * k)
                for piece in layernorm_pieces(layout, u, first, min(units[u], first + k) - first):
                    add("tp", "all_reduce", 1, F32 * piece)
    return out


@pytest.mark.parametrize("layout_id", LAYOUT_IDS)
def test_comm_groups_match_formula(layout_id, layout_run):
    import h5py

    layout = BY_ID[layout_id]
    run = layout_run(layout_id)
    with h5py.File(run["path"], "r") as f:
        got_groups = {g: {op: (f[f"comm_groups/{g}/{op}/calls"][()], f[f"comm_groups/{g}/{op}/bytes"][()])
                          for op in f[f"comm_groups/{g}"]} for g in f["comm_groups"]}
    for rank in range(layout.ranks):
        expected = expected_groups(layout, rank)
        got = {g: {op: (int(c[rank]), int(b[rank])) for op, (c, b) in ops.items() if c[rank] > 0}
               for g, ops in got_groups.items()}
        got = {g: ops for g, ops in got.items() if ops}
        assert got == expected, f"{layout_id} rank {rank}: /comm_groups\n{got}\n!=\n{expected}\n{run['command']}"
    for op in COMM_OPS:  # /comm is their sum
        total = np.zeros(layout.ranks, dtype=np.int64)
        for ops in got_groups.values():
            if op in ops:
                total += ops[op][1]
        assert np.array_equal(run["bytes"][op], total), (layout_id, op)


def test_pipeline_bubble_written(layout_run):
    import h5py

    run = layout_run("tp2xpp2xdp2")
    with h5py.File(run["path"], "r") as f:
        bubble = f["pipeline/bubble_fraction"]
        assert bubble.shape == (8,) and np.all((bubble[()] >= 0) & (bubble[()] < 1))
        assert bubble.attrs["theoretical"] == pytest.approx(1 / 3)  # 1F1B, p 2, m 2: (p − 1)/(m + p − 1)


# ---- bad command lines ---------------------------------------------------------------------------------------

TINY = [*SHAPE_ARGS, "--steps", 1, "--warmup", 0]


def tiny(**shape):
    """TINY with some of the model's shape options replaced (an option given twice is a parse error)."""
    merged = {**SHAPE, **shape}
    return [a for k, v in merged.items() for a in (f"--{k}", v)] + ["--steps", 1, "--warmup", 0]


BAD = [
    ("world-not-product", 6, ["--tp", 2, "--pp", 2, "--cp", 2], ["--tp 2", "--pp 2", "--cp 2"]),
    ("heads-not-divisible", 4, ["--tp", 4], "--heads"),
    ("fewer-layers-than-stages", 4, [*tiny(layers=3), "--pp", 4], ["--layers 3", "--pp 4"]),
    ("seq-not-divisible-by-cp", 4, [*tiny(seq=12), "--cp", 4], ["--seq 12", "2 × --cp"]),
    ("shard-group-not-dividing-data-ranks", 8, ["--tp", 2, "--cp", 2, "--shard", "HYBRID_SHARD", "--shard-group", 3],
     ["--shard-group 3", "the data ranks dp × cp 4"]),
    ("experts-not-divisible-by-ep", 4, ["--moe", "--ep", 4, "--experts", 6], "--experts"),
    ("ep-without-moe", 4, ["--ep", 2], ["--ep", "--moe"]),
    ("moe-with-cp", 4, ["--moe", "--cp", 2], ["--moe", "--cp"]),
    ("shard-group-not-dividing", 4, ["--shard", "HYBRID_SHARD", "--shard-group", 3], "--shard-group"),
    ("alltoall-heads", 4, ["--tp", 2, "--cp", 2, "--cp-algo", "alltoall"], ["--heads", "--cp"]),
]


@pytest.mark.parametrize("ranks,args,names", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_rejected(ranks, args, names, run_app, tmp_path):
    shape = [] if "--steps" in args else TINY  # the cases that change the shape carry their own
    check_rejected(run_app, tmp_path, "hybrid", ranks, [*shape, *[str(a) for a in args]], names)


def test_help_lists_every_degree(run_app, tmp_path):
    rc, out, _ = run_app("hybrid", 1, ["--help"], cwd=tmp_path)
    assert rc == 0
    for option in ("--tp", "--sequence-parallel", "--pp", "--schedule", "--virtual-stages", "--cp", "--cp-algo",
                   "--moe", "--ep", "--experts", "--shard", "--shard-group"):
        assert option in out, option
