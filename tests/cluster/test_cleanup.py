"""Stopping a test session that runs a test cluster leaves nothing of it behind: a session whose test
fails an assertion, and one stopped by SIGTERM while its test runs (as a batch system or a user stops
it), each in a child pytest with a 2-node cluster of its own. Afterwards no network namespace, link or
/run/netns mount of that cluster exists, and no process runs from its folder (munged, slurmctld, the
slurmds and their private mounts, job steps). Runs before this session's own cluster starts (the
clusters share one subnet, taken under a lock): pytest takes this file first."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slurm_cluster import NetnsNodes, skip_unless_slurm_can_run

LIB = Path(__file__).resolve().parents[1] / "lib"
CONFTEST = f"""
import sys
sys.path.insert(0, {str(LIB)!r})
import pytest
from slurm_cluster import NetnsNodes, Slurm


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    slurm = Slurm(root, NetnsNodes(2, root / "hosts"), cluster_name="pbstop", cpus_per_node=2)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
"""
TESTS = """
import os
import time
from pathlib import Path


def test_fails(cluster):
    assert cluster.run("sinfo", "-h").returncode == 0
    assert False, "a failing assertion"


def test_is_stopped(cluster):
    job = cluster.run("sbatch", "--parsable", "--nodes=2", "--wrap", "srun sleep 300").stdout.strip()
    while "RUNNING" not in cluster.run("squeue", "-h", "-o", "%T", "-j", job).stdout:
        time.sleep(0.2)
    Path(os.environ["READY"]).write_text(" ".join(cluster.network.namespaces))
    time.sleep(300)
"""


def leftovers(tag, root):
    """What of cluster `tag` (pbt<pid>) is still there: namespaces, links, netns mounts, processes."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"namespace {n}" for n in re.findall(rf"^({tag}\S*)", netns, flags=re.M)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {n}" for n in re.findall(rf"^\d+: ({tag}[^:@\s]*)", links, flags=re.M)]
    found += [f"mount {line.split()[1]}" for line in Path("/proc/mounts").read_text().splitlines()
              if f"/run/netns/{tag}" in line or str(root) in line]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(root) in cmdline:
                found.append(f"process {proc.name}: {cmdline.strip()}")
    return found


@pytest.fixture
def session_dir(tmp_path, request):
    skip_unless_slurm_can_run(network=True)
    if "cluster" in request.session._fixturemanager._arg2fixturedefs and NetnsNodes.LOCK.exists():
        # This session's cluster may hold the lock already (this file run after another): a child's
        # cluster would wait for it.
        if any(getattr(d, "cached_result", None) for d in request.session._fixturemanager._arg2fixturedefs["cluster"]):
            pytest.skip("this session's test cluster is running already: run this file first")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_inner.py").write_text(TESTS)
    return tmp_path


def child(session_dir, test, **env):
    # A short folder: slurmstepd's sockets live in the spool folder under it, and a Unix socket's path
    # has at most 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="pbstop", dir="/tmp"))
    shutil.rmtree(base)  # pytest's --basetemp wants to create it
    env = {**os.environ, **env}
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(base),
                             f"{session_dir / 'test_inner.py'}::{test}"], cwd=session_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, base


def test_a_failing_assertion_leaves_nothing_behind(session_dir):
    proc, base = child(session_dir, "test_fails")
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "a failing assertion" in out, out
    assert leftovers(f"{NetnsNodes.PREFIX}{proc.pid}", base) == [], out
    shutil.rmtree(base, ignore_errors=True)


def test_sigterm_leaves_nothing_behind(session_dir):
    ready = session_dir / "ready"
    proc, base = child(session_dir, "test_is_stopped", READY=str(ready))
    tag = f"{NetnsNodes.PREFIX}{proc.pid}"
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.send_signal(signal.SIGTERM)
                pytest.fail("the child session did not get its job running:\n" + proc.communicate(timeout=120)[0])
            time.sleep(0.2)
        assert leftovers(tag, base), "the cluster should be running now"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert leftovers(tag, base) == [], out
    assert proc.returncode != 0 and "SIGTERM" in out, out  # stopped by it, through pytest's teardown
    shutil.rmtree(base, ignore_errors=True)
