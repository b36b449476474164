"""jobs/submit under a real Slurm (the `slurm` fixture of conftest.py): four sweeps are submitted
with the `local` profile as a user submits them, run to the end, and judged by Slurm's record of
the jobs and by what each point left: its result file, the job record, the environment and the
launch command (SPEC.md section 7).

  micro-batch     one job array of three points (micro-batch 1, 2, 4) at 4 ranks
  strong-scaling  three job arrays (1, 2 and 4 ranks) chained one after another, one global batch
  strategy        its ep and cp points (--values ep,cp): parabench-ep, 8 experts over ep groups of 4
                  ranks, and parabench-cp, each sequence split over 4 ranks, in one array
  sequence        parabench-cp at sequence 16 and 32 with cp 1 and 2: two chained arrays of 1 and 2
                  ranks
  micro           parabench-micro through jobs/micro.sbatch on the one node (4 ranks), a few GEMMs
                  and collectives (where parabench-micro is built: Google Benchmark found)
"""

import re
import subprocess
import time
from pathlib import Path

import h5py
import pytest

from conftest import BUILD_DIR, REPO

# A model small enough for 2 cores; 3 steps, 1 of them warm-up.
APP_ARGS = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--vocab", "64",
            "--steps", "3", "--warmup", "1"]
MICRO_BATCHES = [1, 2, 4]
SCALING_RANKS = [1, 2, 4]
SEQUENCES = [(16, 1), (32, 2)]  # (sequence length, cp degree = ranks) of the sequence sweep
WAIT_S = 240  # for all eleven points; each takes a few seconds
MICRO_ARGS = ["--benchmark_filter=gemm/cpu/fp32/small.qkv/|coll/mpi/(all_reduce|send_recv_intra)/",
              "--benchmark_min_time=0.001", "--max-bytes", "4K"]
MICRO_BUILT = (BUILD_DIR / "bench" / "micro" / "parabench-micro").exists()


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def scontrol_jobs(slurm, job):
    """Slurm's records of a job (one per array task) as dicts of scontrol's KEY=VALUE fields."""
    done = slurm.run("scontrol", "-o", "show", "job", job)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in done.stdout.splitlines() if line.strip()]


