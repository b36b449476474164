"""parabench-plan run as a user runs it: its three output formats parse, a sweep gives one row per
value, the ZeRO paper's table comes out of one command, bad plans exit 2 with a message that names the
option and the rule, a plan that does not fit --gpu-memory says by how much, a tp, pp, ep or cp plan
is what parabench-tp, parabench-pp, parabench-ep or parabench-cp itself predicts and communicates (its
--dry-run table and its result file), and --calibration reads parabench-micro result files (written here
with h5py, following the schema of SPEC 6's /micro) and refuses anything else with exit 2.

Environment: PB_PLAN, PB_TP, PB_PP, PB_EP, PB_CP, the parabench-plan, -tp, -pp, -ep and -cp binaries (default
<PB_BIN_DIR>/<app>/parabench-<app>, PB_BIN_DIR defaulting to <repo>/build/bench); PB_MPIEXEC, the MPI
launcher (default mpiexec).
"""

import csv
import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"
import h5py  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench")))
PLAN = Path(os.environ.get("PB_PLAN", str(BIN_DIR / "plan" / "parabench-plan")))
CATEGORIES = ["parameters", "master_parameters", "gradients", "optimizer_states", "activations", "comm_buffers",
              "workspace"]
TP_APP = Path(os.environ.get("PB_TP", str(BIN_DIR / "tp" / "parabench-tp")))
EP_APP = Path(os.environ.get("PB_EP", str(BIN_DIR / "ep" / "parabench-ep")))
CP_APP = Path(os.environ.get("PB_CP", str(BIN_DIR / "cp" / "parabench-cp")))
PP_APP = Path(os.environ.get("PB_PP", str(BIN_DIR / "pp" / "parabench-pp")))
MPIEXEC = os.environ.get("PB_MPIEXEC", "mpiexec")
DROPPED_ENV_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "PARABENCH_", "HYDRA_", "MPIR_")
LLAMA_405B_ON_1024 = ["--model", "llama3-405b", "--app", "fsdp", "--gpus", "1024", "--shard", "FULL_SHARD",
                      "--dtype", "bf16"]


