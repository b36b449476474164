"""analysis/memory_log.py against hand-written histories: each rule of SPEC section 6's categories fires
on the misfiled block it is for and on nothing else, recomputation and run-long scratch are told apart
from misfiling, and a malformed or inconsistent log is an error naming its line."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from analysis import memory_log  # noqa: E402

HEADER = "# parabench memory log, rank 0 of 1\n# app dp, backend cpu, dtype fp32, recompute {recompute}, steps 1\n"

# A correct step: resident state made before it, an activation kept from the forward to the backward,
# workspace within one phase, a gradient bucket received into, run-long scratch made at its first use.
GOOD = """\
alloc\t0x1000\tparameters\t64
alloc\t0x2000\tgradients\t64
alloc\t0x3000\toptimizer_states\t128
mark\tstep_begin
mark\tforward_begin
alloc\t0x4000\tactivations\t32
alloc\t0x5000\tworkspace\t16
free\t0x5000\tworkspace\t16
alloc\t0x9000\tworkspace\t8
mark\tforward_end
mark\tbackward_begin
alloc\t0x6000\tcomm_buffers\t64
use\t0x6000\tall_gather:recv\t64
use\t0x2000\tall_reduce:buf\t64
free\t0x6000\tcomm_buffers\t64
free\t0x4000\tactivations\t32
mark\tbackward_end
mark\toptimizer_begin
mark\tstep_end
free\t0x9000\tworkspace\t8
free\t0x3000\toptimizer_states\t128
free\t0x2000\tgradients\t64
free\t0x1000\tparameters\t64
"""


def history(tmp_path, body, recompute="none"):
    path = tmp_path / "rank0.tsv"
    path.write_text(HEADER.format(recompute=recompute) + body)
    return memory_log.read(path)


def problems(tmp_path, body, recompute="none"):
    return [text for _, text in memory_log.violations(history(tmp_path, body, recompute))]


def test_a_correct_history_has_no_violation(tmp_path):
    h = history(tmp_path, GOOD)
    assert memory_log.violations(h) == []
    assert h.ended_steps == 1 and h.header["recompute"] == "none"
    assert memory_log.summary(h)["optimizer_states"] == (1, 128, 128)
    assert memory_log.summary(h)["workspace"] == (2, 16, 16)  # 16 B freed before 8 B came


def misfile(address, category):
    """GOOD with the block at `address` filed under `category` (its alloc and its free)."""
    lines = []
    for line in GOOD.splitlines():
        f = line.split("\t")
        if f[0] in ("alloc", "free") and f[1] == address:
            f[2] = category
        lines.append("\t".join(f))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("address, category, rule", [
    # an activation filed as workspace: it outlives its forward
    ("0x4000", "workspace", "workspace is scratch of one phase, but it outlived it"),
    # scratch filed as an activation: freed before its forward ended
    ("0x5000", "activations", "activations are kept for backward, but it was freed before its forward ended"),
    # a gathered unit filed as workspace: a communicator receives into it
    ("0x6000", "workspace", "a communicator writes into it (all_gather:recv"),
    # ... as an activation: made in a backward without recomputation
    ("0x6000", "activations", "activations are allocated in a forward"),
    # ... as gradients: a resident category allocated inside a step
    ("0x6000", "gradients", "gradients are resident, but it was allocated inside a step"),
    # scratch filed as a comm buffer: no communicator sees it
    ("0x5000", "comm_buffers", "a comm_buffer no communicator was handed"),
])
def test_each_misfiled_block_breaks_its_rule(tmp_path, address, category, rule):
    found = problems(tmp_path, misfile(address, category))
    assert any(rule in text for text in found), found


def test_resident_state_freed_inside_a_step(tmp_path):
    body = GOOD.replace("mark\toptimizer_begin\n", "mark\toptimizer_begin\nfree\t0x3000\toptimizer_states\t128\n"
                        "alloc\t0x3000\toptimizer_states\t128\n")
    found = problems(tmp_path, body)
    assert any("optimizer_states are resident, but it was allocated inside a step" in t for t in found), found


def test_an_activation_freed_outside_a_backward(tmp_path):
    body = GOOD.replace("free\t0x4000\tactivations\t32\n", "").replace(
        "mark\tstep_end\n", "mark\tstep_end\nfree\t0x4000\tactivations\t32\n")
    found = problems(tmp_path, body)
    assert any("activations are freed by a backward, but it was freed in between steps" in t for t in found), found


def test_recomputation_drops_activations_in_the_forward_and_makes_them_in_the_backward(tmp_path):
    body = GOOD.replace("free\t0x5000\tworkspace\t16", "free\t0x5000\tactivations\t16").replace(
        "alloc\t0x5000\tworkspace\t16", "alloc\t0x5000\tactivations\t16").replace(
        "mark\tbackward_begin\n", "mark\tbackward_begin\nalloc\t0x7000\tactivations\t16\nfree\t0x7000\tactivations\t16\n")
    assert problems(tmp_path, body, recompute="full") == []
    found = problems(tmp_path, body, recompute="none")
    assert len(found) == 3, found  # dropped in its forward (two rules), made in a backward


def test_workspace_freed_in_a_later_step_is_not_run_long(tmp_path):
    body = GOOD.replace("free\t0x9000\tworkspace\t8\n", "").replace(
        "mark\toptimizer_begin\n", "mark\toptimizer_begin\nfree\t0x9000\tworkspace\t8\n")
    found = problems(tmp_path, body)
    assert any("workspace is scratch of one phase, but it outlived it (freed at line" in t for t in found), found


@pytest.mark.parametrize("body, message", [
    ("free\t0x1000\tparameters\t64\n", "free of 0x1000, which is not live"),
    ("alloc\t0x1000\tparameters\t64\nalloc\t0x1000\tparameters\t64\n", "0x1000 allocated again while live"),
    ("alloc\t0x1000\tparameters\t64\nfree\t0x1000\tgradients\t64\n", "freed as gradients 64 B but allocated as"),
    ("alloc\t0x1000\tbuffers\t64\n", "unknown category 'buffers'"),
    ("mark\tstep\n", "unknown mark 'step'"),
    ("use\t0x1000\tall_reduce:buf\t64\n", "which no live block holds"),
    ("alloc\t0x1000\tparameters\t64\nuse\t0x1020\tsend:send\t64\n", "which no live block holds"),
    ("alloc\t0x1000\tparameters\n", "malformed line"),
    ("resize\t0x1000\n", "unknown event 'resize'"),
])
def test_an_inconsistent_log_is_an_error_naming_its_line(tmp_path, body, message):
    with pytest.raises(memory_log.LogError, match=r"rank0\.tsv:\d+: .*" + message.replace("(", r"\(")):
        history(tmp_path, body)


def test_a_log_cut_mid_line_ends_at_its_last_whole_line(tmp_path):
    """A run killed by SIGKILL leaves what its buffer had written: the replay stops before the cut."""
    cut = GOOD[:GOOD.index("mark\tforward_end")] + "mark\tforw"
    h = history(tmp_path, cut)
    assert h.ended_steps == 0 and len(h.blocks) == 6
    assert all(b.free_line == 0 for b in h.blocks if b.address == 0x4000)
    assert memory_log.violations(h) == []  # nothing is judged on what the cut hid


def test_the_command_line(tmp_path, capsys):
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "rank0.tsv").write_text(HEADER.format(recompute="none") + GOOD)
    assert memory_log.main([str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    assert "optimizer_states" in out and "0 violations in 1 log" in out
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "rank0.tsv").write_text(HEADER.format(recompute="none") + misfile("0x4000", "workspace"))
    assert memory_log.main(["--quiet", str(tmp_path / "bad")]) == 1
    assert "rank0.tsv:8: the workspace block of 32 B allocated at line 8 (in forward)" in capsys.readouterr().out
    assert memory_log.main([str(tmp_path / "nothing")]) == 2
    assert "no such file" in capsys.readouterr().err.lower()
    (tmp_path / "empty").mkdir()
    assert memory_log.main([str(tmp_path / "empty")]) == 2
    assert "no rank*.tsv" in capsys.readouterr().err
