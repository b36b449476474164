"""parabench's ReFrame checks (jobs/reframe) through ReFrame itself on the four-node test cluster
(tests/cluster/conftest.py), with its site configuration jobs/reframe/config/netns-test.py (Slurm
followed with squeue, srun --mpi=pmi2 from the profile jobs/clusters/netns-test.env): the strategy
sweep's six points (dp, fsdp, tp2, pp2, ep2, cp2) on 2 nodes × 2 ranks and a weak-scaling sweep of dp
over 1, 2 and 4 nodes pass, their kept result files name the nodes they ran on, and the performance
log has each check's variables with units. (tests/reframe runs the checks with the local scheduler.)"""

import pytest

from reframe_runs import job_scripts, outputs, perflog, reframe_or_skip, run_checks, summary

STRATEGY = {"strategy/dp", "strategy/fsdp", "strategy/tp2", "strategy/pp2", "strategy/ep2", "strategy/cp2"}
WEAK = {"weak-scaling/r2": 1, "weak-scaling/r4": 2, "weak-scaling/r8": 4}  # labels: the ranks


@pytest.fixture(scope="module")
def reframe_run(cluster, tmp_path_factory):
    reframe_or_skip()
    prefix = tmp_path_factory.mktemp("reframe")
    done = run_checks(prefix, "netns-test", cluster.env, sweeps="strategy; weak-scaling --nodes 1,2,4 --app dp")
    return prefix, done


def test_the_checks_pass_through_slurm(reframe_run, cluster):
    prefix, done = reframe_run
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:] + cluster.diagnostics()
    assert summary(done) == (9, 0)


def test_each_point_ran_on_its_nodes(reframe_run):
    prefix, _ = reframe_run
    results = outputs(prefix, "netns-test")
    assert set(results) == STRATEGY | set(WEAK), sorted(results)
    for name, r in results.items():
        nodes = WEAK.get(name, 2)
        assert (r["status"], r["nodes"], r["ranks"]) == ("complete", nodes, 2 * nodes), (name, r)
        assert len(set(r["hostnames"])) == nodes and all(h.startswith("pbnode") for h in r["hostnames"]), (name, r)


def test_the_jobs_take_the_profiles_allocation_and_launcher(reframe_run):
    """Nodes and ranks per node of the point, no requeue, the profile's time limit and exports, and
    srun with the profile's --mpi=pmi2."""
    prefix, _ = reframe_run
    scripts = job_scripts(prefix, "netns-test")
    assert len(scripts) == 9
    for script in scripts:
        assert "#SBATCH --ntasks-per-node=2\n" in script and "#SBATCH --no-requeue\n" in script, script
        assert "#SBATCH --time=0:5:0\n" in script, script
        assert "source /" in script and "/jobs/clusters/netns-test.env\n" in script, script
        assert "\nsrun --mpi=pmi2 /" in script, script
    assert sorted(int(s.split("#SBATCH --nodes=")[1].split()[0]) for s in scripts) == [1, 2, 2, 2, 2, 2, 2, 2, 4]


def test_the_performance_log_has_every_variable_with_its_unit(reframe_run):
    prefix, _ = reframe_run
    rows = perflog(prefix, "netns-test")
    assert len(rows) == 9
    for info, outcome, values in rows:
        assert outcome == "pass" and "@netns-test:default" in info, info
        assert {k: unit for k, (_, unit) in values.items()} == {
            "tokens_per_s": "tokens/s", "step_time": "s", "tflops_per_rank": "TFLOP/s", "peak_memory": "GiB"}, info
