"""jobs/submit on the four-node test cluster (tests/cluster/conftest.py) with its profile,
jobs/clusters/netns-test.env (2 ranks per node, 2 nodes per job, at most 4):

  weak-scaling  parabench-dp on 1, 2 and 4 nodes (--nodes 1,2,4): three job arrays of one point each,
                2, 4 and 8 ranks
  micro-batch   two points (micro-batch 1, 2) in one job array of 2-node jobs

Every job ends COMPLETED with exit 0, and each point's result file records its node count, the host
names of its ranks (2 per node, distinct nodes) and each rank's local rank. And parabench-micro on 2
nodes × 2 ranks times send_recv within a node and across the nodes as two tables.
"""

import re
import time
from pathlib import Path

import h5py
import pytest

from slurm_cluster import BUILD_DIR, REPO

APP_ARGS = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--vocab", "67",
            "--steps", "3", "--warmup", "1"]
WAIT_S = 300


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def submit(cluster, out, sweep, *options):
    cmd = [REPO / "jobs" / "submit", sweep, "--cluster", "netns-test", "--out", out, *options, "--", *APP_ARGS]
    done = cluster.run(*cmd, timeout=60)
    assert "submit: job " in done.stderr, done.stderr
    lines = (out / "jobs.tsv").read_text().splitlines()
    return [line.split("\t")[0] for line in lines[1:]]


def records(cluster, job):
    done = cluster.run("scontrol", "-o", "show", "job", job)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in done.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sweeps(cluster, tmp_path_factory):
    if not (BUILD_DIR / "bench" / "dp" / "parabench-dp").is_file():
        pytest.fail(f"{BUILD_DIR}/bench/dp/parabench-dp does not exist: build the project first")
    base = tmp_path_factory.mktemp("sweeps")
    dirs = {"weak-scaling": base / "weak-scaling", "micro-batch": base / "micro-batch"}
    jobs = {"weak-scaling": submit(cluster, dirs["weak-scaling"], "weak-scaling", "--nodes", "1,2,4", "--app", "dp"),
            "micro-batch": submit(cluster, dirs["micro-batch"], "micro-batch", "--values", "1,2")}
    recorders = [(d / "record_job.txt").read_text().strip() for d in dirs.values()]
    ids = [job for js in jobs.values() for job in js] + recorders
    deadline = time.monotonic() + WAIT_S
    while (queue := cluster.run("squeue", "-h", "-o", "%i %T %r", "-j", ",".join(ids)).stdout.strip()):
        if time.monotonic() > deadline:
            cluster.run("scancel", *ids, check=False)
            pytest.fail(f"the sweeps did not finish within {WAIT_S} s; still queued:\n{queue}\n" + cluster.diagnostics())
        time.sleep(1)
    return {"dirs": dirs, "records": {name: [r for job in js for r in records(cluster, job)]
                                      for name, js in jobs.items()}}


def results(sweep_dir):
    """Every point's result file under a sweep's folder: {point label: what /system says}."""
    found = {}
    for path in sorted(Path(sweep_dir).glob("*/*.h5")):
        with h5py.File(path, "r") as f:
            found[path.parent.name] = {
                "status": text(f.attrs["status"]),
                "nodes": int(f["system"].attrs["nodes"]),
                "hostnames": [text(h) for h in f["system/hostnames"][()]],
                "local_ranks": f["system/local_ranks"][()].tolist(),
            }
    return found


def test_every_job_completed(sweeps):
    for sweep, recs in sweeps["records"].items():
        assert recs, sweep
        for r in recs:
            assert (r.get("JobState"), r.get("ExitCode")) == ("COMPLETED", "0:0"), (sweep, r)


