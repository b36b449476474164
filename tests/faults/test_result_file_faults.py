"""The result file against what ends runs on clusters (docs/SPEC.md sections 5 and 6): a full disk at
creation and during the run, two runs given one --out, an existing file, and output paths (--trace,
--json-log) that cannot be written. Each failure exits with its code, names the file and the
operating system's reason, and leaves no file half-written: what was measured stays readable.
"""

import time

import h5py
import numpy as np
import pytest

from pb_app_conftest import finished_steps

SMALL = ["--model", "small", "--warmup", "1"]
TINY = ["--model", "tiny", "--warmup", "1"]


def status_of(path):
    with h5py.File(path, "r") as f:
        return {"status": f.attrs["status"], "error": f.attrs["error"], "loss": f["steps/loss"][()],
                "time_s": f["steps/time_s"][()], "finished": int(f["steps"].attrs["finished"]),
                "summary": dict(f["summary"].attrs) if "summary" in f else None,
                "model": f["config"].attrs["model"]}


def wait_for_steps(proc, path, n, kill, timeout=60):
    deadline = time.monotonic() + timeout
    while finished_steps(path) < n:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before {n} steps were written\n{out}\n{err}")
        if time.monotonic() > deadline:
            kill(proc)
            pytest.fail(f"no {n} steps in {path} within {timeout} s")
        time.sleep(0.05)


def test_disk_full_at_creation_fails_before_step_1(run_app, small_disk, fill):
    # 2000 steps × 2 ranks need about 64 KiB of per-step data, allocated when the file is created.
    disk = small_disk("64k")
    path = disk / "run.h5"
    for ranks in (1, 2):
        rc, out, err = run_app("dp", ranks, [*TINY, "--steps", 2000, "--out", path], timeout=60)
        what = f"{ranks} rank(s): exit {rc}\n{out}\n{err}"
        assert rc == 3, what  # not a crash in the abort path (139 on one rank before)
        assert "No space left on device" in err and str(path) in err, what
        assert "step    1" not in out and "PARABENCH_RESULT" not in out, what
        assert not path.exists(), f"a half-created file was left behind\n{what}"
    # A disk with no room for a single block: not one file per name tried is left behind.
    fill(disk)
    rc, out, err = run_app("dp", 1, [*TINY, "--steps", 3, "--out", disk], timeout=60)
    assert rc == 3 and "No space left on device" in err, f"exit {rc}\n{out}\n{err}"
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_disk_filled_during_the_run_keeps_every_step(start_app, small_disk, fill, kill, parse_result_line):
    # The per-step datasets were allocated at creation and room for the summary reserved, so a disk
    # that another program fills during the run still takes every step and the summary.
    disk = small_disk("1m")
    path = disk / "run.h5"
    steps = 12
    proc = start_app("dp", 2, [*SMALL, "--steps", steps, "--quiet", "--out", path])
    wait_for_steps(proc, path, 2, kill)
    fill(disk)
    out, err = proc.communicate(timeout=120)
    what = f"exit {proc.returncode}\n{out}\n{err}"
    assert proc.returncode == 0, what
    assert parse_result_line(out)["status"] == "complete", what
    run = status_of(path)
    assert run["status"] == "complete" and run["finished"] == steps, run
    assert run["loss"].shape == (steps,) and np.all(np.isfinite(run["loss"]))
    assert run["summary"] is not None and int(run["summary"]["measured_steps"]) == steps - 1


