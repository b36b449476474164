"""python3 -m analysis.report on parabench-ep result files that the app writes here: ep runs with and
without a capacity limit next to a dp run of the same model shape and batch, and a model of more
layers than the report draws as panels (a heatmap then); copies of an ep run killed before its end
(status running, no /summary, no /moe: the app writes /moe last) and of a complete one whose /moe is
gone. The report is run as a user runs it and judged by report.md (tables parsed back) and the numbers
behind each tokens-per-expert plot (plots/*.csv), against the result files read here with h5py."""

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from test_report import csv_rows, md_tables, number, png_size, report  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from analysis.results import ResultError, load, strategy_label  # noqa: E402

BIN_DIR = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench")))
SHAPE = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--vocab", "64"]
STEPS = ["--steps", "4", "--warmup", "1", "--quiet", "--cluster", "alpha"]

# name: (app, ranks, options). ep2: capacity 1.0 with top-2 of 4 experts drops assignments; ep1 is
# dropless with an auxiliary loss; deep has 10 layers (a heatmap); dp is the dense model beside ep2.
RUNS = {
    "ep2": ("ep", 2, [*SHAPE, "--experts", "4", "--top-k", "2", "--ep", "2"]),
    "ep1": ("ep", 1, [*SHAPE, "--experts", "4", "--top-k", "1", "--capacity-factor", "0", "--aux-loss", "0.01"]),
    "deep": ("ep", 2, ["--layers", "10", "--hidden", "32", "--heads", "2", "--seq", "16", "--vocab", "64",
                       "--experts", "8", "--top-k", "2", "--ep", "2", "--capacity-factor", "1.5"]),
    "dp": ("dp", 2, SHAPE),
}
PANEL_NAME = "moe_tokens_per_expert_alpha_ep2_E4_k2_cf1_L2_h32_a2_S16_V64_2ranks_b1_G2_fp32"
DROPLESS_NAME = "moe_tokens_per_expert_alpha_ep1_E4_k1_dropless_aux0.01_L2_h32_a2_S16_V64_1ranks_b1_G1_fp32"
DEEP_NAME = "moe_tokens_per_expert_alpha_ep2_E8_k2_cf1.5_L10_h32_a2_S16_V64_2ranks_b1_G2_fp32"
MOE_HEADING = "Tokens per expert (mixture-of-experts load balance)"