def submit(slurm, sweep_dir, sweep, *options, app_args=APP_ARGS):
    cmd = [REPO / "jobs" / "submit", sweep, "--cluster", "local", "--out", sweep_dir, *options, "--", *app_args]
    done = slurm.run(*cmd)
    assert "submit: job " in done.stderr, done.stderr
    lines = (sweep_dir / "jobs.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["job", "script", "labels"]
    return [dict(zip(["job", "script", "labels"], line.split("\t"))) for line in lines[1:]]


def outputs(sweep_dirs):
    parts = []
    for d in sweep_dirs:
        for path in sorted(Path(d).glob("slurm-*.out")):
            parts.append(f"--- {path} ---\n{path.read_text(errors='replace')}")
    return "\n".join(parts) or "(no job output yet)"


@pytest.fixture(scope="module")
def sweeps(slurm, tmp_path_factory):
    """Submits the sweeps, waits for every job to leave the queue, and returns what was submitted."""
    base = tmp_path_factory.mktemp("sweeps")
    dirs = {"micro-batch": base / "micro-batch", "strong-scaling": base / "strong-scaling",
            "strategy": base / "strategy", "sequence": base / "sequence", "micro": base / "micro"}
    no_seq = APP_ARGS[:APP_ARGS.index("--seq")] + APP_ARGS[APP_ARGS.index("--seq") + 2:]  # the sweep sets it
    jobs = {
        "micro-batch": submit(slurm, dirs["micro-batch"], "micro-batch",
                              "--values", ",".join(map(str, MICRO_BATCHES))),
        "strong-scaling": submit(slurm, dirs["strong-scaling"], "strong-scaling",
                                 "--ranks", ",".join(map(str, SCALING_RANKS))),
        "strategy": submit(slurm, dirs["strategy"], "strategy", "--values", "ep,cp"),
        "sequence": submit(slurm, dirs["sequence"], "sequence", "--values", ",".join(str(s) for s, _ in SEQUENCES),
                           app_args=no_seq),
        "micro": submit(slurm, dirs["micro"], "micro", app_args=MICRO_ARGS) if MICRO_BUILT else [],
    }
    ids = [j["job"] for js in jobs.values() for j in js]
    deadline = time.monotonic() + WAIT_S
    while True:
        queue = slurm.run("squeue", "-h", "-o", "%i %T %r", "-j", ",".join(ids)).stdout.strip()
        if not queue:
            break
        if time.monotonic() > deadline:
            subprocess.run(["scancel", *ids], env=slurm.env, capture_output=True, timeout=20)
            pytest.fail(f"the sweeps did not finish within {WAIT_S} s; still queued:\n{queue}\n"
                        + outputs(dirs.values()) + "\n" + slurm.diagnostics())
        time.sleep(1)
    records = {j["job"]: scontrol_jobs(slurm, j["job"]) for js in jobs.values() for j in js}
    micro = {j["job"] for j in jobs["micro"]}  # judged by its own test, not by the other sweeps'
    failed = [r for job, rs in records.items() if job not in micro for r in rs
              if (r.get("JobState"), r.get("ExitCode")) != ("COMPLETED", "0:0")]
    if failed:
        pytest.fail("jobs did not complete:\n" + "\n".join(
            f"job {r.get('JobId')} (array {r.get('ArrayJobId')} task {r.get('ArrayTaskId')}): "
            f"{r.get('JobState')} exit {r.get('ExitCode')}" for r in failed)
            + "\n" + outputs(dirs.values()) + "\n" + slurm.diagnostics())
    return {"dirs": dirs, "jobs": jobs, "records": records}


def point_result(point_dir):
    """The one result file of a point, read: attributes, config, system, environment."""
    files = sorted(point_dir.glob("*.h5"))
    assert len(files) == 1, f"{point_dir} holds {[f.name for f in files]}, not one result file"
    with h5py.File(files[0], "r") as f:
        return {
            "status": text(f.attrs["status"]),
            "config": {k: text(v) for k, v in f["config"].attrs.items()},
            "system": {k: text(v) for k, v in f["system"].attrs.items()},
            "environment": [text(e) for e in f["system/environment"][()]],
            "measured_steps": int(f["summary"].attrs["measured_steps"]) if "summary" in f else None,
        }


def check_point(point_dir, record, label, sweep, ranks, measured_steps=2):
    """What every point of a sweep must leave next to its result (SPEC 7), under its own job."""
    job, array, task = record["JobId"], record["ArrayJobId"], record["ArrayTaskId"]
    result = point_result(point_dir)
    assert result["status"] == "complete"
    assert result["measured_steps"] == measured_steps
    assert result["system"]["cluster"] == "local"
    assert result["system"]["slurm_job_id"] == job
    assert result["system"]["slurm_partition"] == "debug"
    assert result["config"]["world_size"] == ranks
    assert result["config"]["tag"] == f"sweep={sweep} point={label}"
    assert f"SLURM_ARRAY_JOB_ID={array}" in result["environment"]
    assert f"SLURM_ARRAY_TASK_ID={task}" in result["environment"]

    record_text = (point_dir / "slurm_job.txt").read_text()
    assert f"JobId={job} " in record_text and f"ArrayJobId={array} " in record_text
    environment = (point_dir / "environment.txt").read_text().splitlines()
    assert "HDF5_USE_FILE_LOCKING=FALSE" in environment
    assert f"SLURM_JOB_ID={job}" in environment
    assert (point_dir / "cluster.env").read_text() == (REPO / "jobs" / "clusters" / "local.env").read_text()
    # The local profile starts ranks with srun and the pmi2 plugin, as a cluster would.
    command = (point_dir / "command.txt").read_text()
    assert command.startswith("srun --mpi=pmi2 "), command
    assert f"--out {point_dir}" in command
    return result


def intervals(records):
    """(start, end) of each record, in scontrol's second resolution, by start."""
    return sorted((r["StartTime"], r["EndTime"]) for r in records)


def test_micro_batch_sweep_runs_as_one_job_array(sweeps):
    jobs = sweeps["jobs"]["micro-batch"]
    sweep_dir = sweeps["dirs"]["micro-batch"]
    labels = [f"b{b}" for b in MICRO_BATCHES]
    assert len(jobs) == 1 and jobs[0]["labels"].split() == labels

    script = (sweep_dir / jobs[0]["script"]).read_text()
    assert f"#SBATCH --array=0-{len(labels) - 1}%1\n" in script  # local: one point at a time
    assert "#SBATCH --nodes=1\n" in script and "#SBATCH --ntasks-per-node=4\n" in script
    assert "--gpus-per-task" not in script and "--gpus-per-node" not in script  # no GPUs in profile local

    records = sweeps["records"][jobs[0]["job"]]
    assert sorted(int(r["ArrayTaskId"]) for r in records) == list(range(len(labels)))
    assert {r["ArrayJobId"] for r in records} == {jobs[0]["job"]}
    assert all(r["NumTasks"] == "4" for r in records)
    for record in records:
        index = int(record["ArrayTaskId"])
        result = check_point(sweep_dir / labels[index], record, labels[index], "micro-batch", 4)
        assert result["config"]["micro_batch"] == MICRO_BATCHES[index]
        out = (sweep_dir / f"slurm-{record['ArrayJobId']}_{index}.out").read_text()
        assert re.search(r"^PARABENCH_RESULT app=fsdp ranks=4 .* status=complete ", out, re.M), out
    spans = intervals(records)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), \
        f"points of the array overlapped (throttle %1): {spans}"


