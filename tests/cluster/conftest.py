"""A Slurm cluster of four nodes on one machine for the multi-node tests and sweeps (tests/lib/slurm_cluster.py,
docs/jobs.md): each node a network namespace with its own host name and address on a bridge, one
slurmd each, slurmctld and munged shared; started once for the session and removed at its end, every
daemon, namespace and link, also when a test failed.

Where it cannot run (Slurm not installed, not root, no iproute2) every test is skipped with the reason
and pytest exits with 77, which ctest reports as skipped.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from slurm_cluster import NetnsNodes, Slurm, pytest_sessionfinish, skip_unless_slurm_can_run  # noqa: E402,F401

NODES = 4
__all__ = ["pytest_sessionfinish"]  # the hook: exit 77 when all skipped


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    skip_unless_slurm_can_run(network=True)
    root = tmp_path_factory.mktemp("cluster")
    slurm = Slurm(root, NetnsNodes(NODES, root / "hosts"), cluster_name="pbmulti", cpus_per_node=4)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
        left = slurm.network.leftovers()
        assert not left, f"the test cluster left {left} behind"
