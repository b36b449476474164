"""How runs end when something outside stops them (docs/SPEC.md section 5): Ctrl-C and a closed
terminal stop the ranks together after the step in progress with 130 and 129, as SIGTERM does with
143; a run that cannot fit in memory is refused before it allocates; a run that runs out of memory
anyway says so in its file; values that would overflow a derived size are refused.
"""

import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

import pb_app_conftest
from test_result_file_faults import wait_for_steps

SMALL = ["--model", "small", "--warmup", "1"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGHUP, 129)])
@pytest.mark.parametrize("target", ["every-rank", "one-rank", "mpiexec"])
def test_sigint_and_sighup_keep_finished_steps(sig, code, target, start_app, job_pids, kill, parse_result_line,
                                               launcher_version, tmp_path):
    if target == "mpiexec" and sig == signal.SIGHUP:
        pytest.skip("a launcher given SIGHUP ends its job as its own documentation says (hydra: killed)")
    path = tmp_path / "run.h5"
    proc = start_app("dp", 2, [*SMALL, "--steps", 200, "--quiet", "--out", path])
    wait_for_steps(proc, path, 2, kill)
    ranks = job_pids(proc.pid, "dp")
    assert len(ranks) == 2, ranks
    if target == "mpiexec":
        os.kill(proc.pid, sig)
    else:
        for pid in ranks if target == "every-rank" else ranks[-1:]:
            os.kill(pid, sig)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise
    name = signal.Signals(sig).name
    what = f"exit {proc.returncode}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    if target == "mpiexec" and "HYDRA" in launcher_version:
        assert proc.returncode in (code, 0), what  # hydra may lose its ranks' codes (see tests/app/test_sigterm.py)
    else:
        assert proc.returncode == code, what
    assert err.count(f"stopped by {name}") == 1, what
    assert parse_result_line(out)["status"] == "interrupted", what
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "interrupted" and name in f.attrs["error"], dict(f.attrs)
        n = int(f["steps"].attrs["finished"])
        assert 2 <= n < 200 and f["steps/loss"].shape == (n,) and np.all(np.isfinite(f["steps/loss"][()]))
        assert int(f["summary"].attrs["measured_steps"]) == n - 1


def test_a_run_that_cannot_fit_is_refused_before_it_allocates(run_app, tmp_path):
    # gpt2-1.5b at micro-batch 64 predicts about 648 GiB per rank (its vocabulary stored padded to
    # 50304, SPEC 2): refused at once, with both numbers.
    args = ["--model", "gpt2-1.5b", "--micro-batch", 64, "--steps", 3, "--out", tmp_path / "out"]
    started = time.monotonic()
    rc, out, err = run_app("dp", 1, args, timeout=60)
    what = f"exit {rc}\n{out}\n{err}"
    assert rc == 2 and time.monotonic() - started < 30, what
    assert "647.68 GiB" in err and "it can use" in err and "--no-memory-check" in err, what
    assert not (tmp_path / "out").exists(), what

    rc, out, err = run_app("dp", 1, [*args, "--dry-run"], timeout=60)
    assert rc == 2 and "does not fit" in out, f"exit {rc}\n{out}\n{err}"
    rc, out, err = run_app("dp", 1, ["--model", "tiny", "--dry-run"], timeout=60)
    assert rc == 0 and "memory: fits" in out, f"exit {rc}\n{out}\n{err}"


def test_the_memory_check_reads_the_cgroup_limit(run_app, memory_cgroup, tmp_path):
    # 300 MiB for 2 ranks; the small model at micro-batch 8 predicts about 190 MiB per rank.
    prefix = memory_cgroup(300 << 20)
    args = [*SMALL, "--micro-batch", 8, "--steps", 3, "--out", tmp_path / "out"]
    cmd = [*prefix, *run_app.command("dp", 2, args)]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          env=pb_app_conftest.app_environment(), cwd=tmp_path)
    what = f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 2, what
    assert "cgroup" in done.stderr and "shared by 2 rank(s)" in done.stderr, what


def test_out_of_memory_on_one_rank_marks_the_file_failed(run_app, tmp_path):
    # An address-space limit makes the model's allocations fail (the memory check is told to stand
    # aside): exit 3, the file says why, and the abort path does not crash (it did on one rank).
    path = tmp_path / "run.h5"
    args = [*SMALL, "--micro-batch", 64, "--steps", 3, "--quiet", "--no-memory-check", "--out", path]
    cmd = ["prlimit", f"--as={1 << 30}", *run_app.command("dp", 1, args)]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          env=pb_app_conftest.app_environment(), cwd=tmp_path)
    what = f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 3, what
    assert "out of memory" in done.stderr and "Segmentation fault" not in done.stderr + done.stdout, what
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "failed" and "out of memory" in f.attrs["error"], dict(f.attrs)


@pytest.mark.parametrize("ranks, args, names", [
    (2, ["--micro-batch", 2000000000], ["--micro-batch 2000000000", "4000000000"]),
    (1, ["--seq", 2147483647], ["--seq 2147483647", "too large"]),
    (1, ["--vocab", 2000000000, "--hidden", 2000000000, "--heads", 1], ["--hidden 2000000000", "too large"]),
    (1, ["--vocab", 2000000000, "--hidden", 500000000, "--heads", 1], ["--vocab 2000000000", "too large"]),
    (1, ["--seed", 2 ** 64], ["--seed 18446744073709551616"]),
    (1, ["--seed", -1], ["--seed -1"]),
    (1, ["--seed", "12abc"], ["--seed 12abc"]),
    (1, ["--micro-batch", 99999999999], ["--micro-batch"]),
    (1, ["--steps", 2000000000], ["--steps 2000000000"]),
])
def test_values_that_overflow_are_refused(ranks, args, names, run_app, tmp_path):
    for extra in ([], ["--dry-run"]):
        pb_app_conftest.check_rejected(run_app, tmp_path, "dp", ranks, [*args, *extra], names)


def test_the_largest_seed_is_kept_exactly(run_app, tmp_path):
    path = tmp_path / "run.h5"
    rc, out, err = run_app("dp", 1, ["--model", "tiny", "--steps", 3, "--seed", 2 ** 64 - 1, "--quiet", "--out", path])
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    with h5py.File(path, "r") as f:
        assert int(f["config"].attrs["seed"]) == 2 ** 64 - 1
