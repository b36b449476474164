"""--memory-log: each rank's history of its memory, and every allocation's category checked against its
lifetime (docs/SPEC.md section 6; analysis/memory_log.py states the rules).

A buffer filed under the wrong category is invisible to the per-category peaks wherever it is not live
at that category's peak; its lifetime shows it in every layout: an activation freed within its forward,
a workspace block that outlives its phase, a comm buffer no communicator sees, a received buffer filed
as scratch, a resident tensor allocated inside a step. Every app and schedule runs here on two or four
ranks, and

* every allocation of every rank fits its category;
* the log is the tracker's: replayed, it gives the result file's /memory/measured peaks per category and
  rank, byte for byte, and it holds every step;
* and the memory model predicts each category to the byte in each of these layouts (peak_total, the sum
  of the peaks, at most 10 % above the peak of the sum);
* a directory that cannot be written is exit 3 naming it, before any step.
"""

import sys

import pytest

from conftest import REPO, assert_memory_log_fits, assert_memory_matches_prediction, read_result

sys.path.insert(0, str(REPO))
from analysis import memory_log  # noqa: E402

STEPS = 2
TINY = ["--model", "tiny", "--steps", str(STEPS), "--warmup", "1"]

LAYOUTS = {  # name: (app, ranks, args)
    "dp accumulating": ("dp", 2, ["--global-batch", "8"]),
    "fsdp FULL_SHARD": ("fsdp", 2, ["--shard", "FULL_SHARD", "--global-batch", "4"]),
    "fsdp FULL_SHARD no prefetch": ("fsdp", 2, ["--shard", "FULL_SHARD", "--no-prefetch"]),
    "fsdp SHARD_GRAD_OP": ("fsdp", 2, ["--shard", "SHARD_GRAD_OP", "--global-batch", "4"]),
    "fsdp ZERO1": ("fsdp", 2, ["--shard", "ZERO1"]),
    "fsdp NO_SHARD": ("fsdp", 2, ["--shard", "NO_SHARD"]),
    "fsdp HYBRID_SHARD": ("fsdp", 4, ["--shard", "HYBRID_SHARD", "--shard-group", "2"]),
    "fsdp FULL_SHARD bf16": ("fsdp", 2, ["--shard", "FULL_SHARD", "--dtype", "bf16", "--grad-dtype", "bf16"]),
    "tp × dp": ("tp", 4, ["--tp", "2"]),
    "pp 1f1b": ("pp", 2, ["--pp", "2", "--global-batch", "4"]),
    "pp gpipe": ("pp", 2, ["--pp", "2", "--schedule", "gpipe", "--global-batch", "4"]),
    "pp naive": ("pp", 2, ["--pp", "2", "--schedule", "naive", "--global-batch", "4"]),
    "pp interleaved": ("pp", 2, ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2", "--layers", "4",
                                 "--global-batch", "4"]),
    "ep": ("ep", 2, ["--ep", "2"]),
    "cp ring": ("cp", 2, ["--cp", "2"]),
    "cp allgather": ("cp", 2, ["--cp", "2", "--cp-algo", "allgather"]),
    "cp alltoall": ("cp", 2, ["--cp", "2", "--cp-algo", "alltoall"]),
    "hybrid tp × pp": ("hybrid", 4, ["--tp", "2", "--pp", "2", "--global-batch", "4"]),
    "hybrid pp × FULL_SHARD": ("hybrid", 4, ["--pp", "2", "--shard", "FULL_SHARD", "--global-batch", "4"]),
    "hybrid tp × ep": ("hybrid", 4, ["--tp", "2", "--moe", "--ep", "2"]),
    "dp selective recompute": ("dp", 2, ["--recompute", "selective"]),
    "tp full recompute": ("tp", 2, ["--tp", "2", "--recompute", "full"]),
    "tp llama": ("tp", 2, ["--tp", "2", "--arch", "llama"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_allocation_fits_its_category(run_app, tmp_path, name):
    app, ranks, args = LAYOUTS[name]
    out, logs = tmp_path / "run.h5", tmp_path / "memory"
    cmd = args + TINY + ["--out", str(out), "--memory-log", str(logs), "--quiet"]
    rc, stdout, stderr = run_app(app, ranks, cmd, timeout=90)
    assert rc == 0, run_app.describe(run_app.command(app, ranks, cmd), rc, stdout, stderr)
    result = read_result(out)
    result["command"] = " ".join(map(str, run_app.command(app, ranks, cmd)))
    assert_memory_matches_prediction(result, name)
    assert_memory_log_fits(logs, result["measured"], ranks, app=app, steps=STEPS)


def test_the_collectives_buffers_are_logged(run_app, tmp_path):
    """FULL_SHARD gathers each unit into a comm buffer and reduce-scatters its gradient from one: the
    log holds both kinds of use, each inside a live comm buffer."""
    logs = tmp_path / "memory"
    cmd = ["--shard", "FULL_SHARD"] + TINY + ["--out", str(tmp_path / "run.h5"), "--memory-log", str(logs), "--quiet"]
    rc, stdout, stderr = run_app("fsdp", 2, cmd)
    assert rc == 0, stderr
    history = memory_log.read(logs / "rank1.tsv")
    uses = {what for b in history.blocks for _, what in b.uses if b.category == "comm_buffers"}
    assert {"all_gather:recv", "reduce_scatter:send", "reduce_scatter:recv"} <= uses


def test_an_unwritable_directory_stops_the_run_before_any_step(run_app, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    out = tmp_path / "run.h5"
    rc, stdout, stderr = run_app("dp", 2, TINY + ["--out", str(out), "--memory-log", str(blocker / "logs")])
    assert rc == 3, stderr
    assert f"--memory-log {blocker / 'logs'}: cannot create the directory" in stderr
    assert stderr.count("error:") == 1, stderr  # the lowest rank that failed says why, once
    assert "step " not in stdout and not out.exists()
