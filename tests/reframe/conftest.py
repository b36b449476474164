"""tests/reframe: parabench's ReFrame checks through ReFrame with the local scheduler. Skipped, with the
reason and exit 77 (ctest: skipped), where scripts/setup.sh could not install ReFrame."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))
from slurm_cluster import pytest_sessionfinish  # noqa: E402,F401  (the hook: exit 77 when all skipped)

__all__ = ["pytest_sessionfinish"]
