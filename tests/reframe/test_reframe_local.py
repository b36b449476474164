"""parabench's ReFrame checks (jobs/reframe) through ReFrame itself on this machine, with the local
scheduler (jobs/reframe/config/local.py, profile local: one node of 4 ranks, mpiexec): the checks pass
on the result line's status, report their performance variables with units, keep their result files,
and a reference that a value misses fails its check. (tests/cluster/test_reframe.py runs them through
the four-node test cluster's Slurm where root is available.)"""

import json
import os

import pytest

from reframe_runs import job_scripts, outputs, perflog, run_checks, summary

STRATEGY = {"strategy/dp", "strategy/fsdp", "strategy/tp4", "strategy/pp4", "strategy/ep4", "strategy/cp4"}
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PB_", "RFM_", "SLURM_", "PMI_"))}


def test_the_strategy_sweep_passes_and_reports_its_performance(tmp_path):
    done = run_checks(tmp_path, "local", ENV)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert summary(done) == (6, 0)
    results = outputs(tmp_path, "local")
    assert set(results) == STRATEGY
    for name, result in results.items():
        assert (result["status"], result["ranks"], result["nodes"]) == ("complete", 4, 1), name
    for script in job_scripts(tmp_path, "local"):
        assert "\nmpiexec -n 4 /" in script and " --cluster local --out result.h5" in script, script
    rows = perflog(tmp_path, "local")
    assert len(rows) == 6
    for info, outcome, values in rows:
        assert outcome == "pass", info
        # MFU is left out on the CPU (no peak): the result line says nan.
        assert {k: unit for k, (_, unit) in values.items()} == {
            "tokens_per_s": "tokens/s", "step_time": "s", "tflops_per_rank": "TFLOP/s", "peak_memory": "GiB"}, info
        assert all(value > 0 for value, _ in values.values()), info


def test_a_value_outside_its_reference_fails_the_check(tmp_path):
    """References for system local: dp's peak memory bounded far below what it uses (fails), and every
    point's tokens/s with a lower bound of a tenth of a token per second (passes), which the perflog shows."""
    references = tmp_path / "references.json"
    references.write_text(json.dumps({
        "local:default": {"strategy/dp": {"peak_memory": [1e-6, -0.1, 0.1, "GiB"]}},
        "local": {"*": {"tokens_per_s": [1.0, -0.9, None, "tokens/s"]}},
    }))
    done = run_checks(tmp_path / "run", "local", ENV, "-n", "strategy/(dp|fsdp)$", references=references)
    assert done.returncode != 0
    assert summary(done) == (2, 1)
    assert "failed to meet reference" in done.stdout and "peak_memory=" in done.stdout, done.stdout[-3000:]
    assert "FAILURE INFO for parabench_point %point=strategy/dp " in done.stdout
    rows = {info.split()[1]: (outcome, values) for info, outcome, values in perflog(tmp_path / "run", "local")}
    assert rows["%point=strategy/dp"][0] == "fail" and rows["%point=strategy/fsdp"][0] == "pass", rows


@pytest.mark.parametrize("env, message", [
    ({"PB_REFRAME_SWEEPS": "no-such-sweep"}, "unknown sweep 'no-such-sweep'"),
    ({"PB_CLUSTER": "../etc"}, "PB_CLUSTER=../etc is not a profile name"),
    ({"PB_REFRAME_REFERENCES": "/nonexistent/references.json"}, "no file /nonexistent/references.json"),
])
def test_a_bad_sweep_or_profile_is_named(tmp_path, env, message):
    run_env = {**ENV, **env}
    done = run_checks(tmp_path, run_env.pop("PB_CLUSTER", "local"), run_env,
                      sweeps=run_env.pop("PB_REFRAME_SWEEPS", "strategy"))
    assert done.returncode != 0
    assert message in done.stdout + done.stderr, done.stdout[-3000:] + done.stderr[-2000:]