def test_disk_full_for_the_json_log_stops_with_the_reason(start_app, small_disk, fill, kill, parse_result_line):
    # The per-step JSON log cannot grow once the disk is full: the run stops after that step with
    # exit 3, says why, and its result file (on the same full disk) keeps the steps and says failed.
    disk = small_disk("1m")
    path, log = disk / "run.h5", disk / "steps.jsonl"
    proc = start_app("dp", 2, [*SMALL, "--steps", 200, "--quiet", "--out", path, "--json-log", log])
    wait_for_steps(proc, path, 2, kill)
    fill(disk)
    out, err = proc.communicate(timeout=120)
    what = f"exit {proc.returncode}\n{out}\n{err}"
    assert proc.returncode == 3, what
    assert "No space left on device" in err and str(log) in err and err.count("error:") == 1, what
    assert parse_result_line(out)["status"] == "failed", what
    run = status_of(path)
    assert run["status"] == "failed" and "No space left on device" in run["error"], run["error"]
    n = run["finished"]
    assert 2 <= n < 200 and run["loss"].shape == (n,) and np.all(np.isfinite(run["loss"]))
    assert run["summary"] is not None and float(run["summary"]["final_loss"]) == run["loss"][-1]


@pytest.mark.parametrize("locking", ["hdf5-locking", "no-hdf5-locking"])
def test_a_second_run_never_touches_the_file_of_a_running_one(locking, start_app, run_app, kill, tmp_path):
    env = {"HDF5_USE_FILE_LOCKING": None} if locking == "hdf5-locking" else {"HDF5_USE_FILE_LOCKING": "FALSE"}
    path = tmp_path / "run.h5"
    steps = 30
    first = start_app("dp", 1, [*SMALL, "--steps", steps, "--quiet", "--out", path], env=env)
    wait_for_steps(first, path, 1, kill)

    rc, out, err = run_app("dp", 1, [*TINY, "--steps", 2, "--quiet", "--out", path], env=env)
    assert rc == 2 and "exists" in err and "--overwrite" in err, f"exit {rc}\n{out}\n{err}"
    assert finished_steps(path) >= 1, "the second run emptied the first one's file"
    # Even --overwrite does not replace the file of a run still in progress.
    rc, out, err = run_app("dp", 1, [*TINY, "--steps", 2, "--quiet", "--overwrite", "--out", path], env=env)
    assert rc == 3 and "in progress" in err, f"exit {rc}\n{out}\n{err}"

    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, f"exit {first.returncode}\n{out}\n{err}"
    run = status_of(path)
    assert run["status"] == "complete" and run["model"] == "small" and run["loss"].shape == (steps,), run


def test_an_existing_file_is_replaced_only_with_overwrite(run_app, tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("a user's own file\n")
    rc, out, err = run_app("dp", 1, [*TINY, "--steps", 2, "--quiet", "--out", path])
    assert rc == 2 and "exists" in err and "--overwrite" in err, f"exit {rc}\n{out}\n{err}"
    assert path.read_text() == "a user's own file\n"

    rc, out, err = run_app("dp", 1, [*TINY, "--steps", 2, "--quiet", "--overwrite", "--out", path])
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    assert status_of(path)["status"] == "complete"

    rc, out, err = run_app("dp", 1, [*TINY, "--steps", 2, "--quiet", "--out", tmp_path])  # a folder: a new name
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    assert len(list(tmp_path.glob("dp_*.h5"))) == 1


def test_overwrite_keeps_the_old_file_when_the_run_fails_before_step_1(run_app, tmp_path):
    # The new file is written beside the old one and takes its name only once every output is open.
    path = tmp_path / "keep.h5"
    path.write_text("an earlier run\n")
    rc, out, err = run_app("dp", 1, [*TINY, "--steps", 2, "--quiet", "--overwrite", "--out", path,
                                     "--json-log", tmp_path / "missing" / "steps.jsonl"])
    assert rc == 3 and "--json-log" in err, f"exit {rc}\n{out}\n{err}"
    assert path.read_text() == "an earlier run\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.h5"]


def test_an_unwritable_trace_fails_before_step_1_on_every_try(run_app, tmp_path):
    # Before: opened after the last step, so the run was wasted, and with 4 ranks the message was
    # sometimes lost in the abort. Now checked with the result file, before any step.
    out_dir = tmp_path / "out"
    for attempt in range(3):
        rc, out, err = run_app("dp", 4, [*TINY, "--steps", 3, "--out", out_dir, "--trace",
                                         tmp_path / "missing" / "trace.json"])
        what = f"attempt {attempt}: exit {rc}\n{out}\n{err}"
        assert rc == 3, what
        assert err.count("--trace") == 1 and "No such file or directory" in err, what
        assert "step    1" not in out, what
        assert list(out_dir.glob("*.h5")) == [], what


