"""Fixtures of the fault-injection tests: the app fixtures of tests/app (runs through mpiexec, result
files, the PARABENCH_RESULT line), plus a small file system that a test can fill (a tmpfs mount) and
a memory limit (a memory cgroup). Both need root: a test that asks for them without root, or where the
kernel refuses, is skipped with the reason. Everything a fixture mounts or creates is removed at
teardown, also when the test fails.
"""

import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The fixtures of tests/app/conftest.py, loaded under another name and re-exported here.
_spec = importlib.util.spec_from_file_location("pb_app_conftest", REPO / "tests" / "app" / "conftest.py")
app = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(app)
sys.modules["pb_app_conftest"] = app  # for the helpers the tests share with tests/app (check_rejected)
run_app = app.run_app
start_app = app.start_app
parse_result_line = app.parse_result_line
job_pids = app.job_pids
kill = app.kill
launcher_version = app.launcher_version


def _require_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (a tmpfs mount or a memory cgroup)")


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size) -> a folder on a fresh tmpfs of that size ("64k", "1m"), unmounted at teardown."""
    mounts = []

    def mount(size):
        _require_root()
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill_disk(folder):
    """Writes a file into `folder` until its file system is full."""
    with open(Path(folder) / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


@pytest.fixture(scope="session")
def fill():
    return fill_disk


def _memory_cgroup_parent():
    """(the folder a test cgroup is made in, its limit file name) for this machine's memory cgroups."""
    v2_root = Path("/sys/fs/cgroup")
    try:
        controllers = (v2_root / "cgroup.subtree_control").read_text().split()
    except OSError:
        controllers = []
    if "memory" in controllers:
        return v2_root, "memory.max"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if "memory" in names.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"
    return None, None


@pytest.fixture
def memory_cgroup():
    """memory_cgroup(limit_bytes) -> a command prefix that runs its command inside a new memory cgroup
    with that limit; the cgroup is removed at teardown."""
    made = []

    def make(limit_bytes):
        _require_root()
        parent, limit_file = _memory_cgroup_parent()
        if parent is None or not parent.is_dir():
            pytest.skip("no memory cgroup controller to put a limit on")
        group = parent / f"parabench-test-{uuid.uuid4().hex[:8]}"
        try:
            group.mkdir()
            (group / limit_file).write_text(str(limit_bytes))
        except OSError as e:
            pytest.skip(f"cannot create a memory cgroup here: {e}")
        made.append(group)
        return ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh"]

    yield make
    for group in made:
        try:
            group.rmdir()
        except OSError:
            pass
