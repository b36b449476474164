"""jobs/submit and jobs/run-local without Slurm: the sweeps rendered from a cluster profile
(--dry-run), the job scripts they render (bash -n, ShellCheck), wrong command lines (exit 2 and a
message naming the problem), and a small sweep run for real through mpiexec (SPEC.md section 7).
tests/slurm submits sweeps to a real Slurm."""

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
])
def test_rendered_scripts_pass_bash_n_and_shellcheck(sweep, options, tmp_path):
    awkward = "it's \"$(not run)\" `either`"  # an app argument that needs quoting
    scripts = dry_run(sweep, *options, app_args=["--model", "tiny", "--note", awkward])
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
                   ("ep", "ep4", "--experts 8 --top-k 2 --ep 4 --global-batch 8")]
    (script,) = dry_run("strategy", "--cluster", "local", "--values", "tp,pp", "--tp", "2", "--pp", "2").values()
    assert [label for _, label, _ in points(script)] == ["tp2", "pp2"]


@pytest.mark.parametrize("args, message", [
    (["nosuch", "--cluster", "local"], "unknown sweep 'nosuch'; known sweeps: micro-batch shard strategy"),
    (["shard", "--cluster", "nosuch"], "unknown cluster 'nosuch': no jobs/clusters/nosuch.env (profiles: example local)"),
    (["shard"], "name the cluster profile: --cluster NAME"),
    (["micro-batch", "--cluster", "local", "--app", "cp"], "unknown app 'cp'; known apps: dp fsdp tp pp ep"),
    (["micro-batch", "--cluster", "local", "--values", "1,0"], "micro-batch '0' is not a positive number"),
    (["micro-batch", "--cluster", "local", "--values", "1,2,1"], "'1' appears twice"),
    (["shard", "--cluster", "local", "--values", "ZERO3"], "unknown shard strategy 'ZERO3'"),
    (["strategy", "--cluster", "local", "--values", "dp,cp"], "unknown app 'cp'; known apps: dp fsdp tp pp ep"),
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


def test_every_app_of_the_sweeps_has_its_sbatch_script():
    """jobs/<app>.sbatch for each app a sweep can name, with its own job name and app."""
    done = run(["bash", "-c", "die() { exit 2; }; source jobs/lib/sweep.sh; echo \"${sweep_apps[*]}\""])
    apps = done.stdout.split()
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


def test_run_local_runs_ep(tmp_path):
    result = tmp_path / "ep.h5"
    done = run([RUN_LOCAL, "ep", "-n", "2", "--", *TINY, "--experts", "4", "--ep", "2", "--out", result])
    assert done.returncode == 0, done.stderr
    assert re.search(r"^run-local: mpiexec -n 2 \S+/bench/ep/parabench-ep --cluster local ", done.stderr, re.M)
    with h5py.File(result, "r") as f:
        assert f.attrs["status"] == "complete" and f["config"].attrs["ep"] == 2


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
