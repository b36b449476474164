"""jobs/submit and jobs/run-local without Slurm: the sweeps rendered from a cluster profile
(--dry-run), the job scripts they render (bash -n, ShellCheck), wrong command lines (exit 2 and a
message naming the problem), and a small sweep run for real through mpiexec (SPEC.md section 7).
tests/slurm submits sweeps to a real Slurm."""

import csv
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ["PB_BIN_DIR"]).parent if "PB_BIN_DIR" in os.environ else REPO / "build"
SUBMIT = REPO / "jobs" / "submit"
RUN_LOCAL = REPO / "jobs" / "run-local"
TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--vocab", "64", "--steps", "2",
        "--warmup", "1"]


def run(cmd, timeout=60):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PB_", "PMI_"))}
    env["PB_BUILD_DIR"] = str(BUILD_DIR)
    return subprocess.run([str(c) for c in cmd], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def dry_run(sweep, *options, app_args=()):
    """The scripts `jobs/submit --dry-run` prints, by name, as text."""
    done = run([SUBMIT, sweep, *options, "--dry-run", "--", *app_args])
    assert done.returncode == 0, done.stderr
    parts = re.split(r"^# ---- (\S+) ----\n", done.stdout, flags=re.M)
    assert parts[0] == "", parts[0]
    return {Path(name).name: text for name, text in zip(parts[1::2], parts[2::2])}


def directives(script):
    return re.findall(r"^#SBATCH (\S+)$", script, flags=re.M)


def points(script):
    """(app, label, args) of each array task of a rendered script, in task order."""
    found = re.findall(r"^  (\d+)\) app=(\S+) label=(\S+) args=\((.*)\) ;;$", script, flags=re.M)
    assert [int(i) for i, *_ in found] == list(range(len(found)))
    return [(app, label, args) for _, app, label, args in found]


def test_example_profile_renders_the_allocation():
    scripts = dry_run("micro-batch", "--cluster", "example", app_args=["--model", "gpt2-124m"])
    assert list(scripts) == ["array-1.sbatch"]
    script = scripts["array-1.sbatch"]
    assert directives(script)[:1] == ["--job-name=pb-micro-batch"]
    assert set(directives(script)) >= {"--array=0-3", "--nodes=1", "--ntasks-per-node=4", "--cpus-per-task=16",
                                       "--gpus-per-node=4", "--partition=booster", "--account=myproject",
                                       "--time=00:30:00", "--exclusive"}
    assert "gpus-per-task" not in script  # SPEC 7: it hides NVLink peers from NCCL
    assert [(a, l) for a, l, _ in points(script)] == [("fsdp", f"b{b}") for b in (1, 2, 4, 8)]
    assert points(script)[2][2] == r"--micro-batch 4 --tag sweep=micro-batch\ point=b4 --model gpt2-124m"
    assert "export PB_CLUSTER=example " in script
    assert re.search(r"^exec bash \S+/jobs/\$app\.sbatch \"\$\{args\[@\]\}\"$", script, flags=re.M)


@pytest.mark.parametrize("sweep, options", [
    ("micro-batch", ["--cluster", "example"]),
    ("shard", ["--cluster", "local"]),
    ("strategy", ["--cluster", "example"]),
    ("strategy", ["--cluster", "local", "--values", "ep", "--ep", "2", "--experts", "4", "--top-k", "1"]),
    ("weak-scaling", ["--cluster", "example", "--app", "fsdp"]),
    ("micro-batch", ["--cluster", "example", "--app", "ep"]),
    ("strong-scaling", ["--cluster", "local", "--app", "tp"]),
    ("strategy", ["--cluster", "local", "--values", "cp", "--cp", "2"]),
    ("sequence", ["--cluster", "example"]),
    ("sequence", ["--cluster", "local", "--values", "64,128", "--cp", "2,4"]),
    ("micro", ["--cluster", "example"]),
    ("layout", ["--cluster", "local", "--gpu-memory", "1", "--values", "2"]),
])
def test_rendered_scripts_pass_bash_n_and_shellcheck(sweep, options, tmp_path):
    awkward = "it's \"$(not run)\" `either`"  # an app argument that needs quoting
    extra = ["--global-batch", "8"] if sweep == "layout" else []
    scripts = dry_run(sweep, *options, app_args=["--model", "tiny", *extra, "--note", awkward])
    shellcheck = shutil.which("shellcheck")
    for name, script in scripts.items():
        path = tmp_path / name
        path.write_text(script)
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, f"{name}:\n{done.stderr}\n{script}"
        if shellcheck:
            done = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
            assert done.returncode == 0, f"{name}:\n{done.stdout}\n{script}"
        # The awkward argument comes back as one word, unchanged, and nothing in it ran.
        for _, _, args in points(script):
            words = subprocess.run(["bash", "-c", f"args=({args}); printf '%s\\n' \"${{args[@]}}\""],
                                   capture_output=True, text=True, check=True).stdout.splitlines()
            assert words[-2:] == ["--note", awkward]


def test_scaling_points_double_from_one_gpu_to_the_largest_job():
    scripts = dry_run("weak-scaling", "--cluster", "example")  # 4 ranks per node, PB_MAX_NODES 8
    shapes = []
    for name in sorted(scripts, key=lambda n: int(re.search(r"\d+", n).group())):
        d = dict(x.split("=", 1) for x in directives(scripts[name]) if "=" in x)
        ((app, label, args),) = points(scripts[name])
        assert app == "dp" and "--global-batch" not in args  # weak: the global batch grows with dp
        shapes.append((label, d["--nodes"], d["--ntasks-per-node"], d["--gpus-per-node"]))
    assert shapes == [("r1", "1", "1", "1"), ("r2", "1", "2", "2"), ("r4", "1", "4", "4"),
                      ("r8", "2", "4", "4"), ("r16", "4", "4", "4"), ("r32", "8", "4", "4")]

    scripts = dry_run("strong-scaling", "--cluster", "example", "--nodes", "1,2,4", app_args=["--micro-batch", "2"])
    labels_args = [points(s)[0] for s in scripts.values()]
    assert [label for _, label, _ in labels_args] == ["r4", "r8", "r16"]
    # one global batch: micro-batch x the least common multiple of the rank counts
    assert all(args.startswith("--global-batch 32 ") for _, _, args in labels_args)
    scripts = dry_run("strong-scaling", "--cluster", "local", "--ranks", "1,3,4")
    assert {points(s)[0][2].split()[1] for s in scripts.values()} == {"12"}


def test_shard_and_strategy_points():
    (script,) = dry_run("shard", "--cluster", "local").values()
    got = [(label, args.split(" --tag")[0]) for _, label, args in points(script)]
    assert got == [("NO_SHARD", "--shard NO_SHARD"), ("ZERO1", "--shard ZERO1"),
                   ("SHARD_GRAD_OP", "--shard SHARD_GRAD_OP"), ("FULL_SHARD", "--shard FULL_SHARD"),
                   # one node of 4 ranks: shard within halves, replicate across them
                   ("HYBRID_SHARD", "--shard HYBRID_SHARD --shard-group 2")]
    (script,) = dry_run("strategy", "--cluster", "local", app_args=["--micro-batch", "2"]).values()
    got = [(app, label, args.split(" --tag")[0]) for app, label, args in points(script)]
    assert got == [("dp", "dp", "--global-batch 8"), ("fsdp", "fsdp", "--shard FULL_SHARD --global-batch 8"),
                   ("tp", "tp4", "--tp 4 --global-batch 8"), ("pp", "pp4", "--pp 4 --global-batch 8"),
                   ("ep", "ep4", "--experts 8 --top-k 2 --ep 4 --global-batch 8"),
                   ("cp", "cp4", "--cp 4 --global-batch 8")]
    (script,) = dry_run("strategy", "--cluster", "local", "--values", "tp,pp", "--tp", "2", "--pp", "2").values()
    assert [label for _, label, _ in points(script)] == ["tp2", "pp2"]


@pytest.mark.parametrize("args, message", [
    (["nosuch", "--cluster", "local"], "unknown sweep 'nosuch'; known sweeps: micro-batch shard strategy"),
    (["shard", "--cluster", "nosuch"], "unknown cluster 'nosuch': no jobs/clusters/nosuch.env (profiles: example local netns-test)"),
    (["shard"], "name the cluster profile: --cluster NAME"),
    (["micro-batch", "--cluster", "local", "--app", "moe"], "unknown app 'moe'; known apps: dp fsdp tp pp ep cp hybrid"),
    (["micro-batch", "--cluster", "local", "--values", "1,0"], "micro-batch '0' is not a positive number"),
    (["micro-batch", "--cluster", "local", "--values", "1,2,1"], "'1' appears twice"),
    (["shard", "--cluster", "local", "--values", "ZERO3"], "unknown shard strategy 'ZERO3'"),
    (["strategy", "--cluster", "local", "--values", "dp,sp"], "unknown app 'sp'; known apps: dp fsdp tp pp ep cp"),
    (["micro-batch", "--cluster", "local", "--ep", "2"],
     "--tp, --pp, --ep, --experts and --top-k apply to the strategy sweep"),
    (["weak-scaling", "--cluster", "local", "--experts", "4"], "--ep, --experts and --top-k apply to the strategy sweep"),
    (["strategy", "--cluster", "local", "--ep", "0"], "--ep 0 is not a positive number"),
    (["strategy", "--cluster", "local", "--experts", "many"], "--experts many is not a positive number"),
    (["strategy", "--cluster", "local", "--top-k", "-1"], "--top-k -1 is not a positive number"),
    (["strategy", "--cluster", "local", "--", "--experts", "4"],
     "the strategy sweep sets ep's --experts; give the sweep's --experts N before --"),
    (["strategy", "--cluster", "local", "--values", "ep", "--", "--ep=2"], "the strategy sweep sets ep's --ep"),
    (["micro-batch", "--cluster", "local", "--", "--micro-batch", "2"], "sets --micro-batch; use --values"),
    (["shard", "--cluster", "local", "--", "--out", "x"], "--out is set by the sweep"),
    (["weak-scaling", "--cluster", "local", "--ranks", "1,8"], "8 ranks take 2 nodes; profile local allows PB_MAX_NODES=1"),
    (["weak-scaling", "--cluster", "example", "--ranks", "1,6"], "6 ranks is neither at most one node"),
    (["weak-scaling", "--cluster", "local", "--ranks", "4"], "a scaling sweep needs two rank counts or more"),
    (["micro-batch", "--cluster", "local", "--nodes", "2"], "--ranks and --nodes apply to the scaling sweeps"),
    (["shard", "--cluster", "local", "--bogus", "1"], "unknown option --bogus"),
    (["shard", "--cluster", "local", "--time", "soon"], "--time soon is not a Slurm time"),
    # cp in the strategy sweep, and the sequence sweep
    (["strategy", "--cluster", "local", "--cp", "0"], "--cp 0 is not a positive number"),
    (["strategy", "--cluster", "local", "--", "--cp", "2"],
     "the strategy sweep sets cp's --cp; give the sweep's --cp N before --"),
    (["micro-batch", "--cluster", "local", "--cp", "2"],
     "--cp applies to the strategy sweep (a degree) and the sequence sweep (a list of degrees)"),
    (["weak-scaling", "--cluster", "local", "--cp", "2"], "--cp applies to the strategy sweep"),
    (["sequence", "--cluster", "local", "--values", "2048,1024"],
     "--values: sequence lengths grow from point to point; 1024 follows 2048"),
    (["sequence", "--cluster", "local", "--values", "1024,1024"], "'1024' appears twice"),
    (["sequence", "--cluster", "local", "--values", "0,16"], "sequence length '0' is not a positive number"),
    (["sequence", "--cluster", "local", "--values", "16,30"],
     "--values: cp 2 does not fit: sequence length 30 is not divisible by 4 (--cp-layout zigzag splits each "
     "sequence into 2 x cp chunks)"),
    (["sequence", "--cluster", "local", "--values", "16,31", "--", "--cp-layout", "contiguous", "--model", "tiny"],
     "--values: cp 2 does not fit: sequence length 31 is not divisible by 2 (--cp-layout contiguous splits each "
     "sequence into cp chunks)"),
    (["sequence", "--cluster", "local", "--values", "64,128,256", "--", "--cp-algo", "alltoall", "--heads", "2"],
     "--values: cp 4 does not fit: --heads 2 is not divisible by cp 4 (--cp-algo alltoall"),
    (["sequence", "--cluster", "local", "--values", "64,128", "--cp", "1"],
     "--cp 1: give one cp degree per sequence length of --values (2)"),
    (["sequence", "--cluster", "local", "--values", "64,128", "--cp", "1,x"], "--cp: 'x' is not a positive number"),
    (["sequence", "--cluster", "local", "--values", "64,128", "--cp", "1,8"],
     "8 ranks take 2 nodes; profile local allows PB_MAX_NODES=1"),
    (["sequence", "--cluster", "example", "--values", "64,120", "--cp", "1,6"], "6 ranks is neither at most one node"),
    (["sequence", "--cluster", "local", "--", "--seq", "64"], "the sequence sweep sets --seq; use --values"),
    (["sequence", "--cluster", "local", "--", "--cp=2"], "the sequence sweep sets --cp; give the sweep's --cp LIST"),
    (["sequence", "--cluster", "local", "--", "--dp", "2"], "the sequence sweep runs dp 1 (each point on its cp ranks)"),
    (["sequence", "--cluster", "local", "--app", "dp"], "the sequence sweep runs cp, not dp"),
    (["sequence", "--cluster", "local", "--ranks", "1,2"],
     "--ranks and --nodes apply to the scaling sweeps; each point of the sequence sweep runs on its cp ranks"),
    (["sequence", "--cluster", "local", "--ep", "2"], "--tp, --pp, --ep, --experts and --top-k apply to the strategy sweep"),
    # the micro sweep
    (["micro", "--cluster", "local", "--values", "1"], "the micro sweep takes --nodes, not --values"),
    (["micro", "--cluster", "local", "--ranks", "4"],
     "--ranks applies to the scaling sweeps; the micro sweep runs on whole nodes (--nodes)"),
    (["micro", "--cluster", "local", "--app", "dp"], "the micro sweep runs parabench-micro; --app does not apply"),
    (["micro", "--cluster", "local", "--nodes", "2"], "8 ranks take 2 nodes; profile local allows PB_MAX_NODES=1"),
    (["micro", "--cluster", "example", "--nodes", "0"], "--nodes: '0' is not a positive number"),
    (["micro", "--cluster", "example", "--nodes", "1,2,1"], "'1' appears twice"),
    (["micro", "--cluster", "local", "--tp", "2"], "--tp, --pp, --ep, --experts and --top-k apply to the strategy sweep"),
    (["micro", "--cluster", "local", "--", "--out", "x"], "--out is set by the sweep"),
    # the layout sweep
    (["layout", "--cluster", "local", "--gpu-memory", "1"], "the layout sweep needs --global-batch G after --"),
    (["layout", "--cluster", "local", "--", "--global-batch", "8"], "the layout sweep needs --gpu-memory GIB"),
    (["layout", "--cluster", "local", "--gpu-memory", "1", "--", "--global-batch", "8", "--tp", "2"],
     "the layout sweep sets --tp (the planner's layouts)"),
    (["layout", "--cluster", "local", "--gpu-memory", "1", "--values", "0", "--", "--global-batch", "8"],
     "--values: '0' is not a positive number of layouts"),
    (["layout", "--cluster", "local", "--gpu-memory", "0.0001", "--", "--model", "small", "--global-batch", "8"],
     "parabench-plan --search: no layout of the model fits 0.0001 GiB on 4 ranks"),
    (["layout", "--cluster", "local", "--app", "dp"], "the layout sweep runs hybrid, not dp"),
    (["shard", "--cluster", "local", "--gpu-memory", "1"], "--gpu-memory applies to the layout sweep"),
])
def test_wrong_command_lines_exit_2_and_name_the_problem(args, message):
    for tool in (SUBMIT, RUN_LOCAL):
        if tool == RUN_LOCAL and ("--time" in args or args == ["shard"]):
            continue  # submit's own option; run-local defaults to profile local
        cmd = [tool, *(["--sweep"] if tool == RUN_LOCAL else []), args[0], "--dry-run", *args[1:]]
        done = run(cmd)
        assert done.returncode == 2, f"{cmd}: {done.returncode}\n{done.stderr}"
        assert message in done.stderr, f"{cmd}:\n{done.stderr}"
        assert done.stdout == "", f"{cmd} printed a script for a wrong command line"


def test_strategy_sweep_ep_degree_and_moe_options():
    """ep's degree, like tp's and pp's, defaults to the ranks per node, here as the largest that also
    divides the experts (ep groups hold E/ep whole experts); --ep, --experts and --top-k set them."""
    def ep_point(*options, cluster="example"):
        (script,) = dry_run("strategy", "--cluster", cluster, "--values", "ep", *options).values()
        ((app, label, args),) = points(script)
        assert app == "ep"
        return label, args.split(" --tag")[0]

    assert ep_point() == ("ep4", "--experts 8 --top-k 2 --ep 4 --global-batch 4")  # 4 ranks per node
    assert ep_point("--experts", "6") == ("ep2", "--experts 6 --top-k 2 --ep 2 --global-batch 4")
    assert ep_point("--experts", "3", "--top-k", "1") == ("ep1", "--experts 3 --top-k 1 --ep 1 --global-batch 4")
    assert ep_point("--ep", "2", "--experts", "16") == ("ep2", "--experts 16 --top-k 2 --ep 2 --global-batch 4")
    # The app, not the sweep, judges a degree that does not divide (as for --tp 3).
    assert ep_point("--ep", "3") == ("ep3", "--experts 8 --top-k 2 --ep 3 --global-batch 4")
    # Other MoE options after -- reach the ep point; the ep-only sweep then takes them as they are.
    (script,) = dry_run("strategy", "--cluster", "local", "--values", "ep",
                        app_args=["--capacity-factor", "0", "--aux-loss", "0.01"]).values()
    assert points(script)[0][2].endswith(" --capacity-factor 0 --aux-loss 0.01")
    # --app ep in the other sweeps: the app's own defaults, options after --.
    (script,) = dry_run("micro-batch", "--cluster", "local", "--app", "ep", "--values", "1,2",
                        app_args=["--experts", "4", "--ep", "2"]).values()
    assert [(a, l) for a, l, _ in points(script)] == [("ep", "b1"), ("ep", "b2")]
    assert points(script)[1][2] == r"--micro-batch 2 --tag sweep=micro-batch\ point=b2 --experts 4 --ep 2"
    assert "exec bash " in script and "/jobs/$app.sbatch" in script


def test_strategy_sweep_cp_degree():
    """cp's degree, like tp's and pp's, defaults to the ranks per node, here as the largest that divides
    them and splits the sequence into 2 x cp equal chunks (zigzag; cp chunks with --cp-layout
    contiguous; alltoall also needs heads divisible by cp). The sequence length and heads are those of
    --seq/--heads, else of the --model preset (default small: S128, 8 heads)."""
    def cp_point(*options, app_args=(), cluster="example"):
        (script,) = dry_run("strategy", "--cluster", cluster, "--values", "cp", *options, app_args=app_args).values()
        ((app, label, args),) = points(script)
        assert app == "cp"
        return label, args.split(" --tag")[0]

    assert cp_point() == ("cp4", "--cp 4 --global-batch 4")  # 4 ranks per node, small: 128 % 8 == 0
    assert cp_point(app_args=["--seq", "12"]) == ("cp2", "--cp 2 --global-batch 4")  # 12 % 8 != 0, 12 % 4 == 0
    assert cp_point(app_args=["--seq", "12", "--cp-layout", "contiguous"]) == ("cp4", "--cp 4 --global-batch 4")
    assert cp_point(app_args=["--seq=9"]) == ("cp1", "--cp 1 --global-batch 4")  # odd: no split
    assert cp_point(app_args=["--model", "tiny", "--cp-algo", "alltoall"]) == ("cp4", "--cp 4 --global-batch 4")
    assert cp_point(app_args=["--model", "tiny", "--cp-algo", "alltoall", "--heads", "2"]) == \
        ("cp2", "--cp 2 --global-batch 4")
    assert cp_point(app_args=["--model", "gpt2-1.5b", "--cp-algo", "alltoall"])[0] == "cp1"  # 25 heads
    # The micro-batch sets the global batch of every strategy; a degree given is passed as it is.
    assert cp_point("--cp", "3", app_args=["--micro-batch", "2"]) == ("cp3", "--cp 3 --global-batch 8")
    # Other cp options after -- reach the point as they are.
    (script,) = dry_run("strategy", "--cluster", "local", "--values", "cp",
                        app_args=["--cp-algo", "allgather", "--cp-layout", "contiguous"]).values()
    assert points(script)[0][2].endswith(" --cp-algo allgather --cp-layout contiguous")
    # --app cp in the other sweeps: the app's own defaults, options after --.
    (script,) = dry_run("micro-batch", "--cluster", "local", "--app", "cp", "--values", "1,2",
                        app_args=["--cp", "2"]).values()
    assert [(a, l) for a, l, _ in points(script)] == [("cp", "b1"), ("cp", "b2")]


def sequence_points(*options, app_args=(), cluster="example"):
    """(label, nodes, ranks per node, args without the tag) of each point of a sequence sweep, in the
    order of the arrays (one per allocation) and their tasks."""
    found = []
    scripts = dry_run("sequence", "--cluster", cluster, *options, app_args=app_args)
    for name in sorted(scripts, key=lambda n: int(re.search(r"\d+", n).group())):
        d = dict(x.split("=", 1) for x in directives(scripts[name]) if "=" in x)
        tasks = points(scripts[name])
        assert d["--array"].split("%")[0] == f"0-{len(tasks) - 1}"
        for app, label, args in tasks:
            assert app == "cp"
            found.append((label, int(d["--nodes"]), int(d["--ntasks-per-node"]), args.split(" --tag")[0]))
    return found


def test_sequence_sweep_grows_the_sequence_and_cp_together():
    """Point i runs parabench-cp at the i-th sequence length with cp 2^i on cp ranks (dp 1): every rank
    holds the same share of the sequence when the lengths double."""
    assert sequence_points(app_args=["--model", "gpt2-124m", "--micro-batch", "2"]) == [
        ("s1024-cp1", 1, 1, "--seq 1024 --cp 1"), ("s2048-cp2", 1, 2, "--seq 2048 --cp 2"),
        ("s4096-cp4", 1, 4, "--seq 4096 --cp 4"), ("s8192-cp8", 2, 4, "--seq 8192 --cp 8")]  # example: 4 per node
    # The micro-batch and the other options after -- go to every point; no --global-batch: dp is 1.
    (script,) = dry_run("sequence", "--cluster", "example", "--values", "16",
                        app_args=["--model", "tiny", "--micro-batch", "2", "--cp-algo", "allgather"]).values()
    assert points(script)[0][2] == (r"--seq 16 --cp 1 --tag sweep=sequence\ point=s16-cp1 --model tiny "
                                    r"--micro-batch 2 --cp-algo allgather")
    # --cp: a degree per length (here one node of 4 for both: one array of two points)
    assert sequence_points("--values", "64,128", "--cp", "4,4", cluster="local") == [
        ("s64-cp4", 1, 4, "--seq 64 --cp 4"), ("s128-cp4", 1, 4, "--seq 128 --cp 4")]
    # Not more ranks than the largest job of the profile (local: 1 node of 4): cp stays there, and says so.
    done = run([SUBMIT, "sequence", "--cluster", "local", "--dry-run", "--values", "16,32,64,128,256"])
    assert done.returncode == 0, done.stderr
    assert re.findall(r"label=(\S+)", done.stdout) == ["s16-cp1", "s32-cp2", "s64-cp4", "s128-cp4", "s256-cp4"]
    assert ("note: cp stays at 4 (PB_MAX_NODES=1 x PB_TASKS_PER_NODE=4 of local) for sequence length(s) 128 256"
            in done.stderr)
    assert "note:" not in run([SUBMIT, "sequence", "--cluster", "local", "--dry-run", "--values", "16,32"]).stderr
    # contiguous splits into cp chunks: 3 over cp 1 fits, as zigzag's 2 chunks would not
    assert sequence_points("--values", "3,6,12", app_args=["--cp-layout", "contiguous"])[::2] == \
        [("s3-cp1", 1, 1, "--seq 3 --cp 1"), ("s12-cp4", 1, 4, "--seq 12 --cp 4")]


def micro_points(*options, app_args=(), cluster="example"):
    """(label, nodes, ranks per node, GPUs per node, args) of each point of a micro sweep, in order."""
    found = []
    scripts = dry_run("micro", "--cluster", cluster, *options, app_args=app_args)
    for name in sorted(scripts, key=lambda n: int(re.search(r"\d+", n).group())):
        d = dict(x.split("=", 1) for x in directives(scripts[name]) if "=" in x)
        ((app, label, args),) = points(scripts[name])
        assert app == "micro" and d["--job-name"] == "pb-micro"
        found.append((label, int(d["--nodes"]), int(d["--ntasks-per-node"]), d.get("--gpus-per-node"), args))
    return found


def test_micro_sweep_runs_on_one_two_and_all_nodes():
    """parabench-micro on 1 node, 2 nodes and every node the profile allows (PB_MAX_NODES), one rank
    per GPU: one job array per node count; --nodes N stops at N, --nodes LIST gives the counts."""
    got = micro_points(app_args=["--benchmark_repetitions=3"])  # example: 4 GPUs per node, 8 nodes
    assert [p[:4] for p in got] == [("n1", 1, 4, "4"), ("n2", 2, 4, "4"), ("n8", 8, 4, "4")]
    assert got[0][4] == r"--tag sweep=micro\ point=n1 --benchmark_repetitions=3"
    assert [p[:3] for p in micro_points("--nodes", "4")] == [("n1", 1, 4), ("n2", 2, 4), ("n4", 4, 4)]
    assert [p[:3] for p in micro_points("--nodes", "2")] == [("n1", 1, 4), ("n2", 2, 4)]
    assert [p[:3] for p in micro_points("--nodes", "1")] == [("n1", 1, 4)]
    assert [p[:3] for p in micro_points("--nodes", "3,8")] == [("n3", 3, 4), ("n8", 8, 4)]
    # local: one node of 4 ranks, no GPUs
    assert [p[:4] for p in micro_points(cluster="local")] == [("n1", 1, 4, None)]


def test_micro_sbatch_adds_a_cpu_size_limit_unless_given(tmp_path):
    """jobs/micro.sbatch runs parabench-micro as the other scripts run their app; on a profile without
    GPUs it adds --max-bytes 256M (not --peak-tflops, which parabench-micro does not take)."""
    fake = tmp_path / "parabench-micro"
    fake.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$(dirname \"$0\")/args\"\n")
    fake.chmod(0o755)
    for extra, expected in (([], ["--max-bytes", "256M"]), (["--max-bytes", "1M"], ["--max-bytes", "1M"])):
        out = tmp_path / f"out{len(extra)}"
        done = subprocess.run(["bash", "jobs/micro.sbatch", "--ops", "all_reduce", *extra], cwd=REPO,
                              env={**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PB_"))},
                                   "PB_BIN": str(fake), "PB_RANKS": "1", "PB_OUT": str(out)},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        args = (tmp_path / "args").read_text().split("\n")[:-1]
        assert args[:4] == ["--out", str(out), "--cluster", "local"]
        assert args[4:] == (expected + ["--ops", "all_reduce"] if not extra else ["--ops", "all_reduce", *extra])
        assert "--peak-tflops" not in args
        assert (out / "command.txt").read_text().startswith("mpiexec -n 1 ")
        assert (out / "cluster.env").is_file() and (out / "environment.txt").is_file()


def test_every_app_of_the_sweeps_has_its_sbatch_script():
    """jobs/<app>.sbatch for each app a sweep can name, with its own job name and app."""
    done = run(["bash", "-c", "die() { exit 2; }; source jobs/lib/sweep.sh; echo \"${sweep_apps[*]}\""])
    apps = done.stdout.split() + ["micro"]  # the micro sweep's app
    assert "ep" in apps and done.returncode == 0, done.stderr
    for app in apps:
        script = (REPO / "jobs" / f"{app}.sbatch").read_text()
        assert os.access(REPO / "jobs" / f"{app}.sbatch", os.X_OK)
        assert f"#SBATCH --job-name=parabench-{app}\n" in script
        assert re.search(rf"^export app={app}$", script, flags=re.M)
        assert f"bench/{app}/parabench-{app}" in script
        shellcheck = shutil.which("shellcheck")
        if shellcheck:
            done = subprocess.run([shellcheck, "-x", f"jobs/{app}.sbatch"], cwd=REPO, capture_output=True, text=True)
            assert done.returncode == 0, done.stdout


def test_run_local_strategy_sweep_runs_ep_through_its_sbatch_script(tmp_path):
    out = tmp_path / "sweep"
    done = run([RUN_LOCAL, "--sweep", "strategy", "--values", "ep", "--experts", "4", "--out", out, "--", *TINY],
               timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[1/1] ep4: ep on 4 rank(s)" in done.stderr and "1 of 1 point(s) complete" in done.stderr
    point = out / "ep4"
    (result,) = point.glob("*.h5")
    with h5py.File(result, "r") as f:
        assert f.attrs["status"] == "complete"
        config = f["config"].attrs
        assert (config["app"], config["world_size"], config["ep"], config["experts"], config["top_k"]) == \
            ("ep", 4, 4, 4, 2)
        assert config["global_batch"] == 4 and config["tag"] == "sweep=strategy point=ep4"
        assert f["moe/tokens_per_expert"].shape == (2, 2, 4)  # steps, layers, experts
        assert f["system"].attrs["cluster"] == "local"
    command = (point / "command.txt").read_text()
    assert command.startswith("mpiexec -n 4 ") and "/bench/ep/parabench-ep " in command
    assert "--experts 4 --top-k 2 --ep 4 " in command
    assert (point / "cluster.env").is_file() and (point / "environment.txt").is_file()
    assert "PARABENCH_RESULT app=ep ranks=4" in (out / "ep4.out").read_text()


def test_run_local_strategy_sweep_runs_cp_through_its_sbatch_script(tmp_path):
    out = tmp_path / "sweep"
    done = run([RUN_LOCAL, "--sweep", "strategy", "--values", "cp", "--out", out, "--", *TINY, "--cp-layout",
                "contiguous"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[1/1] cp4: cp on 4 rank(s)" in done.stderr and "1 of 1 point(s) complete" in done.stderr
    point = out / "cp4"
    (result,) = point.glob("*.h5")
    with h5py.File(result, "r") as f:
        assert f.attrs["status"] == "complete"
        config = f["config"].attrs
        assert (config["app"], config["world_size"], config["cp"], config["dp"], config["seq"]) == ("cp", 4, 4, 1, 16)
        assert (config["cp_algo"], config["cp_layout"]) == ("ring", "contiguous")
        assert config["global_batch"] == 4 and config["tag"] == "sweep=strategy point=cp4"
        assert f["cp/attention_time_s"].shape == (2, 4)  # steps, ranks
        assert f["system"].attrs["cluster"] == "local"
    command = (point / "command.txt").read_text()
    assert command.startswith("mpiexec -n 4 ") and "/bench/cp/parabench-cp " in command
    assert "--cp 4 --global-batch 4 " in command
    assert (point / "cluster.env").is_file() and (point / "environment.txt").is_file()
    assert "PARABENCH_RESULT app=cp ranks=4" in (out / "cp4.out").read_text()


def test_run_local_sequence_sweep_runs_each_point_on_its_cp_ranks(tmp_path):
    out = tmp_path / "sweep"
    shape = [a for a in TINY]
    del shape[shape.index("--seq"):shape.index("--seq") + 2]
    done = run([RUN_LOCAL, "--sweep", "sequence", "--values", "16,32,64", "--out", out, "--", *shape], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 of 3 point(s) complete" in done.stderr
    assert [line.split("\t")[:5] for line in (out / "points.tsv").read_text().splitlines()[1:]] == [
        ["0", "s16-cp1", "cp", "1", "1"], ["1", "s32-cp2", "cp", "1", "2"], ["2", "s64-cp4", "cp", "1", "4"]]
    for seq, cp in ((16, 1), (32, 2), (64, 4)):
        label = f"s{seq}-cp{cp}"
        (result,) = (out / label).glob("*.h5")
        with h5py.File(result, "r") as f:
            config = f["config"].attrs
            assert f.attrs["status"] == "complete"
            assert (config["seq"], config["cp"], config["world_size"], config["dp"]) == (seq, cp, cp, 1)
            assert config["global_batch"] == 1 and config["tag"] == f"sweep=sequence point={label}"
            assert ("cp" in f) == (cp > 1)  # cp 1 writes no /cp
        assert (out / label / "command.txt").read_text().startswith(f"mpiexec -n {cp} ")


def test_run_local_runs_cp(tmp_path):
    result = tmp_path / "cp.h5"
    done = run([RUN_LOCAL, "cp", "-n", "2", "--", *TINY, "--cp", "2", "--out", result])
    assert done.returncode == 0, done.stderr
    assert re.search(r"^run-local: mpiexec -n 2 \S+/bench/cp/parabench-cp --cluster local ", done.stderr, re.M)
    with h5py.File(result, "r") as f:
        assert f.attrs["status"] == "complete" and f["config"].attrs["cp"] == 2


def test_run_local_runs_ep(tmp_path):
    result = tmp_path / "ep.h5"
    done = run([RUN_LOCAL, "ep", "-n", "2", "--", *TINY, "--experts", "4", "--ep", "2", "--out", result])
    assert done.returncode == 0, done.stderr
    assert re.search(r"^run-local: mpiexec -n 2 \S+/bench/ep/parabench-ep --cluster local ", done.stderr, re.M)
    with h5py.File(result, "r") as f:
        assert f.attrs["status"] == "complete" and f["config"].attrs["ep"] == 2


def micro_binary():
    """parabench-micro of this build; built only where Google Benchmark was found."""
    binary = BUILD_DIR / "bench" / "micro" / "parabench-micro"
    if not binary.exists():
        pytest.skip(f"{binary} is not built (Google Benchmark not found)")
    return binary


MICRO_FILTER = "--benchmark_filter=gemm/cpu/fp32/small.qkv/|coll/mpi/all_reduce/in_place/(8|16|32)/"


def test_run_local_runs_micro_with_the_cpu_size_limit(tmp_path):
    micro_binary()
    result = tmp_path / "micro.h5"
    done = run([RUN_LOCAL, "micro", "-n", "2", "--", MICRO_FILTER, "--benchmark_min_time=0.001", "--out", result])
    assert done.returncode == 0, done.stderr
    assert re.search(r"^run-local: mpiexec -n 2 \S+/bench/micro/parabench-micro --cluster local --max-bytes 256M ",
                     done.stderr, re.M)
    with h5py.File(result, "r") as f:
        assert f.attrs["status"] == "complete"
        config = f["config"].attrs
        assert (config["app"], config["world_size"], config["max_bytes"]) == ("micro", 2, 256 * 2 ** 20)
        assert list(f["micro/collectives/all_reduce/bytes"][()]) == [8, 16, 32]
        assert f["micro/gemm/shape"].asstr()[()].tolist() == ["small.qkv", "small.qkv"]
        assert f["micro/gemm/operands"].asstr()[()].tolist() == ["cached", "cold"]


def test_run_local_micro_sweep_and_its_report(tmp_path):
    """The micro sweep here (profile local: one node of 4 ranks) through jobs/micro.sbatch, then the
    report of its folder: the end-to-end path of a cluster's micro sweep."""
    micro_binary()
    out = tmp_path / "sweep"
    done = run([RUN_LOCAL, "--sweep", "micro", "--out", out, "--", MICRO_FILTER, "--benchmark_min_time=0.001",
                "--max-bytes", "4K"], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[1/1] n1: micro on 4 rank(s)" in done.stderr and "1 of 1 point(s) complete" in done.stderr
    (result,) = (out / "n1").glob("*.h5")
    with h5py.File(result, "r") as f:
        assert f.attrs["status"] == "complete"
        config = f["config"].attrs
        assert (config["app"], config["world_size"], config["max_bytes"]) == ("micro", 4, 4096)
        assert config["tag"] == "sweep=micro point=n1" and f["system"].attrs["cluster"] == "local"
        assert f["micro/collectives/all_reduce"].attrs["ranks"] == 4
    command = (out / "n1" / "command.txt").read_text()
    assert command.startswith("mpiexec -n 4 ") and "/bench/micro/parabench-micro --out " in command
    done = subprocess.run(["/usr/bin/python3", "-m", "analysis.report", str(out), "--out", str(out / "report")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    md = (out / "report" / "report.md").read_text()
    assert "### local: GEMM" in md and "### local: collectives" in md
    assert (out / "report" / "plots" / "micro_busbw.png").stat().st_size > 0


def test_run_local_sweep_runs_each_point_through_its_sbatch_script(tmp_path):
    out = tmp_path / "sweep"
    done = run([RUN_LOCAL, "--sweep", "micro-batch", "--values", "1,2", "--out", out, "--", *TINY], timeout=120)
    assert done.returncode == 0, done.stderr
    assert "[1/2] b1: fsdp on 4 rank(s)" in done.stderr and "2 of 2 point(s) complete" in done.stderr
    assert (out / "points.tsv").read_text().splitlines()[1].split("\t")[:5] == ["0", "b1", "fsdp", "1", "4"]
    for b in (1, 2):
        point = out / f"b{b}"
        (result,) = point.glob("*.h5")
        with h5py.File(result, "r") as f:
            assert f.attrs["status"] == "complete"
            assert f["config"].attrs["micro_batch"] == b
            assert f["config"].attrs["world_size"] == 4
            assert f["system"].attrs["cluster"] == "local"
            assert f["config"].attrs["tag"] == f"sweep=micro-batch point=b{b}"
        assert (point / "command.txt").read_text().startswith("mpiexec -n 4 ")  # no Slurm: mpiexec
        assert "HDF5_USE_FILE_LOCKING=FALSE" in (point / "environment.txt").read_text().splitlines()
        assert (point / "cluster.env").is_file()
        assert "PARABENCH_RESULT app=fsdp ranks=4" in (out / f"b{b}.out").read_text()


def test_run_local_sweep_goes_on_after_a_failed_point_and_exits_1(tmp_path):
    out = tmp_path / "sweep"
    # tp 3 does not divide 4 ranks: that point fails with the app's exit 2, dp still runs.
    done = run([RUN_LOCAL, "--sweep", "strategy", "--values", "tp,dp", "--tp", "3", "--out", out, "--", *TINY],
               timeout=120)
    assert done.returncode == 1, done.stderr
    assert "tp3: exit 2" in done.stderr and "1 of 2 point(s) complete; failed: tp3" in done.stderr
    assert len(list((out / "dp").glob("*.h5"))) == 1
    assert not list((out / "tp3").glob("*.h5"))


def test_run_local_dry_run_prints_the_commands_and_runs_nothing(tmp_path):
    out = tmp_path / "sweep"
    done = run([RUN_LOCAL, "--sweep", "strong-scaling", "--ranks", "1,2", "--out", out, "--dry-run", "--", *TINY])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"PB_CLUSTER=local PB_RANKS=1 PB_OUT={out}/r1 bash jobs/dp.sbatch --global-batch 2 ")
    assert not out.exists()


def test_run_local_layout_sweep_runs_the_planners_fastest_layouts_and_reports_them(tmp_path):
    """The layout sweep on profile local (4 ranks): parabench-plan --app hybrid --search's top layouts, each run
    through jobs/hybrid.sbatch with the planner's rank and step time in its tag, then the report's section that
    ranks the measured layouts beside the planned ones."""
    out = tmp_path / "sweep"
    shape = [*TINY, "--global-batch", "8"]
    done = run([RUN_LOCAL, "--sweep", "layout", "--gpu-memory", "1", "--values", "2", "--out", out, "--", *shape],
               timeout=180)
    assert done.returncode == 0, done.stderr
    assert "2 of 2 point(s) complete" in done.stderr
    plan_bin = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench"))) / "plan" / "parabench-plan"
    planner = subprocess.run([str(plan_bin), "--app", "hybrid", "--search",
                              "--gpus", "4", "--gpus-per-node", "4", "--gpu-memory", "1", "--top", "2", "--format",
                              "csv", "--backend", "cpu", *shape[:shape.index("--steps")], "--global-batch", "8"],
                             capture_output=True, text=True, check=True).stdout
    planned = list(csv.DictReader(io.StringIO(planner)))
    assert len(planned) == 2
    for row in planned:
        label = f"r{row['rank']}"
        (result,) = (out / label).glob("*.h5")
        with h5py.File(result, "r") as f:
            config = f["config"].attrs
            assert f.attrs["status"] == "complete" and config["app"] == "hybrid"
            assert config["tag"] == f"sweep=layout point={label} planned_rank={row['rank']} planned_step_s={row['step_s']}"
            assert (config["tp"], config["pp"], config["cp"], config["dp"]) == (
                int(row["tp"].replace("+sp", "")), int(row["pp"]), int(row["cp"]), int(row["dp"]))
            assert config["shard"] == row["shard"].split("/")[0] and config["recompute"] == row["recompute"]
        assert row["args"] in (out / label / "command.txt").read_text()
    done = subprocess.run(["/usr/bin/python3", "-m", "analysis.report", str(out), "--out", str(out / "report")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    md = (out / "report" / "report.md").read_text()
    section = md[md.index("### Hybrid layouts: measured against planned"):]
    table = [line for line in section.splitlines() if line.startswith("| ") and "measured rank" not in line]
    assert len(table) == 2
    assert sorted(line.split(" | ")[1] for line in table) == ["1", "2"]  # both planned ranks (rows in measured order)
    assert list((out / "report" / "plots").glob("layouts_*.png"))



def test_points_lists_what_the_job_arrays_run_and_nothing_else(tmp_path):
    """--points (what jobs/reframe builds its checks from): points.tsv's table on stdout, the same points
    as the rendered job arrays, from jobs/submit and jobs/run-local alike, and no folder written."""
    options = ["strategy", "--cluster", "example", "--values", "dp,tp,ep", "--out", tmp_path / "sweep"]
    done = run([SUBMIT, *options, "--points", "--", "--model", "tiny", "--note", "a b"])
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert rows[0] == ["index", "label", "app", "nodes", "ranks_per_node", "args"]
    assert [r[:5] for r in rows[1:]] == [["0", "dp", "dp", "1", "4"], ["1", "tp4", "tp", "1", "4"],
                                        ["2", "ep4", "ep", "1", "4"]]
    (script,) = dry_run("strategy", "--cluster", "example", "--values", "dp,tp,ep",
                        app_args=["--model", "tiny", "--note", "a b"]).values()
    assert [(r[2], r[1], r[5]) for r in rows[1:]] == points(script)
    local = run([RUN_LOCAL, "--sweep", *options, "--points", "--", "--model", "tiny", "--note", "a b"])
    assert local.returncode == 0 and local.stdout == done.stdout, local.stderr
    assert not (tmp_path / "sweep").exists()