def test_strong_scaling_sweep_runs_one_array_per_size_in_order(sweeps):
    jobs = sweeps["jobs"]["strong-scaling"]
    sweep_dir = sweeps["dirs"]["strong-scaling"]
    assert [j["labels"] for j in jobs] == [f"r{r}" for r in SCALING_RANKS]
    global_batch = max(SCALING_RANKS)  # micro-batch 1 x the largest rank count
    spans = []
    for job, ranks in zip(jobs, SCALING_RANKS):
        script = (sweep_dir / job["script"]).read_text()
        assert "#SBATCH --array=0-0%1\n" in script
        assert f"#SBATCH --ntasks-per-node={ranks}\n" in script
        (record,) = sweeps["records"][job["job"]]
        assert record["NumTasks"] == str(ranks)
        result = check_point(sweep_dir / job["labels"], record, job["labels"], "strong-scaling", ranks)
        assert result["config"]["global_batch"] == global_batch
        assert result["config"]["grad_accum"] == global_batch // ranks
        spans.append((record["StartTime"], record["EndTime"]))
    # PB_ARRAY_PARALLEL=1 chains the arrays: each starts after the one before has ended.
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def test_strategy_sweep_runs_ep_as_the_other_apps(sweeps):
    (job,) = sweeps["jobs"]["strategy"]
    sweep_dir = sweeps["dirs"]["strategy"]
    # ep's degree: the ranks per node, which divide the 8 experts; cp's: they split 16 into 8 chunks
    assert job["labels"] == "ep4 cp4"
    script = (sweep_dir / job["script"]).read_text()
    assert "#SBATCH --ntasks-per-node=4\n" in script and "app=ep label=ep4 " in script
    record = next(r for r in sweeps["records"][job["job"]] if r["ArrayTaskId"] == "0")
    result = check_point(sweep_dir / "ep4", record, "ep4", "strategy", 4)
    config = result["config"]
    assert (config["app"], config["ep"], config["experts"], config["top_k"], config["global_batch"]) == \
        ("ep", 4, 8, 2, 4)
    assert "/bench/ep/parabench-ep " in (sweep_dir / "ep4" / "command.txt").read_text()
    (path,) = (sweep_dir / "ep4").glob("*.h5")
    with h5py.File(path, "r") as f:
        assert f["moe/tokens_per_expert"].shape == (3, 2, 8)  # steps, layers, experts
    out = (sweep_dir / f"slurm-{record['ArrayJobId']}_0.out").read_text()
    assert re.search(r"^PARABENCH_RESULT app=ep ranks=4 .* status=complete ", out, re.M), out


