"""A real single-node Slurm for the end-to-end tests of jobs/: the `slurm` fixture (tests/lib/slurm_cluster.py)
starts munged, slurmctld and slurmd for the session, with the machine itself as the one node, and stops
them at the end, also when a test failed.

Where Slurm cannot run (not installed, or not root) every test is skipped with the reason and
pytest exits with 77, which ctest reports as skipped (SKIP_RETURN_CODE).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from slurm_cluster import BUILD_DIR, REPO, Slurm, pytest_sessionfinish, skip_unless_slurm_can_run  # noqa: E402,F401

__all__ = ["BUILD_DIR", "REPO", "pytest_sessionfinish"]  # the hook: exit 77 when all skipped


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    skip_unless_slurm_can_run()
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