def test_weak_scaling_over_one_two_and_four_nodes(sweeps):
    recs = sweeps["records"]["weak-scaling"]
    assert sorted(int(r["NumNodes"]) for r in recs) == [1, 2, 4]
    points = results(sweeps["dirs"]["weak-scaling"])
    assert sorted(p["nodes"] for p in points.values()) == [1, 2, 4], points
    for label, p in points.items():
        n = p["nodes"]
        assert p["status"] == "complete", label
        assert len(p["hostnames"]) == 2 * n and len(set(p["hostnames"])) == n, (label, p)
        assert all(h.startswith("pbnode") for h in p["hostnames"]), (label, p)
        assert p["local_ranks"] == [0, 1] * n, (label, p)


def test_a_job_array_of_two_node_jobs(sweeps):
    recs = sweeps["records"]["micro-batch"]
    assert len(recs) == 2 and len({r["ArrayJobId"] for r in recs}) == 1, recs  # one array, two tasks
    assert all(int(r["NumNodes"]) == 2 for r in recs), recs
    points = results(sweeps["dirs"]["micro-batch"])
    assert len(points) == 2, points
    for label, p in points.items():
        assert p["status"] == "complete" and p["nodes"] == 2 and len(set(p["hostnames"])) == 2, (label, p)


def test_each_point_keeps_slurm_record_of_its_end(sweeps):
    """jobs/lib/record-jobs.sh, run by the job that waits for a sweep's arrays, wrote one line per
    point to jobs_end.tsv and Slurm's record of its array task to <label>/slurm_job_end.txt."""
    for sweep, recs in sweeps["records"].items():
        sweep_dir = sweeps["dirs"][sweep]
        lines = (sweep_dir / "jobs_end.tsv").read_text().splitlines()
        assert lines[0].split("\t") == ["label", "job", "state", "exit_code", "nodes", "reason"]
        ends = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
        assert set(ends) == set(results(sweep_dir)), (sweep, ends)
        by_task = {f"{r['ArrayJobId']}_{r['ArrayTaskId']}": r for r in recs}
        for label, (_, job, state, exit_code, nodes, _) in ends.items():
            assert job in by_task, (sweep, label, job)
            assert (state, exit_code, nodes) == ("COMPLETED", "0:0", by_task[job]["NodeList"]), (sweep, label)
            end = (sweep_dir / label / "slurm_job_end.txt").read_text()
            assert f"JobId={by_task[job]['JobId']} " in end and "JobState=COMPLETED " in end, end


def test_micro_reports_intra_and_inter_node_pairs_apart(cluster, tmp_path):
    """parabench-micro on 2 nodes × 2 ranks: send_recv between rank 0 and the other rank of its node,
    and between rank 0 and the first rank of the other node, in two tables."""
    micro = BUILD_DIR / "bench" / "micro" / "parabench-micro"
    if not micro.is_file():
        pytest.skip("parabench-micro is not built (Google Benchmark not found)")
    out = tmp_path / "micro.h5"
    command = (f"srun {micro} --benchmark_filter=coll/mpi/send_recv_ --benchmark_min_time=0.001 "
               f"--max-bytes 4K --out {out}")
    done = cluster.run("sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=2", "--time=3",
                       f"--output={tmp_path / 'slurm-%j.out'}", "--wrap", command)
    job = done.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while cluster.run("squeue", "-h", "-j", job).stdout.strip():
        if time.monotonic() > deadline:
            cluster.run("scancel", job, check=False)
            pytest.fail(f"job {job} did not end within 120 s\n" + cluster.diagnostics())
        time.sleep(0.5)
    (record,) = records(cluster, job)
    log = (tmp_path / f"slurm-{job}.out").read_text(errors="replace")
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log
    with h5py.File(out, "r") as f:
        tables = f["micro/collectives"]
        assert sorted(tables) == ["send_recv_inter", "send_recv_intra"], list(tables)
        for name, nodes in (("send_recv_intra", 1), ("send_recv_inter", 2)):  # the nodes the pair spans
            group = tables[name]
            assert group.attrs["nodes"] == nodes and group.attrs["ranks"] == 2, (name, dict(group.attrs))
            assert len(group["bytes"][()]) > 0 and not group["errors"][()].any(), name