def test_strategy_sweep_runs_cp_in_the_same_array(sweeps):
    (job,) = sweeps["jobs"]["strategy"]
    sweep_dir = sweeps["dirs"]["strategy"]
    script = (sweep_dir / job["script"]).read_text()
    assert "#SBATCH --array=0-1%1\n" in script and "app=cp label=cp4 " in script
    record = next(r for r in sweeps["records"][job["job"]] if r["ArrayTaskId"] == "1")
    assert record["NumTasks"] == "4"
    result = check_point(sweep_dir / "cp4", record, "cp4", "strategy", 4)
    config = result["config"]
    assert (config["app"], config["cp"], config["dp"], config["cp_algo"], config["cp_layout"], config["global_batch"]) \
        == ("cp", 4, 1, "ring", "zigzag", 4)
    assert "/bench/cp/parabench-cp " in (sweep_dir / "cp4" / "command.txt").read_text()
    (path,) = (sweep_dir / "cp4").glob("*.h5")
    with h5py.File(path, "r") as f:
        assert f["cp/attention_time_s"].shape == (3, 4)  # steps, ranks
        assert f["summary"].attrs["cp_attention_time_ratio"] >= 1
    out = (sweep_dir / f"slurm-{record['ArrayJobId']}_1.out").read_text()
    assert re.search(r"^PARABENCH_RESULT app=cp ranks=4 .* status=complete ", out, re.M), out


def test_sequence_sweep_grows_sequence_and_cp_in_chained_arrays(sweeps):
    jobs = sweeps["jobs"]["sequence"]
    sweep_dir = sweeps["dirs"]["sequence"]
    labels = [f"s{seq}-cp{cp}" for seq, cp in SEQUENCES]
    assert [j["labels"] for j in jobs] == labels  # one array per job size
    spans = []
    for job, label, (seq, cp) in zip(jobs, labels, SEQUENCES):
        script = (sweep_dir / job["script"]).read_text()
        assert "#SBATCH --array=0-0%1\n" in script and "#SBATCH --nodes=1\n" in script
        assert f"#SBATCH --ntasks-per-node={cp}\n" in script
        assert f"app=cp label={label} args=(--seq {seq} --cp {cp} " in script
        (record,) = sweeps["records"][job["job"]]
        assert record["NumTasks"] == str(cp)
        result = check_point(sweep_dir / label, record, label, "sequence", cp)
        config = result["config"]
        assert (config["seq"], config["cp"], config["dp"], config["global_batch"]) == (seq, cp, 1, 1)
        (path,) = (sweep_dir / label).glob("*.h5")
        with h5py.File(path, "r") as f:
            assert ("cp" in f) == (cp > 1)  # cp 1 writes no /cp
        spans.append((record["StartTime"], record["EndTime"]))
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def test_micro_sweep_runs_parabench_micro_on_the_node(sweeps):
    if not MICRO_BUILT:
        pytest.skip("parabench-micro is not built (Google Benchmark not found)")
    (job,) = sweeps["jobs"]["micro"]
    sweep_dir = sweeps["dirs"]["micro"]
    assert job["labels"] == "n1"  # profile local: one node, PB_MAX_NODES 1
    (record,) = sweeps["records"][job["job"]]
    out = (sweep_dir / f"slurm-{record['ArrayJobId']}_0.out").read_text()
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), out
    assert record["NumTasks"] == "4"
    script = (sweep_dir / job["script"]).read_text()
    assert "#SBATCH --job-name=pb-micro\n" in script and "app=micro label=n1 " in script
    result = check_point(sweep_dir / "n1", record, "n1", "micro", 4, measured_steps=None)
    assert result["config"]["app"] == "micro"
    assert result["config"]["max_bytes"] == 4096  # given: not the CPU profile's 256M
    command = (sweep_dir / "n1" / "command.txt").read_text()
    assert "/bench/micro/parabench-micro " in command and "--peak-tflops" not in command
    (path,) = (sweep_dir / "n1").glob("*.h5")
    with h5py.File(path, "r") as f:
        group = f["micro/collectives/all_reduce"]
        assert group.attrs["ranks"] == 4 and group.attrs["nodes"] == 1
        assert list(group["bytes"][()]) == [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
        assert not group["errors"][()].any()
        assert f["micro/gemm/shape"].asstr()[()].tolist() == ["small.qkv", "small.qkv"]
        assert f["micro/gemm/operands"].asstr()[()].tolist() == ["cached", "cold"]
    assert re.search(r"^PARABENCH_RESULT app=micro ranks=4 .* status=complete ", out, re.M), out
