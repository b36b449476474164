"""analysis/summarize.py against small result files written here with h5py after SPEC.md section 6:
a complete run, an interrupted one, one killed before its summary, a corrupt file, one of schema
version 2 and an HDF5 file of another schema. Runs the script as a user would and checks its rows,
its messages and its exit code."""

import csv
import io
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "analysis" / "summarize.py"
MIB = 2**20
CATEGORIES = ["parameters", "master_parameters", "gradients", "optimizer_states", "activations",
              "comm_buffers", "workspace", "peak_total"]


def dataset(group, name, data, units):
    group.create_dataset(name, data=data).attrs["units"] = units


def write_result(path, *, status="complete", schema_version=1, ranks=2, steps=10, warmup=2,
                 finished_steps=None, summary=True, peak_total=(100 * MIB, 120 * MIB), step_times=None):
    """A result file of a dp run of the tiny model; `finished_steps` < `steps` for a cut-off run."""
    finished = steps if finished_steps is None else finished_steps
    micro_batch, seq = 2, 32
    global_batch = micro_batch * ranks
    with h5py.File(path, "w") as f:
        f.attrs.update({"schema": "parabench", "schema_version": np.int64(schema_version),
                        "software_version": "0.1.0", "git_commit": "0123abc",
                        "created": "2025-01-01T00:00:00Z", "status": status,
                        "error": "" if status != "failed" else "NaN loss"})
        config = f.create_group("config")
        config.attrs.update({"app": "dp", "model": "tiny", "layers": 2, "hidden": 64, "heads": 4,
                             "seq": seq, "vocab": 256, "ffn": 256, "micro_batch": micro_batch,
                             "global_batch": global_batch, "steps": steps, "warmup": warmup,
                             "seed": 1234, "lr": 3e-4, "clip": 1.0, "backend": "cpu",
                             "comm": "mpi", "dtype": "fp32", "recompute": "none", "dp": ranks,
                             "grad_accum": 1, "world_size": ranks, "bucket_mb": 25.0})
        config.create_dataset("argv", data=["parabench-dp", "--model", "tiny"],
                              dtype=h5py.string_dtype())
        system = f.create_group("system")
        # Fixed-length strings read back as bytes: the tool must decode them.
        system.attrs.update({"cluster": np.bytes_("testbox"), "nodes": 1, "ranks": ranks,
                             "ranks_per_node": ranks, "gpu_model": "", "slurm_job_id": ""})
        system.create_dataset("hostnames", data=["node1"] * ranks, dtype=h5py.string_dtype())
        system.create_dataset("environment", data=["OMP_NUM_THREADS=1"],
                              dtype=h5py.string_dtype())
        if step_times is None:
            step_times = np.array([[0.5 + 0.01 * s, 0.52 + 0.01 * s] + [0.4] * (ranks - 2)
                                   for s in range(finished)])
        steps_group = f.create_group("steps")
        dataset(steps_group, "loss", np.linspace(5.5, 3.0, finished), "1")
        dataset(steps_group, "grad_norm", np.full(finished, 0.7), "1")
        dataset(steps_group, "time_s", step_times, "s")
        if summary:
            f.create_group("summary").attrs.update({
                "measured_steps": finished - warmup, "step_time_s": 0.25,
                "step_time_s_min": 0.2, "step_time_s_max": 0.3,
                "tokens_per_s": global_batch * seq / 0.25, "model_flops_per_step": 1.0e9,
                "model_flops_formula": "72*G*S*L*h^2*(1+S/(6h)+V/(12hL))",
                "tflops_per_rank": 0.002, "peak_tflops_per_rank": 0.0, "mfu": float("nan"),
                "final_loss": 3.0})
        measured = f.create_group("memory/measured")
        predicted = f.create_group("memory/predicted")
        for category in CATEGORIES:
            values = np.array(peak_total if category == "peak_total" else [MIB] * ranks,
                              dtype=np.int64)
            dataset(measured, category, values, "bytes")
            dataset(predicted, category, values, "bytes")
        dataset(f["memory"], "device_peak_bytes", np.array(peak_total, dtype=np.int64), "bytes")
        comm = f.create_group("comm/all_reduce")
        dataset(comm, "calls", np.full(ranks, finished, dtype=np.int64), "1")
        dataset(comm, "bytes", np.full(ranks, 4096 * finished, dtype=np.int64), "bytes")
        dataset(comm, "time_s", np.full(ranks, 0.01), "s")
    return path


def summarize(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, check=False)


def csv_rows(stdout):
    return {Path(row["file"]).name: row for row in csv.DictReader(io.StringIO(stdout))}


@pytest.fixture
def results(tmp_path):
    """A results directory with one file of every kind, by name."""
    files = {
        "complete": write_result(tmp_path / "complete.h5"),
        "interrupted": write_result(tmp_path / "interrupted.h5", status="interrupted",
                                    finished_steps=6, peak_total=(90 * MIB, 80 * MIB)),
        "killed": write_result(tmp_path / "killed.h5", status="running", finished_steps=5,
                               summary=False),
        "v2": write_result(tmp_path / "v2.h5", schema_version=2),
        "corrupt": tmp_path / "corrupt.h5",
        "foreign": tmp_path / "foreign.h5",
    }
    files["corrupt"].write_bytes(np.random.default_rng(7).bytes(4096))
    with h5py.File(files["foreign"], "w") as f:
        f.attrs["schema"] = "something-else"
    return files