def read_moe(path):
    """What the tokens-per-expert plot shows of a run, read directly."""
    with h5py.File(path, "r") as f:
        tokens = f["moe/tokens_per_expert"][()]
        return {"tokens": tokens.sum(axis=0), "dropped": f["moe/dropped"][()].sum(axis=0), "steps": tokens.shape[0],
                "imbalance": float(f["moe/tokens_per_expert"].attrs["imbalance"]),
                "summary_imbalance": float(f["summary"].attrs["moe_imbalance"]),
                "dropped_fraction": float(f["summary"].attrs["moe_dropped_fraction"]),
                "aux_loss": f["moe/aux_loss"][()]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{name: path} of the runs above under results/, plus the 'killed' and 'no_moe' copies of ep2."""
    root = tmp_path_factory.mktemp("results")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PARABENCH_"))}
    files = {}
    for name, (app, ranks, options) in RUNS.items():
        path = root / f"{name}.h5"
        cmd = ["mpiexec", "-n", str(ranks), str(BIN_DIR / app / f"parabench-{app}"), *options, *STEPS,
               "--out", str(path)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
        files[name] = path
    # Killed after its first step (SIGKILL, a lost rank): status running, one finished step, no
    # /summary, and no /moe, which the app writes at the end.
    files["killed"] = root / "killed.h5"
    shutil.copy(files["ep2"], files["killed"])
    with h5py.File(files["killed"], "r+") as f:
        f.attrs["status"] = "running"
        f["steps"].attrs["finished"] = np.int64(1)
        del f["summary"], f["moe"]
    files["no_moe"] = root / "no_moe.h5"  # complete, /moe lost: the report says so and goes on
    shutil.copy(files["ep1"], files["no_moe"])
    with h5py.File(files["no_moe"], "r+") as f:
        del f["moe"]
    return files


@pytest.fixture(scope="module")
def made(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    done = report(results["ep2"].parent, "--out", out)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"report: 5 complete and 1 other run\(s\) from 1 cluster\(s\); wrote .* and \d+ plot\(s\) "
                        r"in .*\n", done.stdout), done.stdout
    return {"out": out, "md": (out / "report.md").read_text()}


def test_strategy_label_names_ep_and_its_options():
    config = {"app": "ep", "ep": 4, "experts": 8, "top_k": 2, "capacity_factor": 1.0, "aux_loss": 0.0}
    assert strategy_label(config) == "ep4 E8 k2 cf1"
    assert strategy_label({**config, "capacity_factor": 1.25, "aux_loss": 0.01}) == "ep4 E8 k2 cf1.25 aux0.01"
    assert strategy_label({**config, "capacity_factor": 0.0, "recompute": "full"}) == "ep4 E8 k2 dropless recompute=full"


def test_summary_table_shows_ep_with_its_options_and_balance(results, made):
    rows = {Path(r["file"]).stem: r for r in md_tables(made["md"])["alpha: ep"]}
    assert set(rows) == {"ep2", "ep1", "deep", "no_moe"}
    assert rows["ep2"]["strategy"] == "ep2 E4 k2 cf1" and rows["ep2"]["model"] == "L2 h32 a2 S16 V64"
    assert rows["ep1"]["strategy"] == "ep1 E4 k1 dropless aux0.01"
    assert rows["deep"]["strategy"] == "ep2 E8 k2 cf1.5" and rows["deep"]["model"] == "L10 h32 a2 S16 V64"
    for name in ("ep2", "ep1", "deep"):
        moe = read_moe(results[name])
        assert number(rows[name]["MoE imbalance"]) == pytest.approx(moe["summary_imbalance"], abs=0.005)
        assert number(rows[name]["dropped"]) == pytest.approx(100 * moe["dropped_fraction"], abs=0.05)
    assert number(rows["ep2"]["dropped"]) > 0 and rows["ep1"]["dropped"] == "0.0%"
    assert "MoE imbalance" not in md_tables(made["md"])["alpha: dp"][0]  # only ep's table has the columns
    # The strategies side by side: dp and ep2 share model shape, ranks and batch.
    rows = csv_rows(made["out"] / "plots" / "step_time_L2_h32_a2_S16_V64_2ranks_b1_G2_fp32.csv")
    assert [r["strategy"] for r in rows] == ["dp", "ep2 E4 k2 cf1"]
    rows = csv_rows(made["out"] / "plots" / "memory_strategy_alpha_L2_h32_a2_S16_V64_2ranks_b1_G2_fp32.csv")
    assert {r["strategy"] for r in rows} == {"dp", "ep2 E4 k2 cf1"}


def test_tokens_per_expert_plot_of_each_ep_run(results, made):
    plots = made["out"] / "plots"
    section = made["md"].split(f"### {MOE_HEADING}")[1].split("## 4.")[0]
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", section)
    assert sorted(linked) == sorted(f"plots/{n}.png" for n in (PANEL_NAME, DROPLESS_NAME, DEEP_NAME))
    import matplotlib.image
    for run, name, layers, experts in (("ep2", PANEL_NAME, 2, 4), ("ep1", DROPLESS_NAME, 2, 4),
                                       ("deep", DEEP_NAME, 10, 8)):
        width, height = png_size(plots / f"{name}.png")
        assert width >= 600 and height >= 300
        pixels = matplotlib.image.imread(plots / f"{name}.png")
        assert pixels[..., :3].std() > 0.05, f"{name}.png is (nearly) blank"
        moe = read_moe(results[run])
        rows = csv_rows(plots / f"{name}.csv")
        assert [(int(r["layer"]), int(r["expert"])) for r in rows] == [(l, e) for l in range(layers)
                                                                        for e in range(experts)]
        got = np.array([int(r["tokens"]) for r in rows]).reshape(layers, experts)
        assert (got == moe["tokens"]).all()  # summed over every step of the run
        assert {int(r["steps"]) for r in rows} == {moe["steps"]} == {4}
        for layer in range(layers):
            mine = [r for r in rows if int(r["layer"]) == layer]
            mean = moe["tokens"][layer].mean()
            assert float(mine[0]["layer_mean"]) == pytest.approx(mean)
            assert float(mine[0]["layer_imbalance"]) == pytest.approx(moe["tokens"][layer].max() / mean)
            assert int(mine[0]["layer_dropped"]) == moe["dropped"][layer]
        # the worst layer's max/mean: the app's own number, in the file and its summary
        assert float(rows[0]["imbalance"]) == pytest.approx(moe["imbalance"], rel=1e-12)
        assert float(rows[0]["imbalance"]) == pytest.approx(moe["summary_imbalance"], rel=1e-12)
    # capacity 1.0 drops assignments; the dropless run drops none and routes every token once (k = 1)
    assert read_moe(results["ep2"])["dropped"].sum() > 0
    ep1 = read_moe(results["ep1"])
    assert ep1["dropped"].sum() == 0 and (ep1["tokens"].sum(axis=1) == 4 * 16).all()  # steps x tokens, G = 1


def test_moe_table_names_the_worst_layer(results, made):
    rows = {Path(r["file"]).stem: r for r in md_tables(made["md"])[MOE_HEADING]}
    assert set(rows) == {"ep2", "ep1", "deep", "no_moe"}
    for name in ("ep2", "ep1", "deep"):
        moe = read_moe(results[name])
        per_layer = moe["tokens"].max(axis=1) / moe["tokens"].mean(axis=1)
        match = re.fullmatch(r"(\d+\.\d\d)× \(layer (\d+)\)", rows[name]["imbalance"])
        assert match, rows[name]
        assert float(match.group(1)) == pytest.approx(moe["imbalance"], abs=0.005)
        assert int(match.group(2)) == int(np.argmax(per_layer))
        assert rows[name]["steps"] == "4"
        assert number(rows[name]["dropped"]) == pytest.approx(100 * moe["dropped_fraction"], abs=0.05)
        assert float(rows[name]["aux loss (mean)"]) == pytest.approx(moe["aux_loss"].mean(), rel=1e-3, abs=1e-12)
    assert float(rows["ep1"]["aux loss (mean)"]) > 0 and float(rows["ep2"]["aux loss (mean)"]) == 0


def test_ep_runs_without_moe_do_not_break_the_report(results, made):
    # killed: listed apart, with its one finished step, and nowhere else
    rows = md_tables(made["md"])["4. Runs not complete"]
    assert [(Path(r["file"]).stem, r["status"], r["steps"], r["strategy"]) for r in rows] == \
        [("killed", "running", "1 of 4", "ep2 E4 k2 cf1")]
    assert "killed" not in made["md"].split("## 4. Runs not complete")[0]
    # complete without /moe: in the table without numbers, named below it, no plot
    row = next(r for r in md_tables(made["md"])[MOE_HEADING] if Path(r["file"]).stem == "no_moe")
    assert (row["steps"], row["imbalance"], row["dropped"]) == ("0", "–", "–")
    assert "No routing statistics (no `/moe/tokens_per_expert`, or an empty one) in: no_moe.h5." in made["md"]
    assert len(list((made["out"] / "plots").glob("moe_*.png"))) == 3

    # Each on its own: the report is written, with nothing to plot.
    for name, complete, other in (("killed", 0, 1), ("no_moe", 1, 0)):
        out = made["out"].parent / f"alone_{name}"
        done = report(results[name], "--out", out)
        assert done.returncode == 0, done.stderr
        assert f"report: {complete} complete and {other} other run(s)" in done.stdout
        md = (out / "report.md").read_text()
        assert f"### {MOE_HEADING}" in md
        assert not list((out / "plots").glob("moe_*"))
    assert "Needs complete parabench-ep runs." in (made["out"].parent / "alone_killed" / "report.md").read_text()


def test_only_finished_steps_count(results, tmp_path):
    """A file a run still writes (or a killed rank left) has rows past /steps finished: not counted."""
    path = tmp_path / "running.h5"
    shutil.copy(results["ep2"], path)
    with h5py.File(path, "r+") as f:
        f.attrs["status"] = "running"
        f["steps"].attrs["finished"] = np.int64(2)
        tokens, dropped = f["moe/tokens_per_expert"][()], f["moe/dropped"][()]
    moe = load(path)["moe"]
    assert moe["steps"] == 2
    assert (moe["tokens"] == tokens[:2].sum(axis=0)).all() and (moe["dropped"] == dropped[:2].sum(axis=0)).all()
    assert (moe["tokens"] != tokens.sum(axis=0)).any()
    expected = max(t.max() / t.mean() for t in tokens[:2].sum(axis=0))
    assert moe["imbalance"] == pytest.approx(expected)
    assert len(moe["aux_loss"]) == 2

    with h5py.File(path, "r+") as f:  # a /moe of the wrong shape is a bad file, named with the reason
        del f["moe/tokens_per_expert"]
        f["moe/tokens_per_expert"] = np.zeros((4, 8), dtype=np.int64)
    with pytest.raises(ResultError, match=r"/moe/tokens_per_expert is int64 of shape \(2, 8\), not integers"):
        load(path)
    done = report(path, "--out", tmp_path / "out")
    assert done.returncode == 1 and "/moe/tokens_per_expert is int64" in done.stderr
    assert math.isnan(load(results["dp"])["moe_imbalance"]) and load(results["dp"])["moe"] is None
