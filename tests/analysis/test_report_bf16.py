"""The report of mixed-precision runs (--dtype bf16, SPEC 2.3): their memory plots and CSVs carry the
fp32 master weights as a category of their own, next to the bf16 parameters, with the files' numbers."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench")))
MODEL = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--vocab", "64", "--steps", "3",
         "--warmup", "1", "--quiet", "--dtype", "bf16", "--cluster", "gamma"]
SHARDS = ["NO_SHARD", "FULL_SHARD"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PARABENCH_"))}
    env["HDF5_USE_FILE_LOCKING"] = "FALSE"
    files = {}
    for shard in SHARDS:
        path = root / "gamma" / f"fsdp_{shard}.h5"
        cmd = ["mpiexec", "-n", "2", str(BIN_DIR / "fsdp" / "parabench-fsdp"), *MODEL, "--shard", shard, "--out",
               str(path)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
        files[shard] = path
    out = tmp_path_factory.mktemp("report")
    done = subprocess.run([sys.executable, "-m", "analysis.report", str(root), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return files, out


def test_memory_plot_shows_master_weights(made):
    files, out = made
    with open(out / "plots" / "memory_strategy_gamma_L2_h32_a2_S16_V64_2ranks_b1_G2_bf16.csv") as f:
        rows = list(csv.DictReader(f))
    for shard in SHARDS:
        got = {r["category"]: r for r in rows if r["strategy"] == shard}
        with h5py.File(files[shard], "r") as f:
            for category in ("parameters", "master_parameters"):
                assert int(got[category]["measured_bytes"]) == int(max(f[f"memory/measured/{category}"][()]))
                assert int(got[category]["predicted_bytes"]) == int(max(f[f"memory/predicted/{category}"][()]))
        # fp32 master weights: twice the bytes of the bf16 parameters they stand beside (NO_SHARD: both
        # whole; FULL_SHARD: both sharded)
        assert int(got["master_parameters"]["measured_bytes"]) == 2 * int(got["parameters"]["measured_bytes"]) > 0
    assert (out / "plots" / "memory_strategy_gamma_L2_h32_a2_S16_V64_2ranks_b1_G2_bf16.png").read_bytes()[:4] == b"\x89PNG"
