"""The report's cost and energy ranking (analysis/report.py, "Cost and energy at equal configurations")
on the result files of three fake clusters of one configuration: "cheap" and "dear" state prices in
their profiles (recorded by the app from PB_PRICE_* into /system), "unpriced" states none. Each file's
measured figures (/summary tokens/s, step time, energy) are then set to known values, so that every
figure of the table follows from its inputs: cost per million tokens = (price per node-hour × nodes +
price per kWh × measured kW) / (tokens/s × 3600) × 10^6, and the ranks order the clusters by it, by
tokens per joule and by tokens/s per GPU (none on the CPU: no rank)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
import h5py  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench")))
MODEL = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--vocab", "64", "--steps", "3",
         "--warmup", "1", "--quiet"]

# cluster: (profile prices, tokens/s, step time s, energy J per step)
CLUSTERS = {
    "cheap": ({"PB_PRICE_NODE_HOUR": "1.2", "PB_PRICE_KWH": "0.25", "PB_CURRENCY": "EUR"}, 4000.0, 0.008, 0.4),
    "dear": ({"PB_PRICE_NODE_HOUR": "3", "PB_CURRENCY": "EUR"}, 5000.0, 0.0064, 0.16),
    "unpriced": ({}, 3000.0, 0.01, 0.2),
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PARABENCH_", "PB_PRICE",
                                                                   "PB_CURRENCY"))}
    for cluster, (prices, tokens_per_s, step_time, energy) in CLUSTERS.items():
        path = root / "results" / f"{cluster}.h5"
        cmd = ["mpiexec", "-n", "1", str(BIN_DIR / "dp" / "parabench-dp"), *MODEL, "--cluster", cluster,
               "--out", str(path)]
        done = subprocess.run(cmd, env={**env, **prices}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
        with h5py.File(path, "r+") as f:
            tokens_per_step = tokens_per_s * step_time
            f["summary"].attrs.update({"tokens_per_s": tokens_per_s, "step_time_s": step_time,
                                       "step_time_s_min": step_time, "step_time_s_max": step_time,
                                       "energy_j_per_step": energy, "energy_sources": "rapl",
                                       "joules_per_token": energy / tokens_per_step,
                                       "tokens_per_joule": tokens_per_step / energy})
    out = root / "report"
    done = subprocess.run([sys.executable, "-m", "analysis.report", str(root / "results"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def test_prices_are_recorded_from_the_profile(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PB_PRICE", "PB_CURRENCY"))}
    path = tmp_path / "p.h5"
    subprocess.run(["mpiexec", "-n", "1", str(BIN_DIR / "dp" / "parabench-dp"), *MODEL, "--out", str(path)],
                   env={**env, "PB_PRICE_GPU_HOUR": "2.5", "PB_CURRENCY": "USD"}, check=True, capture_output=True,
                   timeout=60)
    with h5py.File(path, "r") as f:
        s = f["system"].attrs
        assert s["price_per_gpu_hour"] == 2.5 and s["currency"] == "USD"
        assert all(v != v for v in (s["price_per_node_hour"], s["electricity_price_per_kwh"]))  # NaN: not stated
    bad = subprocess.run(["mpiexec", "-n", "1", str(BIN_DIR / "dp" / "parabench-dp"), *MODEL, "--out",
                          str(tmp_path / "q.h5")], env={**env, "PB_PRICE_KWH": "cheap"}, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "PB_PRICE_KWH=cheap is not a price" in bad.stdout + bad.stderr, bad.stderr
    assert "MPI_Abort" not in bad.stderr and not (tmp_path / "q.h5").exists()  # a configuration error, not an abort


def test_a_bad_price_on_one_rank_ends_every_rank_with_exit_2(tmp_path):
    # Rank 1 alone sees a bad price (an environment that differs per rank): the ranks agree on the
    # verdict, every one ends with exit 2 and the message names rank 1; nothing waits, nothing aborts.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PB_PRICE", "PB_CURRENCY"))}
    app = [str(BIN_DIR / "dp" / "parabench-dp"), *MODEL, "--out", str(tmp_path / "r.h5")]
    bad = subprocess.run(["mpiexec", "-n", "1", *app, ":", "-n", "1", "env", "PB_PRICE_NODE_HOUR=nan", *app],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2, bad.stderr
    assert "PB_PRICE_NODE_HOUR=nan is not a price" in bad.stderr and "(rank 1)" in bad.stderr, bad.stderr
    assert bad.stderr.count("is not a price") == 1, bad.stderr  # said once, by rank 0
    assert "MPI_Abort" not in bad.stderr and not (tmp_path / "r.h5").exists()
    micro = subprocess.run(["mpiexec", "-n", "1", str(BIN_DIR / "micro" / "parabench-micro"), "--out",
                            str(tmp_path / "m.h5")], env={**env, "PB_PRICE_GPU_HOUR": "-1"}, capture_output=True,
                           text=True, timeout=60)
    assert micro.returncode == 2 and "PB_PRICE_GPU_HOUR=-1 is not a price" in micro.stderr, micro.stderr
    assert not (tmp_path / "m.h5").exists()


def test_clusters_ranked_by_cost_energy_and_speed(report):
    with open(report / "cost_energy.csv", newline="") as f:
        rows = {r["cluster"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(CLUSTERS)
    expected = {}
    for cluster, (prices, tokens_per_s, step_time, energy) in CLUSTERS.items():
        power_kw = energy / step_time / 1000.0
        parts = []
        if "PB_PRICE_NODE_HOUR" in prices:
            parts.append(float(prices["PB_PRICE_NODE_HOUR"]) * 1)  # one node
        if "PB_PRICE_KWH" in prices:
            parts.append(float(prices["PB_PRICE_KWH"]) * power_kw)
        cost = sum(parts) / (tokens_per_s * 3600.0) * 1e6 if parts else None
        expected[cluster] = (cost, tokens_per_s * step_time / energy, energy / step_time)
    for cluster, (cost, tokens_per_joule, power) in expected.items():
        r = rows[cluster]
        assert float(r["tokens_per_joule"]) == pytest.approx(tokens_per_joule, rel=1e-9), cluster
        assert float(r["power_w"]) == pytest.approx(power, rel=1e-9), cluster
        if cost is None:
            assert r["cost_per_million_tokens"] in ("", "nan") and r["rank_cost"] in ("", "nan"), r
        else:
            assert float(r["cost_per_million_tokens"]) == pytest.approx(cost, rel=1e-9), cluster
        assert r["gpus"] == "0" and r["rank_tokens_per_s_per_gpu"] in ("", "nan")  # the CPU backend: no GPUs
    # cheap: (1.2 + 0.25 · 0.05 kW) / (4000 · 3600) · 1e6 = 0.0842; dear: 3 / (5000 · 3600) · 1e6 = 0.1667
    assert (rows["cheap"]["rank_cost"], rows["dear"]["rank_cost"]) == ("1", "2")
    # tokens per joule: cheap 32/0.4 = 80, dear 32/0.16 = 200, unpriced 30/0.2 = 150
    assert [rows[c]["rank_tokens_per_joule"] for c in ("dear", "unpriced", "cheap")] == ["1", "2", "3"]
    assert rows["cheap"]["hourly_inputs"] == "1.2/node-h × 1 node"
    assert rows["cheap"]["electricity_inputs"] == "0.25/kWh × 0.05 kW"
    assert rows["dear"]["electricity_inputs"] == ""  # no electricity price stated


def test_the_table_is_in_the_report(report):
    md = (report / "report.md").read_text()
    section = md[md.index("### Cost and energy at equal configurations"):]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| cluster | tokens/s | GPUs | tokens/s per GPU | rank |")
    clusters = [line.split("|")[1].strip() for line in lines[1:4]]
    assert clusters == ["cheap", "dear", "unpriced"]  # by cost, the unpriced last
