"""The GPU app tests use the app tests' harness (tests/app/conftest.py): the same launcher, result
reader and memory check, pointed at the cuda build (PB_BIN_DIR, default <repo>/build-cuda/bench)."""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("PB_BIN_DIR", str(REPO / "build-cuda" / "bench"))

_spec = importlib.util.spec_from_file_location("app_conftest", REPO / "tests" / "app" / "conftest.py")
app_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(app_conftest)

run_app = app_conftest.run_app
cached_run = app_conftest.cached_run
read_result = app_conftest.read_result
assert_memory_matches_prediction = app_conftest.assert_memory_matches_prediction
assert_memory_log_fits = app_conftest.assert_memory_log_fits


def visible_gpus():
    """GPUs nvidia-smi lists (0 without a driver)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def pytest_collection_modifyitems(config, items):
    if visible_gpus() == 0:
        skip = pytest.mark.skip(reason="no GPU visible: the GPU app tests are not run here")
        for item in items:
            item.add_marker(skip)