@pytest.mark.parametrize("option", ["--json-log", "--trace"])
def test_a_failing_output_write_marks_the_run_failed(option, run_app, parse_result_line, tmp_path):
    path = tmp_path / "run.h5"
    rc, out, err = run_app("dp", 2, [*TINY, "--steps", 3, "--quiet", "--out", path, option, "/dev/full"])
    what = f"exit {rc}\n{out}\n{err}"
    assert rc == 3, what  # --json-log /dev/full exited 0 before
    assert f"{option} /dev/full" in err and "No space left on device" in err, what
    assert parse_result_line(out)["status"] == "failed", what
    run = status_of(path)
    assert run["status"] == "failed" and option in run["error"], run
    assert run["finished"] >= 1 and run["summary"] is not None


def test_a_run_killed_before_its_first_step_reads_as_no_steps(start_app, kill, tmp_path):
    # Before step 1 the per-step datasets span every step (allocated, NaN) and /steps/finished is 0:
    # the readers in analysis/ count finished steps by that attribute, not by the datasets' length.
    import subprocess
    import sys

    from pb_app_conftest import REPO
    sys.path.insert(0, str(REPO))
    from analysis.results import load

    path = tmp_path / "run.h5"
    proc = start_app("dp", 1, ["--model", "small", "--micro-batch", 16, "--steps", 50, "--quiet", "--out", path])
    deadline = time.monotonic() + 60
    while True:
        try:
            with h5py.File(path, "r") as f:
                if "summary" not in f and f["steps"].attrs["finished"] == 0 and "system" in f:
                    break
        except (OSError, KeyError):
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "no result file before step 1"
        time.sleep(0.01)
    kill(proc)
    proc.communicate()
    run = status_of(path)
    if run["finished"] > 0:
        pytest.skip("the first step finished before the job was killed (a slow poll); nothing to check")
    assert run["status"] == "running" and run["loss"].shape == (50,) and np.all(np.isnan(run["loss"]))
    assert load(path)["finished_steps"] == 0
    done = subprocess.run([sys.executable, str(REPO / "analysis" / "summarize.py"), str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "running" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("outputs, message", [
    ({"--json-log": "run.h5"}, "--json-log {d}/run.h5 is the file of --out too"),
    ({"--trace": "run.h5"}, "--trace {d}/run.h5 is the file of --out too"),
    ({"--json-log": "steps.json", "--trace": "./steps.json"}, "--trace ./steps.json is the file of --json-log too"),
])
def test_two_outputs_on_one_file_are_refused(outputs, message, run_app, tmp_path):
    # Opening the trace or the log over the result file truncated it under the running writer.
    args = [*TINY, "--steps", 2, "--quiet", "--out", tmp_path / "run.h5"]
    for option, name in outputs.items():
        args += [option, name if name.startswith("./") else tmp_path / name]
    rc, out, err = run_app("dp", 1, args, cwd=tmp_path)
    what = f"exit {rc}\n{out}\n{err}"
    assert rc == 2 and message.format(d=tmp_path) in err, what
    assert sorted(p.name for p in tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}\n{what}"


def test_a_trace_over_a_running_runs_file_is_refused(start_app, run_app, kill, tmp_path):
    path = tmp_path / "run.h5"
    first = start_app("dp", 1, [*SMALL, "--steps", 30, "--quiet", "--out", path])
    wait_for_steps(first, path, 1, kill)
    rc, out, err = run_app("dp", 1, [*TINY, "--steps", 2, "--quiet", "--out", tmp_path / "other.h5",
                                     "--trace", path])
    assert rc == 2 and "is the result file of a run in progress" in err, f"exit {rc}\n{out}\n{err}"
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and status_of(path)["status"] == "complete", f"{out}\n{err}"