def test_complete_run_csv(results):
    run = summarize("--csv", results["complete"])
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    row = csv_rows(run.stdout)["complete.h5"]
    assert row["app"] == "dp"
    assert row["cluster"] == "testbox"
    assert row["status"] == "complete"
    assert row["ranks"] == "2"
    assert row["model"] == "tiny"
    assert row["micro_batch"] == "2"
    assert row["global_batch"] == "4"
    assert float(row["step_time_s"]) == 0.25
    assert float(row["tokens_per_s"]) == 4 * 32 / 0.25
    assert float(row["tflops_per_rank"]) == 0.002
    assert math.isnan(float(row["mfu"]))
    assert float(row["peak_mem_mib"]) == 120.0  # max over ranks


def test_table_has_a_header_and_one_row_per_file(results):
    run = summarize(results["complete"], results["interrupted"])
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].split()[:4] == ["file", "app", "cluster", "status"]
    complete = lines[1].split()
    assert complete[0].endswith("complete.h5")
    assert complete[1:8] == ["dp", "testbox", "complete", "2", "tiny", "2", "4"]
    assert complete[8:] == ["0.2500", "512.0", "0.002", "-", "120.0"]
    assert lines[2].split()[3] == "interrupted"


def test_killed_run_step_time_is_the_median_of_the_slowest_rank_after_warm_up(tmp_path):
    """Step times that tell the statistics apart (the linear ones above do not): two slow warm-up steps, a
    spike, and the slowest rank changing from step to step. Median of the measured steps' slowest rank:
    0.51 s; the mean would be 1.13, the median with the warm-up 0.71, rank 0's median 0.5."""
    times = np.array([[0.9, 0.8], [0.9, 0.7], [0.5, 0.49], [0.45, 0.5], [3.0, 0.2], [0.5, 0.52]])
    path = write_result(tmp_path / "spiky.h5", status="running", finished_steps=6, summary=False, step_times=times)
    run = summarize("--csv", path)
    assert run.returncode == 0, run.stderr
    row = csv_rows(run.stdout)["spiky.h5"]
    assert float(row["step_time_s"]) == pytest.approx(0.51)
    assert float(row["tokens_per_s"]) == pytest.approx(4 * 32 / 0.51)


def test_interrupted_and_killed_runs(results):
    run = summarize("--csv", results["interrupted"], results["killed"])
    assert run.returncode == 0, run.stderr
    rows = csv_rows(run.stdout)
    assert rows["interrupted.h5"]["status"] == "interrupted"
    assert float(rows["interrupted.h5"]["peak_mem_mib"]) == 90.0
    killed = rows["killed.h5"]
    assert killed["status"] == "running"
    # No /summary: median over steps 2..4 of the slowest rank, 0.52 + 0.01 * step.
    assert float(killed["step_time_s"]) == pytest.approx(0.55)
    assert float(killed["tokens_per_s"]) == pytest.approx(4 * 32 / 0.55)
    assert killed["tflops_per_rank"] == "" and killed["mfu"] == ""


@pytest.mark.parametrize("kind, message", [
    ("corrupt", "cannot open as HDF5"),
    ("v2", "schema_version 2 is not supported"),
    ("foreign", "not a parabench result"),
])
def test_bad_file_is_reported_and_the_others_still_print(results, kind, message):
    run = summarize("--csv", results["complete"], results[kind], results["interrupted"])
    assert run.returncode == 1
    errors = run.stderr.splitlines()
    assert len(errors) == 1
    assert str(results[kind]) in errors[0] and message in errors[0]
    assert set(csv_rows(run.stdout)) == {"complete.h5", "interrupted.h5"}


def test_directory_is_searched_for_h5_files(results, tmp_path):
    nested = tmp_path / "12345"
    nested.mkdir()
    write_result(nested / "dp_testbox_20250101T000000Z_12345.h5")
    (tmp_path / "notes.txt").write_text("not a result")
    run = summarize("--csv", tmp_path)
    assert run.returncode == 1  # corrupt.h5, v2.h5 and foreign.h5
    assert set(csv_rows(run.stdout)) == {"complete.h5", "interrupted.h5", "killed.h5",
                                         "dp_testbox_20250101T000000Z_12345.h5"}
    assert len(run.stderr.splitlines()) == 3


def test_missing_path_and_empty_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run = summarize(tmp_path / "absent.h5", empty)
    assert run.returncode == 1
    assert run.stdout == ""
    assert "absent.h5: no such file" in run.stderr
    assert "no *.h5 files" in run.stderr


def test_no_arguments_is_a_usage_error():
    run = summarize()
    assert run.returncode == 2
    assert "usage" in run.stderr