def plan(*args, timeout=10):
    if not PLAN.is_file():
        pytest.fail(f"{PLAN} does not exist: build it (cmake --build build) or set PB_PLAN")
    return subprocess.run([str(PLAN), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def ok(*args):
    result = plan(*args)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def csv_rows(*args):
    return list(csv.DictReader(io.StringIO(ok(*args, "--format", "csv").stdout)))


def json_plans(*args):
    return json.loads(ok(*args, "--format", "json").stdout)["plans"]


def run_app(app, *args, ranks=4, timeout=120):
    """mpiexec -n RANKS APP ARGS, in an environment without the shell's Slurm or PMI variables."""
    if not app.is_file():
        pytest.fail(f"{app} does not exist: build it (cmake --build build --target {app.name}) or set "
                    f"PB_{app.name.split('-')[-1].upper()} or PB_BIN_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV_PREFIXES)}
    env["HDF5_USE_FILE_LOCKING"] = "FALSE"
    result = subprocess.run([MPIEXEC, "-n", str(ranks), str(app), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def run_tp_app(*args, ranks=4, timeout=120):
    return run_app(TP_APP, *args, ranks=ranks, timeout=timeout)


def run_ep_app(*args, ranks=4, timeout=120):
    return run_app(EP_APP, *args, ranks=ranks, timeout=timeout)


def run_cp_app(*args, ranks=4, timeout=120):
    return run_app(CP_APP, *args, ranks=ranks, timeout=timeout)


def dry_run_table(stdout):
    """{rank: {category: "MiB with two decimals"}} from the table of an app's --dry-run."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("dry run: configuration valid"))
    names = lines[start + 1].split()
    assert names[0] == "rank" and names[1:] == CATEGORIES + ["peak_total"], names
    table = {}
    for line in lines[start + 2:]:
        fields = line.split()
        if not fields or not fields[0].isdigit():
            break
        table[int(fields[0])] = dict(zip(names[1:], fields[1:len(names)]))
    return table


def test_single_plan_table_lists_every_category_and_the_cluster_total():
    out = ok("--model", "gpt2-124m", "--app", "fsdp", "--gpus", "16").stdout
    for name in CATEGORIES + ["peak_total", "cluster (16 ranks)", "bytes per parameter", "step-time estimate"]:
        assert name in out, name
    assert "not a measurement" in out


def test_micro_batch_sweep_gives_four_rows_in_every_format():
    sweep = ["--sweep", "micro-batch=1,2,4,8"]
    rows = csv_rows(*LLAMA_405B_ON_1024, *sweep)
    assert [int(r["micro_batch"]) for r in rows] == [1, 2, 4, 8]
    activations = [int(r["activations_bytes"]) for r in rows]
    assert activations == [activations[0] * b for b in (1, 2, 4, 8)]
    assert len({r["optimizer_states_bytes"] for r in rows}) == 1
    for r in rows:
        assert int(r["cluster_peak_total_bytes"]) == int(r["peak_total_bytes"]) * 1024
        assert int(r["peak_total_bytes"]) >= sum(int(r[c + "_bytes"]) for c in CATEGORIES[:4])

    doc = json.loads(ok(*LLAMA_405B_ON_1024, *sweep, "--format", "json").stdout)
    assert [p["swept"]["micro-batch"] for p in doc["plans"]] == ["1", "2", "4", "8"]
    assert doc["sweeps"] == [{"key": "micro-batch", "values": ["1", "2", "4", "8"]}]
    for p, r in zip(doc["plans"], rows):
        assert p["memory_per_rank"]["peak_total"] == int(r["peak_total_bytes"])
        assert p["time_estimate"]["step_s"] > 0

    table = ok(*LLAMA_405B_ON_1024, *sweep).stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("micro-batch "))
    body = [line.split()[0] for line in table[header + 1:header + 5]]
    assert body == ["1", "2", "4", "8"]
    assert not table[header + 5].strip(), "exactly four rows"


def test_shard_sweep_reproduces_the_zero_paper_table():
    # Rajbhandari et al. 2020, figure 1: 7.5B parameters, 64 GPUs, 2 + 2 + 12 bytes per parameter.
    rows = csv_rows("--params", "7.5e9", "--app", "fsdp", "--gpus", "64", "--grad-dtype", "bf16",
                    "--sweep", "shard=NO_SHARD,ZERO1,SHARD_GRAD_OP,FULL_SHARD")
    gigabytes = [round(sum(int(r[c + "_bytes"]) for c in CATEGORIES[:4]) / 1e9, 1) for r in rows]
    assert gigabytes == [120.0, 31.4, 16.6, 1.9]
    assert [float(r["model_state_bytes_per_param"]) for r in rows][0] == 16


def test_cartesian_product_of_two_sweeps():
    rows = csv_rows("--model", "llama3-8b", "--app", "fsdp", "--gpus", "64", "--shard-group", "8",
                    "--sweep", "shard=NO_SHARD,FULL_SHARD,HYBRID_SHARD", "--sweep", "recompute=none,full")
    assert [(r["shard"], r["recompute"]) for r in rows] == [
        (s, m) for s in ("NO_SHARD", "FULL_SHARD", "HYBRID_SHARD") for m in ("none", "full")]
    assert [int(r["shard_ranks"]) for r in rows] == [1, 1, 64, 64, 8, 8]


def test_plan_that_does_not_fit_says_by_how_much():
    result = ok("--model", "llama3-70b", "--app", "fsdp", "--shard", "NO_SHARD", "--gpus", "8", "--gpu-memory", "80")
    assert "does not fit: needs " in result.stdout
    assert "more than --gpu-memory 80" in result.stdout

    strict = plan("--model", "llama3-70b", "--app", "fsdp", "--shard", "NO_SHARD", "--gpus", "8",
                  "--gpu-memory", "80", "--require-fit")
    assert strict.returncode == 1

    # CSV stays parseable; the verdict goes to stderr, and the row carries it.
    result = plan(*LLAMA_405B_ON_1024, "--gpu-memory", "80", "--sweep", "recompute=none,full", "--format", "csv")
    assert result.returncode == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["fits"] for r in rows] == ["false", "true"], "full recomputation brings llama3-405b under 80 GiB"
    excess = int(rows[0]["excess_bytes"])
    assert excess == int(rows[0]["peak_total_bytes"]) - 80 * 2**30
    assert "recompute=none: does not fit: needs" in result.stderr
    assert "recompute=full" not in result.stderr
    assert rows[1]["excess_bytes"] == "0"

    fits = ok("--model", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80", "--require-fit")
    assert "fits --gpu-memory 80" in fits.stdout


@pytest.mark.parametrize("args, message", [
    (["--gpus", "12", "--dp", "8"], "--gpus 12 is not divisible by --dp 8"),
    (["--app", "fsdp", "--gpus", "12", "--shard", "HYBRID_SHARD", "--shard-group", "5"],
     "--shard-group 5 does not divide dp 12"),
    (["--app", "fsdp", "--shard", "HYBRID_SHARD"], "--shard HYBRID_SHARD needs --shard-group"),
    (["--model", "llama3-8b", "--kv-heads", "5"], "--heads 32 is not divisible by --kv-heads 5"),
    (["--model", "tiny", "--hidden", "66"], "--hidden 66 is not divisible by --heads 4"),
    (["--app", "hybrid", "--moe"], "--app hybrid --moe: not modelled yet"),
    (["--model", "llama3-70b", "--app", "tp", "--gpus", "48", "--tp", "3"], "--heads 64 is not divisible by --tp 3"),
    (["--model", "gpt3-175b", "--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by 0 must be at least 1"),
    (["--model", "llama3-70b", "--app", "tp", "--gpus", "12", "--tp", "8"], "--gpus 12 is not divisible by --tp 8"),
    (["--model", "llama3-8b", "--app", "tp", "--gpus", "16", "--tp", "16"], "--kv-heads 8 is not divisible by --tp 16"),
    (["--model", "tiny", "--seq", "31", "--app", "tp", "--tp", "2", "--sequence-parallel"],
     "--micro-batch × --seq 31 is not divisible by --tp 2"),
    (["--app", "fsdp", "--gpus", "16", "--tp", "2"], "fsdp with tp > 1 is --app hybrid"),
    (["--dtype", "fp16"], "--dtype fp16 must be fp32 or bf16"),
    (["--dtype", "fp32", "--grad-dtype", "bf16"], "--grad-dtype bf16 needs --dtype bf16"),
    (["--sweep", "colour=red"], "colour is not an option a sweep can vary"),
    (["--gpus", "8", "--sweep", "micro-batch=1,0"], "--sweep micro-batch=0: --micro-batch 0 must be at least 1"),
    (["--no-such-option"], "--no-such-option"),
    (["--app", "ep", "--gpus", "4", "--experts", "6", "--ep", "4"], "--experts 6 is not divisible by --ep 4"),
    (["--app", "ep", "--gpus", "6", "--ep", "4"], "--ep 4 does not divide the data-parallel degree 6"),
    (["--app", "ep", "--top-k", "9"], "--top-k 9 must be between 1 and --experts 8"),
    (["--app", "ep", "--top-k", "0"], "--top-k 0 must be between 1 and --experts 8"),
    (["--app", "ep", "--capacity-factor=-0.5"], "--capacity-factor -0.5 must be 0 (no limit) or positive"),
    (["--app", "ep", "--aux-loss=-1"], "--aux-loss -1 must be 0 (none) or positive"),
    (["--app", "ep", "--gpus", "4", "--tp", "2"], "--tp 2 is a degree of --app tp; --app ep has no tensor parallelism"),
    (["--app", "ep", "--gpus", "4", "--pp", "2"], "--pp 2 is a degree of --app pp; --app ep has no pipeline parallelism"),
    (["--app", "ep", "--shard", "FULL_SHARD"], "--shard is an option of --app fsdp, not of --app ep"),
    (["--gpus", "4", "--ep", "2"], "--ep 2 is a degree of --app ep; --app dp has no expert parallelism"),
    (["--app", "fsdp", "--experts", "4"], "--experts is an option of --app ep, not of --app fsdp"),
    (["--app", "tp", "--tp", "2", "--capacity-factor", "1.5"],
     "--capacity-factor is an option of --app ep, not of --app tp"),
    (["--model", "tiny", "--app", "cp", "--gpus", "6", "--cp", "3"],
     "--seq 32 is not divisible by 6 (--cp-layout zigzag splits each sequence into 2 × --cp chunks)"),
    (["--model", "tiny", "--seq", "30", "--app", "cp", "--gpus", "4", "--cp", "4", "--cp-layout", "contiguous"],
     "--seq 30 is not divisible by 4 (--cp-layout contiguous splits each sequence into --cp chunks)"),
    (["--model", "tiny", "--app", "cp", "--gpus", "8", "--cp", "8", "--cp-algo", "alltoall"],
     "--heads 4 is not divisible by --cp 8 (--cp-algo alltoall gives each rank heads/cp heads)"),
    (["--app", "cp", "--cp-algo", "tree"], "--cp-algo tree must be ring, allgather or alltoall"),
    (["--app", "cp", "--cp-layout", "striped"], "--cp-layout striped must be zigzag or contiguous"),
    (["--app", "cp", "--gpus", "6", "--cp", "4"], "--gpus 6 is not divisible by --cp 4 (dp = ranks / cp)"),
    (["--app", "cp", "--cp", "2", "--tp", "2"], "--tp 2 is a degree of --app tp; --app cp has no tensor parallelism"),
    (["--app", "cp", "--cp", "2", "--pp", "2"], "--pp 2 is a degree of --app pp; --app cp has no pipeline parallelism"),
    (["--app", "cp", "--cp", "2", "--ep", "2"], "--ep 2 is a degree of --app ep; --app cp has no expert parallelism"),
    (["--app", "cp", "--shard", "FULL_SHARD"], "--shard is an option of --app fsdp, not of --app cp"),
    (["--app", "cp", "--experts", "4"], "--experts is an option of --app ep, not of --app cp"),
    (["--gpus", "4", "--cp", "2"], "--cp 2 is a degree of --app cp; --app dp has no context parallelism"),
    (["--app", "fsdp", "--cp-algo", "ring"], "--cp-algo is an option of --app cp, not of --app fsdp"),
    (["--app", "tp", "--tp", "2", "--cp-layout", "contiguous"], "--cp-layout is an option of --app cp, not of --app tp"),
])
def test_bad_plans_exit_2_naming_the_option_and_the_rule(args, message):
    result = plan(*args)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert result.stdout == ""


def test_help_and_version():
    result = ok("--help")
    for option in ("--sweep", "--gpu-memory", "--kv-heads", "--shard", "--format", "--params", "--link-gbps"):
        assert option in result.stdout
    assert ok("--version").stdout.startswith("parabench ")


def test_405b_over_16384_gpus_plans_in_under_a_second():
    start = time.monotonic()
    result = ok("--model", "llama3-405b", "--app", "fsdp", "--gpus", "16384", "--format", "json")
    assert time.monotonic() - start < 1.0
    (p,) = json.loads(result.stdout)["plans"]
    assert p["config"]["ranks"] == 16384
    assert abs(p["num_parameters"] / 405e9 - 1) < 0.01


# ---- tensor parallelism ------------------------------------------------------------------------------------

TINY_TP2 = ["--model", "tiny", "--app", "tp", "--gpus", "4", "--tp", "2", "--backend", "cpu", "--dtype", "fp32"]


@pytest.mark.parametrize("model", ["tiny", "small"])
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_tp_plan_is_what_parabench_tp_dry_run_predicts(model, sp):
    # The same run: 4 ranks, tp 2 × dp 2, the cpu backend in fp32, micro-batch 1.
    extra = ["--sequence-parallel"] if sp else []
    table = dry_run_table(run_tp_app("--model", model, "--tp", 2, "--dry-run", *extra).stdout)
    assert sorted(table) == [0, 1, 2, 3]
    (p,) = json_plans("--model", model, "--app", "tp", "--gpus", 4, "--tp", 2, "--backend", "cpu", "--dtype", "fp32",
                      *extra)
    assert (p["config"]["tp"], p["config"]["dp"], p["config"]["sequence_parallel"]) == (2, 2, sp)
    planned = p["memory_per_rank"]
    for rank, row in table.items():
        for category in CATEGORIES + ["peak_total"]:
            # The app prints MiB with two decimals (common/runner.cpp); so does this, from the plan's bytes.
            assert row[category] == f"{planned[category] / 2**20:.2f}", (rank, category)


@pytest.mark.parametrize("args", [
    [],
    ["--sequence-parallel", "--global-batch", "4"],
    ["--sequence-parallel", "--recompute", "full", "--global-batch", "4"],
    ["--recompute", "full"],
], ids=["no-sp", "sp-accum2", "sp-full-accum2", "no-sp-full"])
def test_tp_plan_equals_parabench_tp_memory_and_communication_exactly(tmp_path, args):
    # One step of a real run: /memory/predicted in bytes, and /comm, what the ranks moved, against the
    # planner's memory and its collectives per step (bytes per call × calls).
    path = tmp_path / "tp.h5"
    run_tp_app("--model", "tiny", "--tp", 2, "--steps", 1, "--warmup", 0, "--out", path, "--quiet", *args)
    (p,) = json_plans(*TINY_TP2, *args)
    collectives = p["time_estimate"]["collectives"]
    with h5py.File(path, "r") as f:
        for category in CATEGORIES + ["peak_total"]:
            predicted = f[f"memory/predicted/{category}"][()]
            assert list(predicted) == [p["memory_per_rank"][category]] * 4, category
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            planned = [c for c in collectives if c["op"] == op]
            volume = sum(c["bytes"] * c["calls_per_step"] for c in planned)
            # The cross-entropy statistics are one entry for two calls (the maxima, N; the sums, 2N).
            calls = sum(c["calls_per_step"] * (2 if "cross-entropy" in c["what"] else 1) for c in planned)
            assert list(f[f"comm/{op}/bytes"][()]) == [volume] * 4, op
            assert list(f[f"comm/{op}/calls"][()]) == [calls] * 4, op


def test_tp_sweep_gives_four_rows_and_parameters_shrink():
    rows = csv_rows("--model", "llama3-70b", "--app", "tp", "--gpus", "64", "--dtype", "bf16",
                    "--sweep", "tp=1,2,4,8")
    assert [(int(r["tp"]), int(r["dp"])) for r in rows] == [(1, 64), (2, 32), (4, 16), (8, 8)]
    total = int(rows[0]["num_parameters"])
    for r in rows:
        tp = int(r["tp"])
        assert int(r["parameters_bytes"]) == 2 * int(r["rank_parameters"])
        assert abs(int(r["rank_parameters"]) * tp / total - 1) < 1e-3
    table = ok("--model", "llama3-70b", "--app", "tp", "--gpus", "64", "--sweep", "tp=1,2,4,8").stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("tp "))
    assert [line.split()[0] for line in table[header + 1:header + 5]] == ["1", "2", "4", "8"]
    assert not table[header + 5].strip(), "exactly four rows"


def test_sequence_parallel_lowers_activations_not_model_states():
    off, on = csv_rows("--model", "llama3-70b", "--app", "tp", "--gpus", "64", "--tp", "8",
                       "--sweep", "sequence-parallel=false,true")
    assert (off["sequence_parallel"], on["sequence_parallel"]) == ("false", "true")
    assert int(on["activations_bytes"]) < int(off["activations_bytes"])
    assert on["optimizer_states_bytes"] == off["optimizer_states_bytes"]
    out = ok("--model", "llama3-70b", "--app", "tp", "--gpus", "64", "--tp", "8", "--sequence-parallel").stdout
    assert "tp 8 with sequence parallelism" in out and "tp 8 × dp 8" in out
    assert "reduce_scatter activations" in out and "blocking" in out


def test_405b_tp8_over_16384_gpus_plans_in_under_a_second():
    start = time.monotonic()
    result = ok("--model", "llama3-405b", "--app", "tp", "--gpus", "16384", "--tp", "8", "--sequence-parallel",
                "--format", "json")
    assert time.monotonic() - start < 1.0
    (p,) = json.loads(result.stdout)["plans"]
    assert (p["config"]["ranks"], p["config"]["tp"], p["config"]["dp"]) == (16384, 8, 2048)


# ---- expert parallelism ------------------------------------------------------------------------------------

TINY_EP = ["--model", "tiny", "--app", "ep", "--gpus", 4, "--backend", "cpu", "--dtype", "fp32"]


@pytest.mark.parametrize("model", ["tiny", "small"])
@pytest.mark.parametrize("args", [
    ["--ep", 1, "--capacity-factor", "1.0"],
    ["--ep", 1, "--capacity-factor", "0"],
    ["--ep", 2, "--capacity-factor", "1.0"],
    ["--ep", 2, "--capacity-factor", "0"],
    ["--ep", 4, "--experts", 4, "--top-k", 1, "--capacity-factor", "1.25", "--aux-loss", "0.01", "--micro-batch", 2,
     "--recompute", "full"],
], ids=["ep1-c1", "ep1-c0", "ep2-c1", "ep2-c0", "ep4-E4-k1-c1.25-aux-full"])
def test_ep_plan_is_what_parabench_ep_dry_run_predicts(model, args):
    # The same run: 4 ranks (dp 4 in groups of ep), the cpu backend in fp32.
    table = dry_run_table(run_ep_app("--model", model, "--dry-run", *args).stdout)
    assert sorted(table) == [0, 1, 2, 3]
    (p,) = json_plans("--model", model, "--app", "ep", "--gpus", 4, "--backend", "cpu", "--dtype", "fp32", *args)
    assert (p["config"]["dp"], p["config"]["ep"]) == (4, args[1])
    planned = p["memory_per_rank"]
    for rank, row in table.items():
        for category in CATEGORIES + ["peak_total"]:
            assert row[category] == f"{planned[category] / 2**20:.2f}", (rank, category)


@pytest.mark.parametrize("args", [
    ["--ep", 2, "--global-batch", 8, "--recompute", "full"],
    ["--ep", 1, "--capacity-factor", "0"],
    ["--ep", 4, "--aux-loss", "0.01", "--micro-batch", 2],
], ids=["ep2-accum2-full", "ep1-dropless", "ep4-aux"])
def test_ep_plan_equals_parabench_ep_memory_and_communication_exactly(tmp_path, args):
    # One step of a real run: /memory/predicted in bytes, and /comm against the planner's collectives:
    # the all-to-alls call by call; the all-reduces as bytes (the planner's one pass each), and the calls
    # of the app's flat gradient buffer, L + 1 runs of replicated and L of expert gradients (README).
    path = tmp_path / "ep.h5"
    run_ep_app("--model", "tiny", "--steps", 1, "--warmup", 0, "--out", path, "--quiet", *args)
    (p,) = json_plans(*TINY_EP, *args)
    collectives = p["time_estimate"]["collectives"]
    layers, dp, ep = p["config"]["layers"], p["config"]["dp"], p["config"]["ep"]
    with h5py.File(path, "r") as f:
        for category in CATEGORIES + ["peak_total"]:
            assert list(f[f"memory/predicted/{category}"][()]) == [p["memory_per_rank"][category]] * 4, category
        a2a = [c for c in collectives if c["op"] == "all_to_all"]
        assert len(a2a) == (1 if ep > 1 else 0)
        assert list(f["comm/all_to_all/bytes"][()]) == [sum(c["bytes"] * c["calls_per_step"] for c in a2a)] * 4
        assert list(f["comm/all_to_all/calls"][()]) == [sum(c["calls_per_step"] for c in a2a)] * 4
        reduces = [c for c in collectives if c["op"] == "all_reduce"]
        assert list(f["comm/all_reduce/bytes"][()]) == [sum(c["bytes"] * c["calls_per_step"] for c in reduces)] * 4
        calls = (layers + 1 if dp > 1 else 0) + (layers if dp // ep > 1 else 0)
        assert list(f["comm/all_reduce/calls"][()]) == [calls] * 4
        if dp // ep > 1:  # both kinds all-reduced: every gradient of the rank, once
            assert sum(c["bytes"] for c in reduces) == 4 * p["rank_parameters"]


def test_ep_table_sweep_and_csv():
    out = ok("--model", "llama3-8b", "--app", "ep", "--gpus", "64", "--experts", "16", "--ep", "8").stdout
    assert "--app ep, ep 8: 16 experts, top-2, 2 per rank" in out
    assert "dp 64 in 8 ep groups of 8" in out
    assert "all_to_all expert slots" in out and "blocking" in out
    rows = csv_rows("--model", "llama3-8b", "--app", "ep", "--gpus", "64", "--experts", "16", "--sweep", "ep=1,2,4,8,16")
    assert [int(r["ep"]) for r in rows] == [1, 2, 4, 8, 16]
    assert {r["experts"] for r in rows} == {"16"} and {r["top_k"] for r in rows} == {"2"}
    assert len({r["num_parameters"] for r in rows}) == 1
    rank_parameters = [int(r["rank_parameters"]) for r in rows]
    assert rank_parameters == sorted(rank_parameters, reverse=True) and len(set(rank_parameters)) == 5
    assert len({r["activations_bytes"] for r in rows}) == 1, "every rank computes E·C slots whatever ep"
    (dense,) = csv_rows("--model", "llama3-8b", "--gpus", "64")
    assert dense["ep"] == "1" and dense["experts"] == ""


# ---- context parallelism -----------------------------------------------------------------------------------

TINY_CP = ["--model", "tiny", "--app", "cp", "--gpus", 4, "--backend", "cpu", "--dtype", "fp32"]


@pytest.mark.parametrize("model", ["tiny", "small"])
@pytest.mark.parametrize("args", [
    ["--cp", 2],
    ["--cp", 4, "--cp-layout", "contiguous"],
    ["--cp", 4, "--recompute", "full"],
    ["--cp", 2, "--cp-algo", "allgather", "--cp-layout", "contiguous"],
    ["--cp", 4, "--cp-algo", "allgather", "--recompute", "full", "--micro-batch", 2],
    ["--cp", 2, "--cp-algo", "alltoall", "--recompute", "selective"],
    ["--cp", 4, "--cp-algo", "alltoall", "--cp-layout", "contiguous", "--recompute", "full"],
    ["--cp", 1, "--cp-algo", "alltoall"],
], ids=["ring-cp2", "ring-cp4-contiguous", "ring-cp4-full", "allgather-cp2-contiguous", "allgather-cp4-full-mb2",
        "alltoall-cp2-selective", "alltoall-cp4-contiguous-full", "cp1"])
def test_cp_plan_is_what_parabench_cp_dry_run_predicts(model, args):
    # The same run: 4 ranks (cp consecutive ranks × dp), the cpu backend in fp32.
    table = dry_run_table(run_cp_app("--model", model, "--dry-run", *args).stdout)
    assert sorted(table) == [0, 1, 2, 3]
    (p,) = json_plans("--model", model, "--app", "cp", "--gpus", 4, "--backend", "cpu", "--dtype", "fp32", *args)
    cp = args[1]
    assert (p["config"]["cp"], p["config"]["dp"]) == (cp, 4 // cp)
    planned = p["memory_per_rank"]
    for rank, row in table.items():
        for category in CATEGORIES + ["peak_total"]:
            assert row[category] == f"{planned[category] / 2**20:.2f}", (rank, category)


# Per micro-batch and block, rows = b·S/cp, floats of 4 bytes (bench/plan/README.md, "Step-time estimate").
def cp_formula(algo, cp, b, seq, hidden, layers, micro_steps, recompute):
    """{op: (calls, bytes)} per step per rank as /comm counts them, from the app's exchanges."""
    rows, h, full = b * seq // cp, hidden, recompute == "full"
    if algo == "ring":  # (cp - 1) K|V hops forward (again with full recomputation), (cp - 1) + cp backward
        hops = 3 * cp - 2 + (cp - 1 if full else 0)
        calls = [("send", hops, 4 * rows * 2 * h), ("recv", hops, 4 * rows * 2 * h)]
    elif algo == "allgather":
        calls = [("all_gather", 3 if full else 2, 4 * b * seq * 2 * h), ("reduce_scatter", 1, 4 * b * seq * 2 * h)]
    else:  # alltoall on the cpu backend, which keeps the probabilities: selective recomputation runs it again
        n = 3 if recompute in ("full", "selective") else 2
        calls = [("all_to_all", n, 4 * rows * 3 * h), ("all_to_all", n, 4 * rows * h)]
    out = {}
    for op, count, size in calls:
        total_calls, total_bytes = out.get(op, (0, 0))
        out[op] = (total_calls + count * layers * micro_steps, total_bytes + count * size * layers * micro_steps)
    return out


@pytest.mark.parametrize("args", [
    ["--cp-algo", "ring"],
    ["--cp-algo", "ring", "--recompute", "full", "--global-batch", 4, "--cp-layout", "contiguous"],
    ["--cp-algo", "allgather"],
    ["--cp-algo", "allgather", "--recompute", "full", "--global-batch", 4],
    ["--cp-algo", "alltoall", "--recompute", "selective"],
    ["--cp-algo", "alltoall", "--recompute", "full", "--micro-batch", 2],
], ids=["ring", "ring-full-accum2-contiguous", "allgather", "allgather-full-accum2", "alltoall-selective",
        "alltoall-full-mb2"])
def test_cp_plan_equals_parabench_cp_memory_and_communication_exactly(tmp_path, args):
    # One step of a real run at cp 2 × dp 2: /memory/predicted in bytes, and /comm (calls and bytes of
    # every operation) against the planner's exchanges and against the formula written out.
    path = tmp_path / "cp.h5"
    run_cp_app("--model", "tiny", "--cp", 2, "--steps", 1, "--warmup", 0, "--out", path, "--quiet", *args)
    (p,) = json_plans(*TINY_CP, "--cp", 2, *args)
    config = p["config"]
    collectives = p["time_estimate"]["collectives"]
    planned = {}
    for c in collectives:
        for op in (("send", "recv") if c["op"] == "send_recv" else (c["op"],)):
            calls, volume = planned.get(op, (0, 0))
            planned[op] = (calls + c["calls_per_step"], volume + c["calls_per_step"] * c["bytes"])
    expected = cp_formula(config["cp_algo"], 2, config["micro_batch"], config["seq"], config["hidden"],
                          config["layers"], config["grad_accum"], config["recompute"])
    expected["all_reduce"] = (1, 4 * p["num_parameters"])  # every gradient over dp × cp = 4 ranks
    assert planned == expected
    with h5py.File(path, "r") as f:
        for category in CATEGORIES + ["peak_total"]:
            assert list(f[f"memory/predicted/{category}"][()]) == [p["memory_per_rank"][category]] * 4, category
        for op in f["comm"]:
            calls, volume = expected.get(op, (0, 0))
            assert list(f[f"comm/{op}/calls"][()]) == [calls] * 4, op
            assert list(f[f"comm/{op}/bytes"][()]) == [volume] * 4, op


def test_cp_table_sweep_and_csv():
    out = ok("--model", "llama3-8b", "--seq", "32768", "--app", "cp", "--gpus", "64", "--cp", "8").stdout
    assert "--app cp, cp 8 (ring, zigzag): 4096 tokens of each sequence per rank" in out
    assert "cp 8 × dp 8" in out
    assert "send_recv K|V blocks, forward (ring)" in out and "hidden beside block attention" in out
    assert "send_recv dK|dV blocks" in out and "all_reduce gradients (dp × cp)" in out
    rows = csv_rows("--model", "llama3-8b", "--seq", "32768", "--app", "cp", "--gpus", "64",
                    "--sweep", "cp=1,2,4,8", "--sweep", "cp-algo=ring,allgather,alltoall")
    assert [(int(r["cp"]), r["cp_algo"]) for r in rows] == [
        (cp, a) for cp in (1, 2, 4, 8) for a in ("ring", "allgather", "alltoall")]
    assert {r["cp_layout"] for r in rows} == {"zigzag"}
    assert len({r["optimizer_states_bytes"] for r in rows}) == 1, "every rank holds every parameter"
    ring = [int(r["activations_bytes"]) for r in rows if r["cp_algo"] == "ring"]
    assert ring == sorted(ring, reverse=True) and len(set(ring)) == 4
    (dense,) = csv_rows("--model", "llama3-8b", "--gpus", "64")
    assert dense["cp"] == "1" and dense["cp_algo"] == "" and dense["cp_layout"] == ""


# ---- mixed precision: the plan is what the apps store and move in bf16 -----------------------------------

DP_APP = Path(os.environ.get("PB_DP", str(BIN_DIR / "dp" / "parabench-dp")))
FSDP_APP = Path(os.environ.get("PB_FSDP", str(BIN_DIR / "fsdp" / "parabench-fsdp")))
APPS = {"dp": DP_APP, "fsdp": FSDP_APP, "tp": TP_APP, "ep": EP_APP, "cp": CP_APP}


@pytest.mark.parametrize("app, args", [
    ("dp", []),
    ("fsdp", ["--shard", "NO_SHARD"]),
    ("fsdp", ["--shard", "FULL_SHARD", "--grad-dtype", "bf16"]),
    ("fsdp", ["--shard", "ZERO1", "--global-batch", 8]),
    ("tp", ["--tp", 2, "--sequence-parallel", "--grad-dtype", "bf16"]),
    ("ep", ["--ep", 2, "--capacity-factor", "1.0"]),
    ("cp", ["--cp", 2, "--cp-algo", "ring"]),
    ("cp", ["--cp", 2, "--cp-algo", "alltoall", "--recompute", "selective"]),
], ids=["dp", "fsdp-NO_SHARD", "fsdp-FULL_SHARD-bf16-grads", "fsdp-ZERO1-accum2", "tp2-sp-bf16-grads", "ep2", "cp2-ring",
        "cp2-alltoall"])
def test_bf16_plan_equals_the_apps_memory_and_communication(tmp_path, app, args):
    """One step of each app in bf16 on 4 ranks: /memory/predicted and /memory/measured in bytes against the
    planner's memory per rank (peak_total measured: at most), /comm's bytes per operation against the
    planner's collectives (bytes × calls), and the 18 (16) bytes of model state per parameter."""
    path = tmp_path / f"{app}.h5"
    run_app(APPS[app], "--model", "tiny", "--dtype", "bf16", "--steps", 1, "--warmup", 0, "--out", path, "--quiet",
            *args)
    (p,) = json_plans("--model", "tiny", "--app", app, "--gpus", 4, "--backend", "cpu", "--dtype", "bf16", *args)
    planned_bytes = {}
    for c in p["time_estimate"]["collectives"]:
        for op in (("send", "recv") if c["op"] == "send_recv" else (c["op"],)):
            planned_bytes[op] = planned_bytes.get(op, 0) + c["bytes"] * c["calls_per_step"]
    with h5py.File(path, "r") as f:
        assert f["config"].attrs["master_weights"] == "fp32"
        for category in CATEGORIES + ["peak_total"]:
            predicted, measured = list(f[f"memory/predicted/{category}"][()]), list(f[f"memory/measured/{category}"][()])
            assert predicted == [p["memory_per_rank"][category]] * 4, category
            if category == "peak_total":
                assert all(m <= q for m, q in zip(measured, predicted)), (category, measured, predicted)
            else:
                assert measured == predicted, (category, measured, predicted)
        for op in f["comm"]:
            assert list(f[f"comm/{op}/bytes"][()]) == [planned_bytes.get(op, 0)] * 4, op
    states = sum(p["memory_per_rank"][c] for c in ("parameters", "master_parameters", "gradients", "optimizer_states"))
    if app == "dp" or args[:2] == ["--shard", "NO_SHARD"]:
        assert states == 18 * p["num_parameters"]


# ---- pipeline parallelism ----------------------------------------------------------------------------------

@pytest.mark.parametrize("model, args", [
    ("small", ["--pp", 4, "--schedule", "gpipe", "--global-batch", 8]),
    ("small", ["--pp", 4, "--schedule", "1f1b", "--global-batch", 8, "--recompute", "full"]),
    ("small", ["--pp", 2, "--schedule", "1f1b", "--micro-batch", 2, "--global-batch", 8]),
    ("small", ["--pp", 2, "--schedule", "interleaved", "--virtual-stages", 2, "--global-batch", 4,
               "--recompute", "selective"]),
    ("small", ["--pp", 4, "--schedule", "naive", "--global-batch", 3]),
    ("tiny", ["--pp", 2, "--schedule", "1f1b", "--dtype", "bf16"]),
    ("tiny", ["--pp", 1, "--global-batch", 8]),
], ids=["small-gpipe-pp4", "small-1f1b-pp4-full", "small-1f1b-pp2-dp2-mb2", "small-interleaved-pp2-dp2-selective",
        "small-naive-pp4", "tiny-1f1b-pp2-bf16", "tiny-pp1-dp4"])
def test_pp_plan_is_what_parabench_pp_dry_run_predicts(model, args):
    # The same run on 4 ranks: stage s holds ranks s·dp ... s·dp + dp − 1 (SPEC 3), the cpu backend.
    table = dry_run_table(run_app(PP_APP, "--model", model, "--dry-run", *args).stdout)
    assert sorted(table) == [0, 1, 2, 3]
    dtype = args[args.index("--dtype") + 1] if "--dtype" in args else "fp32"
    rest = [a for a in args if a not in ("--dtype", dtype)] if "--dtype" in args else args
    (p,) = json_plans("--model", model, "--app", "pp", "--gpus", 4, "--backend", "cpu", "--dtype", dtype, *rest)
    pp = args[args.index("--pp") + 1]
    assert (p["config"]["pp"], p["config"]["dp"]) == (pp, 4 // pp)
    stages = p["memory_per_stage"]
    assert len(stages) == pp
    for rank, row in table.items():
        planned = stages[rank // p["config"]["dp"]]
        for category in CATEGORIES + ["peak_total"]:
            assert row[category] == f"{planned[category] / 2**20:.2f}", (rank, category)
    assert p["memory_per_rank"] == stages[p["peak_stage"]]
    assert max(s["peak_total"] for s in stages) == p["memory_per_rank"]["peak_total"]


@pytest.mark.parametrize("args", [
    ["--pp", 4, "--layers", 4, "--global-batch", 4],
    ["--pp", 2, "--global-batch", 8, "--schedule", "gpipe"],
    ["--pp", 2, "--layers", 4, "--global-batch", 8, "--micro-batch", 2, "--schedule", "interleaved",
     "--virtual-stages", 2],
], ids=["1f1b-pp4", "gpipe-pp2-dp2", "interleaved-pp2-dp2-mb2"])
def test_pp_plan_equals_parabench_pp_memory_and_messages_exactly(tmp_path, args):
    # One step of a real run: /memory/predicted per rank in bytes, and /comm: each rank's sends (v·m
    # activations from every stage but the last, v·m gradients from every stage but the first, less the
    # last virtual stage's and the first's), and the dp all-reduce of its stage's gradients.
    path = tmp_path / "pp.h5"
    run_app(PP_APP, "--model", "tiny", "--steps", 1, "--warmup", 0, "--out", path, "--quiet", *args)
    (p,) = json_plans("--model", "tiny", "--app", "pp", "--gpus", 4, "--backend", "cpu", "--dtype", "fp32", *args)
    config, collectives = p["config"], p["time_estimate"]["collectives"]
    pp, dp, v, m = config["pp"], config["dp"], config["virtual_stages"], config["grad_accum"]
    messages = [c for c in collectives if c["op"] == "send_recv"]
    assert [c["calls_per_step"] for c in messages] == [v * m, v * m]
    message = messages[0]["bytes"]
    assert message == 4 * config["micro_batch"] * config["seq"] * config["hidden"]
    with h5py.File(path, "r") as f:
        for category in CATEGORIES + ["peak_total"]:
            predicted = list(f[f"memory/predicted/{category}"][()])
            assert predicted == [p["memory_per_stage"][r // dp][category] for r in range(4)], category
        for rank in range(4):
            stage = rank // dp
            sends = m * (v - (1 if stage == pp - 1 else 0)) + m * (v - (1 if stage == 0 else 0))
            assert f["comm/send/calls"][rank] == sends, rank
            assert f["comm/send/bytes"][rank] == sends * message, rank
        reduces = [c for c in collectives if c["op"] == "all_reduce"]
        assert len(reduces) == (1 if dp > 1 else 0)
        if reduces:
            assert max(f["comm/all_reduce/bytes"][()]) == reduces[0]["bytes"]
        bubble = f["pipeline/bubble_fraction"].attrs["theoretical"]
        assert p["time_estimate"]["bubble_fraction"] == pytest.approx(bubble, rel=1e-12)


def test_pp_table_sweep_and_csv():
    out = ok("--model", "llama3-70b", "--app", "pp", "--gpus", "64", "--pp", "8", "--global-batch", "64").stdout
    assert "--app pp, pp 8 (1f1b): 10 blocks per stage" in out and "pp 8 × dp 8" in out
    assert "per pipeline stage" in out and "bubble" in out
    assert "send_recv activations to the next stage" in out
    assert "from the device table's peaks" in out
    assert "breakdown      compute" in out and "MFU" in out
    rows = csv_rows("--model", "llama3-70b", "--app", "pp", "--gpus", "64", "--global-batch", "64",
                    "--sweep", "pp=1,2,4,8", "--sweep", "schedule=gpipe,1f1b")
    assert [(int(r["pp"]), r["schedule"]) for r in rows] == [(p, s) for p in (1, 2, 4, 8) for s in ("gpipe", "1f1b")]
    bubbles = [float(r["bubble_fraction"]) for r in rows if r["schedule"] == "1f1b"]
    assert bubbles[0] == 0 and bubbles == sorted(bubbles) and len(set(bubbles)) == 4
    gpipe = [int(r["activations_bytes"]) for r in rows if r["schedule"] == "gpipe"]
    onefb = [int(r["activations_bytes"]) for r in rows if r["schedule"] == "1f1b"]
    assert all(g >= o for g, o in zip(gpipe, onefb)), "1F1B holds at most p micro-batches, GPipe all m"
    for r in rows:
        assert float(r["step_s"]) == pytest.approx(float(r["compute_s"]) + float(r["bubble_s"]) +
                                                   float(r["exposed_comm_s"]), rel=1e-5)
    (dense,) = csv_rows("--model", "llama3-8b", "--gpus", "64")
    assert dense["pp"] == "1" and dense["schedule"] == "" and dense["time_source"] == "peaks"


# ---- --calibration: a parabench-micro result file (SPEC 6, /micro) -----------------------------------------

SMALL_GEMMS = [("small.qkv", 512, 256, 768), ("small.attn_out", 512, 256, 256), ("small.fc1", 512, 256, 1024),
               ("small.fc2", 512, 1024, 256), ("small.logits", 512, 256, 4096), ("square", 1024, 1024, 1024)]
MEMORY_BOUND = ["layernorm_forward", "layernorm_backward", "residual_layernorm_forward", "gelu_forward", "gelu_backward",
                "add",
                "embedding_forward", "embedding_backward", "cross_entropy_forward_backward", "sum_squares", "zero",
                "accumulate", "adamw"]
GEMM_RATE, ATTENTION_RATE, BYTES_RATE, BUSBW = 4e10, 1e10, 5e9, 2e9
SEPARATE_BUSBW = 1e9  # the gathers' out-of-place rows (into a buffer of their own), half the in-place rate


def write_calibration(path, *, app="micro", status="complete", backend="cpu", dtypes=("fp32",), ops=None,
                      drop_kernels=(), micro=True, comm="mpi", cold_gemm_rate=None):
    """A parabench-micro result file as its reporter writes one (bench/micro/report.cpp), with uniform rates:
    every GEMM at GEMM_RATE FLOP/s, attention at ATTENTION_RATE, the memory-bound kernels at BYTES_RATE bytes/s,
    every collective at BUSBW bytes/s of bus bandwidth in place (8 B to 32 MiB, 2 ranks), and all_gather also
    out of place at SEPARATE_BUSBW, as parabench-micro times both. cold_gemm_rate: the GEMMs also with their
    operands flushed from cache (parabench-micro's "/cold" rows, column `operands`), at that rate; without
    it the table has no `operands` column, as a file of an older parabench-micro."""
    ops = ["all_reduce", "all_gather", "reduce_scatter", "send_recv_intra"] if ops is None else ops
    text = h5py.string_dtype()
    with h5py.File(path, "w") as f:
        f.attrs.update({"schema": "parabench", "schema_version": 1, "status": status, "error": "",
                        "created": "2026-12-02T00:00:00Z"})
        f.create_group("steps") if app != "micro" else None
        config = f.create_group("config")
        config.attrs.update({"app": app, "world_size": 2, "threads": 1, "comm": comm, "ops": ",".join(ops),
                             "min_bytes": 8, "max_bytes": 1 << 25, "dtype": "fp32", "cluster": "test"})
        config.create_dataset("argv", data=["parabench-micro", "--out", str(path)], dtype=text)
        system = f.create_group("system")
        system.attrs.update({"cluster": "test", "nodes": 1, "ranks": 2, "cpu_model": "Test CPU", "gpu_model": ""})
        if not micro:
            return

        def columns(group, rows, names):
            for name, kind, units in names:
                values = [r[name] for r in rows]
                if kind == "str":
                    ds = group.create_dataset(name, data=values, dtype=text)
                else:
                    ds = group.create_dataset(name, data=values, dtype=kind)
                ds.attrs["units"] = units

        common = [("name", "str", "1"), ("backend", "str", "1"), ("dtype", "str", "1"), ("shape", "str", "1"),
                  ("label", "str", "1"), ("error", "str", "1"), ("time_s", "f8", "s"), ("flop", "f8", "flop"),
                  ("flop_per_s", "f8", "flop/s"), ("peak_fraction", "f8", "1")]
        gemm = []
        for dtype in dtypes:
            for shape, n, c, oc in SMALL_GEMMS:
                flop = 2.0 * n * c * oc
                variants = [("", GEMM_RATE)] + ([("/cold", cold_gemm_rate)] if cold_gemm_rate else [])
                for suffix, rate in variants:
                    gemm.append({"name": f"gemm/{backend}/{dtype}/{shape}/N{n}_C{c}_OC{oc}{suffix}",
                                 "backend": backend, "dtype": dtype, "shape": shape, "label": "sgemm", "error": "",
                                 "time_s": flop / rate, "flop": flop, "flop_per_s": rate,
                                 "peak_fraction": float("nan"), "N": n, "C": c, "OC": oc,
                                 "operands": "cold" if suffix else "cached"})
        operands = [("operands", "str", "1")] if cold_gemm_rate else []
        columns(f.create_group("micro/gemm"), gemm,
                common + operands + [("N", "i8", "1"), ("C", "i8", "1"), ("OC", "i8", "1")])
        kernels = []
        for dtype in dtypes:
            for kernel in ["attention_forward", "attention_backward"] + MEMORY_BOUND:
                if kernel in drop_kernels:
                    continue
                flop = {"attention_forward": 4 * 4 * 128 * 128 * 256, "attention_backward": 8 * 4 * 128 * 128 * 256}
                work, rate = (flop[kernel], ATTENTION_RATE) if kernel in flop else (1e6, BYTES_RATE)
                kernels.append({"name": f"kernel/{backend}/{dtype}/{kernel}/small/x", "backend": backend,
                                "dtype": dtype, "shape": "small", "label": "", "error": "", "time_s": work / rate,
                                "flop": work if kernel in flop else 0.0,
                                "flop_per_s": rate if kernel in flop else float("nan"), "peak_fraction": float("nan"),
                                "kernel": kernel, "dims": "x", "bytes": 0.0 if kernel in flop else work,
                                "bytes_per_s": float("nan") if kernel in flop else rate})
        columns(f.create_group("micro/kernels"), kernels,
                common + [("kernel", "str", "1"), ("dims", "str", "1"), ("bytes", "f8", "bytes"),
                          ("bytes_per_s", "f8", "bytes/s")])
        for op in ops:
            g = f.create_group(f"micro/collectives/{op}")
            factor = {"all_reduce": 1.0, "all_gather": 0.5, "reduce_scatter": 0.5}.get(op, 1.0)
            g.attrs.update({"comm": comm, "ranks": 2, "nodes": 1, "dtype": "fp32", "busbw_factor": factor})
            sizes = [8 << (2 * i) for i in range(12)]  # 8 B ... 32 MiB
            variants = [(0, SEPARATE_BUSBW), (1, BUSBW)] if op == "all_gather" else [(1, BUSBW)]
            rows = [{"bytes": b, "count": b // 4, "in_place": place, "time_s": b * factor / busbw,
                     "algbw": busbw / factor, "busbw": busbw, "errors": 0, "error": ""}
                    for b in sizes for place, busbw in variants]
            columns(g, rows, [("bytes", "i8", "bytes"), ("count", "i8", "1"), ("in_place", "i8", "1"),
                              ("time_s", "f8", "s"), ("algbw", "f8", "bytes/s"), ("busbw", "f8", "bytes/s"),
                              ("errors", "i8", "1"), ("error", "str", "1")])


SMALL_MB4 = ["--model", "small", "--micro-batch", "4"]


@pytest.mark.parametrize("app, args", [
    ("dp", ["--gpus", 2]),
    ("fsdp", ["--gpus", 2, "--shard", "FULL_SHARD"]),
    ("tp", ["--gpus", 2, "--tp", 2]),
    ("pp", ["--gpus", 2, "--pp", 2, "--global-batch", 16]),
    ("hybrid", ["--gpus", 4, "--tp", 2, "--pp", 2, "--global-batch", 16]),
    ("hybrid", ["--gpus", 4, "--pp", 2, "--shard", "FULL_SHARD", "--global-batch", 16]),
])
def test_calibrated_step_is_the_sum_of_measured_kernels_and_collectives(tmp_path, app, args):
    cal = tmp_path / "micro.h5"
    write_calibration(cal)
    (p,) = json_plans(*SMALL_MB4, "--app", app, *args, "--calibration", cal)
    t = p["time_estimate"]
    assert t["source"] == "calibration" and p["config"]["backend"] == "cpu" and p["config"]["dtype"] == "fp32"
    assert p["config"]["calibration"] == str(cal)
    rates = {"matmul": GEMM_RATE, "attention_forward": ATTENTION_RATE, "attention_backward": ATTENTION_RATE}
    for k in t["kernels"]:
        assert k["seconds"] == pytest.approx(k["work"] * k["calls_per_step"] / rates.get(k["kernel"], BYTES_RATE))
        assert k["measured_row"] and not k["default_rate"]
    assert t["compute_s"] == pytest.approx(sum(k["seconds"] for k in t["kernels"]))
    forward = [k for k in t["kernels"] if k["kernel"] == "matmul" and k["what"].endswith(", forward")]
    if app in ("dp", "fsdp", "pp"):
        assert forward and all(k["exact"] for k in forward), "micro-batch 4 is the shapes parabench-micro times"
    assert t["warnings"] == []
    for c in t["collectives"]:  # (a dp all-reduce over dp 1 moves nothing)
        busbw = BUSBW if c["in_place"] else SEPARATE_BUSBW
        assert c["ranks"] == 1 or (c["measured"] and c["link_gbps"] == pytest.approx(busbw * 8 / 1e9))
    assert t["step_s"] == pytest.approx(t["compute_s"] + t["exposed_comm_s"] + t["bubble_s"])
    assert t["model_flops_utilization"] is None, "a CPU's peak is unknown"
    table = ok(*SMALL_MB4, "--app", app, *args, "--calibration", cal).stdout
    assert f"step-time estimate from the calibration {cal}" in table
    assert "breakdown      compute" in table and "exposed communication" in table and "MFU nan" in table
    (row,) = csv_rows(*SMALL_MB4, "--app", app, *args, "--calibration", cal)
    assert row["time_source"] == "calibration"
    assert float(row["step_s"]) == pytest.approx(t["step_s"], rel=1e-5)


def test_calibrated_products_take_the_cold_rows(tmp_path):
    """parabench-micro's cold GEMM rows (operands flushed from cache, as a step meets them) time the step's
    products where the file has them; the cached rows only in a file without them."""
    cold, cached = tmp_path / "cold.h5", tmp_path / "cached.h5"
    write_calibration(cold, cold_gemm_rate=GEMM_RATE / 2)
    write_calibration(cached)
    (p,) = json_plans(*SMALL_MB4, "--app", "dp", "--gpus", 2, "--calibration", cold)
    (q,) = json_plans(*SMALL_MB4, "--app", "dp", "--gpus", 2, "--calibration", cached)
    products = [k for k in p["time_estimate"]["kernels"] if k["kernel"] == "matmul"]
    assert products and all(k["operands_cold"] and k["measured_row"].endswith("/cold") for k in products)
    for k in products:
        assert k["seconds"] == pytest.approx(k["work"] * k["calls_per_step"] / (GEMM_RATE / 2))
    assert not any(k.get("operands_cold") for k in q["time_estimate"]["kernels"])
    matmul_s = sum(k["seconds"] for k in products)
    assert p["time_estimate"]["compute_s"] - q["time_estimate"]["compute_s"] == pytest.approx(matmul_s / 2)
    assert "operands out of cache" in ok(*SMALL_MB4, "--app", "dp", "--gpus", 2, "--calibration", cold).stdout
    assert "operands out of cache" not in ok(*SMALL_MB4, "--app", "dp", "--gpus", 2, "--calibration", cached).stdout


def test_calibration_with_peak_gives_mfu(tmp_path):
    cal = tmp_path / "micro.h5"
    write_calibration(cal)
    (p,) = json_plans(*SMALL_MB4, "--calibration", cal, "--peak-tflops", "0.1")
    t = p["time_estimate"]
    assert t["model_flops_utilization"] == pytest.approx(t["model_flops_per_step"] / (t["step_s"] * 0.1e12))


def test_power_gives_energy_per_step_beside_the_calibrated_step_time(tmp_path):
    """--power-w: every rank's device at that power for the whole step, as a measured run's /summary power
    per device; the energy per step and per token in every format, nothing without it."""
    cal = tmp_path / "micro.h5"
    write_calibration(cal)
    args = [*SMALL_MB4, "--app", "dp", "--gpus", 2, "--calibration", cal]
    (p,) = json_plans(*args, "--power-w", 350)
    t = p["time_estimate"]
    tokens_per_step = t["tokens_per_s"] * t["step_s"]
    assert t["power_w"] == 350
    assert t["energy_j_per_step"] == pytest.approx(350 * 2 * t["step_s"], rel=1e-12)
    assert t["joules_per_token"] == pytest.approx(t["energy_j_per_step"] / tokens_per_step, rel=1e-12)
    (row,) = csv_rows(*args, "--power-w", 350)
    assert float(row["energy_j_per_step"]) == pytest.approx(t["energy_j_per_step"], rel=1e-5)
    assert f"(350 W × 2 devices × step" in ok(*args, "--power-w", 350).stdout
    (plain,) = json_plans(*args)
    assert plain["time_estimate"]["energy_j_per_step"] is None and plain["time_estimate"]["power_w"] is None
    bad = plan(*args, "--power-w", 0)
    assert bad.returncode == 2 and "--power-w" in bad.stderr


def test_calibration_default_rate_for_a_missing_memory_bound_kernel_warns(tmp_path):
    cal = tmp_path / "micro.h5"
    write_calibration(cal, drop_kernels=("add",))
    result = ok(*SMALL_MB4, "--calibration", cal, "--format", "json")
    assert f"warning: --calibration {cal} has no add on cpu/fp32" in result.stderr
    (p,) = json.loads(result.stdout)["plans"]
    adds = [k for k in p["time_estimate"]["kernels"] if k["kernel"] == "add"]
    assert adds and all(k["default_rate"] for k in adds)


@pytest.mark.parametrize("setup, args, message", [
    ("not-hdf5", [], "is not an HDF5 file"),
    ("missing", [], "cannot be read"),
    ("app-dp", [], "is a parabench-dp result (/config app \"dp\"), not parabench-micro's"),
    ("no-micro", [], "has no /micro"),
    ("running", [], "did not complete (status \"running\")"),
    ("fp32-only", ["--dtype", "bf16"], "has no matrix product (/micro/gemm) measured on cpu/bf16 (it measured cpu/fp32)"),
    ("fp32-only", ["--backend", "cuda"], "has no matrix product (/micro/gemm) measured on cuda/bf16"),
    ("no-attention", [], "has no attention_backward measured on cpu/fp32"),
    ("no-kernels", [], "has no kernel (/micro/kernels) measured on cpu/fp32"),
    ("no-all-gather", ["--app", "fsdp", "--gpus", 2], "has no /micro/collectives/all_gather"),
    ("fp32-only", ["--app", "pp", "--pp", 2, "--gpus", 2, "--gpus-per-node", 1],
     "has no /micro/collectives/send_recv_inter"),
    ("fp32-only", ["--app", "cp", "--cp", 2], "--app cp is not modelled from a calibration yet"),
    ("fp32-only", ["--mfu", "0.5"], "--mfu is an assumption of the peak-based estimate"),
])
def test_bad_calibrations_exit_2_naming_the_file_and_the_problem(tmp_path, setup, args, message):
    cal = tmp_path / "micro.h5"
    if setup == "not-hdf5":
        cal.write_text("gemm,1,2,3\n")
    elif setup == "app-dp":
        write_calibration(cal, app="dp")
    elif setup == "no-micro":
        write_calibration(cal, micro=False)
    elif setup == "running":
        write_calibration(cal, status="running")
    elif setup == "no-attention":
        write_calibration(cal, drop_kernels=("attention_backward",))
    elif setup == "no-kernels":
        write_calibration(cal, drop_kernels=["attention_forward", "attention_backward"] + MEMORY_BOUND)
    elif setup == "no-all-gather":
        write_calibration(cal, ops=["all_reduce", "reduce_scatter"])
    elif setup == "fp32-only":
        write_calibration(cal)
    result = plan(*SMALL_MB4, "--calibration", cal, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert result.stdout == ""


def test_calibration_says_where_it_does_not_reach(tmp_path):
    """Messages above the largest measured size, and a group across nodes timed with collectives measured on
    one node, are timed all the same, with a warning each (the synthetic calibration: 8 B to 32 MiB, 1 node)."""
    cal = tmp_path / "micro.h5"
    write_calibration(cal)
    across = ok(*SMALL_MB4, "--gpus", 4, "--gpus-per-node", 2, "--calibration", cal).stderr
    assert "the group spans nodes, but the calibration measured all_reduce on one node" in across
    inside = ok(*SMALL_MB4, "--gpus", 2, "--calibration", cal).stderr
    assert "warning" not in inside
    big = ok("--model", "gpt2-124m", "--micro-batch", 1, "--gpus", 2, "--bucket-mb", 400, "--calibration", cal).stderr
    assert "-byte messages timed at the bus bandwidth of the calibration's largest size, 33554432 bytes" in big


# ---- hybrid: every degree at once, and --search ------------------------------------------------------------

HYBRID_APP = Path(os.environ.get("PB_HYBRID", str(BIN_DIR / "hybrid" / "parabench-hybrid")))
HYBRID_TINY = ["--layers", 4, "--hidden", 16, "--heads", 4, "--seq", 16, "--vocab", 64, "--ffn", 32]


@pytest.mark.parametrize("args", [
    ["--tp", 2, "--pp", 2, "--cp", 2, "--sequence-parallel", "--global-batch", 4],
    ["--tp", 2, "--shard", "FULL_SHARD", "--sequence-parallel", "--global-batch", 4],
    ["--pp", 2, "--shard", "HYBRID_SHARD", "--shard-group", 2, "--global-batch", 4, "--recompute", "full"],
    ["--tp", 2, "--pp", 2, "--schedule", "interleaved", "--virtual-stages", 2, "--global-batch", 8],
    ["--pp", 3, "--global-batch", 3],
], ids=["tp2-pp2-cp2-sp", "fullshard-tp2-sp", "hybridshard-pp2-full", "tp2-pp2-interleaved", "uneven-pp3"])
def test_hybrid_plan_equals_parabench_hybrid_memory_exactly(tmp_path, args):
    """One step of parabench-hybrid: /memory/predicted per rank in bytes is the planner's stage of that rank
    (stage s holds ranks s·(W/pp) ... (s+1)·(W/pp) − 1, SPEC 3); and --dry-run prints the same."""
    pp = args[args.index("--pp") + 1] if "--pp" in args else 1
    ranks = 3 if pp == 3 else 8
    path = tmp_path / "hybrid.h5"
    run_app(HYBRID_APP, *HYBRID_TINY, "--steps", 1, "--warmup", 0, "--out", path, "--quiet", *args, ranks=ranks)
    (p,) = json_plans(*HYBRID_TINY, "--app", "hybrid", "--gpus", ranks, "--backend", "cpu", "--dtype", "fp32", *args)
    stages = p["memory_per_stage"] if pp > 1 else [p["memory_per_rank"]]
    assert len(stages) == pp
    with h5py.File(path, "r") as f:
        for category in CATEGORIES + ["peak_total"]:
            predicted = list(f[f"memory/predicted/{category}"][()])
            assert predicted == [stages[r // (ranks // pp)][category] for r in range(ranks)], category
    table = dry_run_table(run_app(HYBRID_APP, *HYBRID_TINY, "--dry-run", *args, ranks=ranks).stdout)
    for rank, row in table.items():
        for category in CATEGORIES + ["peak_total"]:
            assert row[category] == f"{stages[rank // (ranks // pp)][category] / 2**20:.2f}", (rank, category)


def test_hybrid_plan_of_the_published_405b_layout():
    """Llama 3 405B's TP 8 × PP 16 × DP 128 on 16384 GPUs (126 layers: 7 on the first and last stage, 8 on the
    others): its memory per stage, sharded over the 128 data ranks, and the collectives of each strategy."""
    (p,) = json_plans("--model", "llama3-405b", "--app", "hybrid", "--gpus", 16384, "--tp", 8, "--sequence-parallel",
                      "--pp", 16, "--schedule", "interleaved", "--virtual-stages", 4, "--shard", "FULL_SHARD",
                      "--global-batch", 2048, "--gpu-memory", 80)
    c = p["config"]
    assert (c["tp"], c["pp"], c["cp"], c["dp"], c["grad_accum"]) == (8, 16, 1, 128, 16)
    stages = p["memory_per_stage"]
    assert len(stages) == 16 and p["fit"]["fits"]
    # the stages' parameters: bf16, sharded per unit over the 128 data ranks; the first and last hold 7 blocks
    assert stages[0]["parameters"] < stages[1]["parameters"] == stages[8]["parameters"]
    ops = {(e["op"], e["ranks"]) for e in p["time_estimate"]["collectives"]}
    assert {("all_gather", 8), ("reduce_scatter", 8), ("send_recv", 2), ("all_gather", 128),
            ("reduce_scatter", 128)} <= ops, ops


def search(*args):
    return ok("--app", "hybrid", "--search", *args)


def test_search_405b_on_16384_gpus_in_under_5_seconds():
    start = time.monotonic()
    result = json.loads(search("--model", "llama3-405b", "--gpus", 16384, "--gpu-memory", 80, "--global-batch", 2048,
                               "--top", 0, "--format", "json").stdout)
    assert time.monotonic() - start < 5.0
    layouts = result["layouts"]
    assert result["candidates"] > result["accepted"] >= result["fitting"] == len(layouts) > 1000
    steps = [lay["step_s"] for lay in layouts]
    assert steps == sorted(steps)
    for lay in layouts:
        c = lay["config"]
        assert c["tp"] * c["pp"] * c["cp"] * c["dp"] == 16384
        assert lay["memory_bytes_per_rank"]["peak_total"] <= 80 * 2**30
        assert lay["tokens_per_s_per_gpu"] == pytest.approx(2048 * 8192 / lay["step_s"] / 16384)
    # the published layout (TP 8 with sequence parallelism, PP 16, CP 1, DP 128) fits and is among them
    published = [lay["rank"] for lay in layouts if (lay["config"]["tp"], lay["config"]["pp"], lay["config"]["cp"],
                                                     lay["config"]["dp"]) == (8, 16, 1, 128)]
    assert published and min(published) <= len(layouts) // 10, (min(published) if published else None, len(layouts))


def test_search_table_and_csv():
    args = ["--model", "gpt2-1.5b", "--gpus", 64, "--gpu-memory", 40, "--global-batch", 64]
    table = search(*args).stdout
    assert "fastest first" in table and "the fastest layout in full:" in table
    rows = list(csv.DictReader(io.StringIO(search(*args, "--top", 5, "--format", "csv").stdout)))
    assert len(rows) == 5 and rows[0]["rank"] == "1"
    assert [float(r["step_s"]) for r in rows] == sorted(float(r["step_s"]) for r in rows)
    assert all(float(r["peak_gib"]) <= 40 for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--app", "dp", "--search", "--gpu-memory", 80, "--global-batch", 8], "--search plans --app hybrid's layouts"),
    (["--app", "hybrid", "--search", "--global-batch", 8], "--search needs --gpu-memory"),
    (["--app", "hybrid", "--search", "--gpu-memory", 80], "--search needs --global-batch"),
    (["--app", "hybrid", "--search", "--gpu-memory", 80, "--global-batch", 8, "--tp", 2], "--tp is what --search varies"),
    (["--app", "hybrid", "--search", "--gpu-memory", 80, "--global-batch", 8, "--top", -1], "--top -1 must be 0"),
    (["--app", "hybrid", "--top", 3], "--top is an option of --search"),
    (["--app", "hybrid", "--gpus", 12, "--tp", 2, "--pp", 4], "--gpus 12 is not divisible by --tp 2 × --pp 4 × --cp 1"),
    (["--app", "hybrid", "--gpus", 8, "--tp", 8], "--heads 4 is not divisible by --tp 8"),
    (["--app", "hybrid", "--moe"], "--app hybrid --moe: not modelled yet"),
    (["--app", "tp", "--moe"], "--moe is an option of --app hybrid"),
    (["--app", "hybrid", "--no-overlap"], "--no-overlap is an option of --app dp"),
    (["--app", "hybrid", "--search", "--gpu-memory", 80, "--global-batch", 8, "--sweep", "micro-batch=1,2"],
     "--search and --sweep: give one or the other"),
    (["--app", "hybrid", "--gpus", 8, "--cp", 2, "--shard", "HYBRID_SHARD", "--shard-group", 3],
     "--shard-group 3 does not divide the data ranks dp × cp 8"),
])
def test_bad_hybrid_plans_exit_2(args, message):
    result = plan("--model", "tiny", *args)
    assert result.returncode == 2, result
    assert message in result.stderr, result.stderr


def test_calibrated_hybrid_refuses_context_parallelism_and_searches_cp_1(tmp_path):
    cal = tmp_path / "micro.h5"
    write_calibration(cal)
    result = plan(*SMALL_MB4, "--app", "hybrid", "--gpus", 4, "--cp", 2, "--calibration", cal)
    assert result.returncode == 2 and "--calibration times --app hybrid's steps at --cp 1 only" in result.stderr
    found = json.loads(search("--model", "small", "--gpus", 4, "--gpus-per-node", 4, "--gpu-memory", 1,
                              "--global-batch", 16, "--calibration", cal, "--top", 0, "--format", "json").stdout)
    layouts = found["layouts"]
    assert layouts and all(lay["config"]["cp"] == 1 for lay in layouts)
    assert [lay["step_s"] for lay in layouts] == sorted(lay["step_s"] for lay in layouts)
    # the calibration measured no send_recv across nodes: here every stage shares the node, so all are timed
    assert found["unplanned"] == 0



# ---- the Llama-style block: the planner's llama3 presets, scaled down, against the apps ---------------------

LLAMA_SHAPE = ["--layers", 4, "--hidden", 64, "--heads", 4, "--kv-heads", 2, "--seq", 32, "--vocab", 256, "--ffn", 192]


@pytest.mark.parametrize("app, args", [
    ("dp", ["--global-batch", 8]),
    ("dp", ["--recompute", "selective"]),
    ("fsdp", ["--shard", "FULL_SHARD"]),
    ("fsdp", ["--shard", "SHARD_GRAD_OP", "--dtype", "bf16", "--recompute", "full"]),
    ("pp", ["--pp", 2, "--schedule", "1f1b", "--global-batch", 8]),
    ("tp", ["--tp", 2, "--sequence-parallel"]),
    ("ep", ["--ep", 2, "--experts", 4, "--top-k", 2, "--capacity-factor", 1.5]),
    ("cp", ["--cp", 2, "--cp-algo", "ring"]),
    ("cp", ["--cp", 2, "--cp-algo", "alltoall"]),
], ids=["dp-accum2", "dp-selective", "fsdp-FULL_SHARD", "fsdp-SHARD_GRAD_OP-bf16-full", "pp2-1f1b", "tp2-sp",
        "ep2-swiglu-experts", "cp2-ring", "cp2-alltoall"])
def test_scaled_down_llama3_plan_equals_the_apps_measured_memory(tmp_path, app, args):
    """The planner's llama3-8b preset (GQA, SwiGLU, RMSNorm, rotary positions, no biases, untied head) at
    a tiny shape against a run of the same block (--arch llama) on 4 ranks: every category of every rank
    measured equals the plan in bytes (peak_total: at most the plan)."""
    path = tmp_path / f"{app}.h5"
    apps = {"dp": DP_APP, "fsdp": FSDP_APP, "pp": PP_APP, "tp": TP_APP, "ep": EP_APP, "cp": CP_APP}
    run_app(apps[app], "--arch", "llama", "--rope-theta", 500000, *LLAMA_SHAPE, "--steps", 1, "--warmup", 0,
            "--out", path, "--quiet", *args)
    (p,) = json_plans("--model", "llama3-8b", *LLAMA_SHAPE, "--app", app, "--gpus", 4, "--backend", "cpu", *args)
    config = p["config"]
    assert config["rms_norm"] and config["gated_mlp"] and not config["learned_positions"] and not config["biases"]
    with h5py.File(path, "r") as f:
        assert int(f["config"].attrs["kv_heads"]) == config["kv_heads"] == 2
        for category in CATEGORIES + ["peak_total"]:
            measured = list(f[f"memory/measured/{category}"][()])
            if app == "pp":  # each rank's stage's
                planned = [p["memory_per_stage"][r // config["dp"]][category] for r in range(4)]
            else:
                planned = [p["memory_per_rank"][category]] * 4
            if category == "peak_total":
                assert all(m <= q for m, q in zip(measured, planned)), (category, measured, planned)
            else:
                assert measured == planned, (category, measured, planned)
