"""python3 -m analysis.report on parabench-cp result files that the app writes here: a contiguous and
a zigzag run of cp 2 on 2 ranks, a cp 2 run with dp 2 (4 ranks, allgather), and a small sequence
sweep (sequence 16 and 32 at cp 1 and 2, as `jobs/submit sequence` makes it), beside a dp run of
the sequence sweep's model (other apps in the same report have no cp degree); copies of a run killed
before its end (status running, no /summary, with and without /cp) and of a complete one whose /cp is
gone; the sweep's cp 1 point has no /cp at all. The report is run as a user runs it and judged by
report.md (tables parsed back) and the numbers behind each plot (plots/*.csv), against the result
files read here with h5py."""

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

from test_report import CATEGORIES, csv_rows, md_tables, number, png_size, report  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from analysis.results import ResultError, load, model_label, strategy_label  # noqa: E402

BIN_DIR = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench")))
# Load balance: 4 heads, so that its runs are not of the sequence sweep's model (2 heads).
BALANCE = ["--layers", "2", "--hidden", "32", "--heads", "4", "--seq", "64", "--vocab", "64"]
SWEEP = ["--layers", "2", "--hidden", "32", "--heads", "2", "--vocab", "64"]  # --seq per point
STEPS = ["--steps", "4", "--warmup", "1", "--quiet", "--cluster", "alpha"]

# name: (ranks, options)
RUNS = {
    "zigzag": (2, [*BALANCE, "--cp", "2", "--cp-layout", "zigzag"]),
    "contiguous": (2, [*BALANCE, "--cp", "2", "--cp-layout", "contiguous"]),
    "dp2": (4, [*BALANCE, "--cp", "2", "--cp-algo", "allgather"]),  # two cp groups of 2 ranks
    "s16-cp1": (1, [*SWEEP, "--seq", "16", "--cp", "1", "--tag", "sweep=sequence point=s16-cp1"]),
    "s32-cp2": (2, [*SWEEP, "--seq", "32", "--cp", "2", "--tag", "sweep=sequence point=s32-cp2"]),
    "dp": (2, [*SWEEP, "--seq", "32"]),
}
LOAD_HEADING = "Attention time per rank (context-parallel load balance)"
SEQUENCE_HEADING = "Memory against sequence length (context parallelism)"
PLOTS = {
    "zigzag": "cp_attention_alpha_cp2_ring_zigzag_L2_h32_a4_S64_V64_2ranks_b1_G1_fp32",
    "contiguous": "cp_attention_alpha_cp2_ring_contiguous_L2_h32_a4_S64_V64_2ranks_b1_G1_fp32",
    "dp2": "cp_attention_alpha_cp2_allgather_zigzag_L2_h32_a4_S64_V64_4ranks_b1_G2_fp32",
    "s32-cp2": "cp_attention_alpha_cp2_ring_zigzag_L2_h32_a2_S32_V64_2ranks_b1_G1_fp32",
}
SEQUENCE_PLOT = "memory_sequence_alpha_L2_h32_a2_V64_ring_zigzag_dp1_b1_fp32"


def read_cp(path):
    """What the load-balance plot shows of a run, read directly: per-rank sums after the warm-up step."""
    with h5py.File(path, "r") as f:
        times = f["cp/attention_time_s"][()]
        return {"times": times, "total": times[1:].sum(axis=0), "ratio": float(f["summary"].attrs["cp_attention_time_ratio"])}


def read_memory(path):
    with h5py.File(path, "r") as f:
        return ({c: int(f[f"memory/measured/{c}"][()].max()) for c in CATEGORIES},
                {c: int(f[f"memory/predicted/{c}"][()].max()) for c in CATEGORIES})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{name: path} of the runs above under results/, plus the 'killed', 'killed_no_cp' and 'no_cp' copies."""
    root = tmp_path_factory.mktemp("results")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PARABENCH_"))}
    files = {}
    for name, (ranks, options) in RUNS.items():
        path = root / f"{name}.h5"
        app = "dp" if name == "dp" else "cp"
        cmd = ["mpiexec", "-n", str(ranks), str(BIN_DIR / app / f"parabench-{app}"), *options, *STEPS, "--out", str(path)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
        files[name] = path
    # Killed after its second step (SIGKILL, a lost rank): status running, two finished steps, no
    # /summary; its /cp rows past the finished ones are not to be read.
    files["killed"] = root / "killed.h5"
    shutil.copy(files["contiguous"], files["killed"])
    with h5py.File(files["killed"], "r+") as f:
        f.attrs["status"] = "running"
        f["steps"].attrs["finished"] = np.int64(2)
        del f["summary"]
    files["killed_no_cp"] = root / "killed_no_cp.h5"
    shutil.copy(files["killed"], files["killed_no_cp"])
    with h5py.File(files["killed_no_cp"], "r+") as f:
        del f["cp"]
    files["no_cp"] = root / "no_cp.h5"  # complete, /cp lost: the report says so and goes on
    shutil.copy(files["zigzag"], files["no_cp"])
    with h5py.File(files["no_cp"], "r+") as f:
        del f["cp"]
    return files


@pytest.fixture(scope="module")
def made(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    done = report(results["zigzag"].parent, "--out", out)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"report: 7 complete and 2 other run\(s\) from 1 cluster\(s\); wrote .* and \d+ plot\(s\) "
                        r"in .*\n", done.stdout), done.stdout
    return {"out": out, "md": (out / "report.md").read_text()}


def section(md, heading):
    return md.split(f"### {heading}\n")[1].split("\n#")[0]


def test_strategy_and_model_labels_of_cp():
    config = {"app": "cp", "cp": 4, "cp_algo": "ring", "cp_layout": "zigzag", "layers": 4, "hidden": 256,
              "heads": 8, "seq": 4096, "vocab": 4096}
    assert strategy_label(config) == "cp4 ring zigzag"
    assert strategy_label({**config, "cp_algo": "alltoall", "cp_layout": "contiguous", "recompute": "selective"}) == \
        "cp4 alltoall contiguous recompute=selective"
    # a sequence sweep of the small preset: the model is small's but at another sequence length
    assert model_label(config) == "L4 h256 a8 S4096 V4096" and model_label(config, seq=False) == "small"
    assert model_label({**config, "hidden": 128}, seq=False) == "L4 h128 a8 V4096"


def test_summary_table_shows_cp_with_its_balance(results, made):
    rows = {Path(r["file"]).stem: r for r in md_tables(made["md"])["alpha: cp"]}
    assert set(rows) == {"zigzag", "contiguous", "dp2", "s16-cp1", "s32-cp2", "no_cp"}
    assert rows["zigzag"]["strategy"] == "cp2 ring zigzag" and rows["zigzag"]["model"] == "L2 h32 a4 S64 V64"
    assert rows["contiguous"]["strategy"] == "cp2 ring contiguous"
    assert rows["dp2"]["strategy"] == "cp2 allgather zigzag" and rows["dp2"]["ranks"] == "4"
    assert rows["s16-cp1"]["strategy"] == "cp1 ring zigzag" and rows["s16-cp1"]["model"] == "L2 h32 a2 S16 V64"
    for name in ("zigzag", "contiguous", "dp2", "s32-cp2"):
        ratio = read_cp(results[name])["ratio"]
        assert ratio >= 1
        assert number(rows[name]["attention slowest/fastest rank"]) == pytest.approx(ratio, abs=0.005)
    assert rows["s16-cp1"]["attention slowest/fastest rank"] == "–"  # cp 1: no ratio in /summary
    assert "attention slowest/fastest rank" not in md_tables(made["md"])["alpha: dp"][0]  # cp's own column


def test_attention_time_plot_of_each_cp_run(results, made):
    plots = made["out"] / "plots"
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", section(made["md"], LOAD_HEADING))
    assert sorted(linked) == sorted(f"plots/{n}.png" for n in PLOTS.values())
    import matplotlib.image
    for run, name in PLOTS.items():
        width, height = png_size(plots / f"{name}.png")
        assert width >= 600 and height >= 300
        pixels = matplotlib.image.imread(plots / f"{name}.png")
        assert pixels[..., :3].std() > 0.05, f"{name}.png is (nearly) blank"
        cp = read_cp(results[run])
        rows = csv_rows(plots / f"{name}.csv")
        ranks = cp["times"].shape[1]
        assert [int(r["rank"]) for r in rows] == list(range(ranks))
        assert {(int(r["steps"]), int(r["warmup_skipped"])) for r in rows} == {(3, 1)}  # 4 steps, 1 warm-up
        totals = np.array([float(r["attention_s_total"]) for r in rows])
        assert totals == pytest.approx(cp["total"], rel=1e-12)  # the steps after warm-up, summed
        assert not np.allclose(totals, cp["times"].sum(axis=0), rtol=1e-9)  # not the warm-up step too
        assert [float(r["attention_s_per_step"]) for r in rows] == pytest.approx(cp["total"] / 3, rel=1e-12)
        assert [float(r["attention_s_step_max"]) for r in rows] == pytest.approx(cp["times"][1:].max(axis=0))
        # slowest over fastest: the app's own number
        assert [float(r["ratio"]) for r in rows] == pytest.approx([cp["ratio"]] * ranks, rel=1e-9)
        assert float(rows[0]["ratio"]) == pytest.approx(cp["total"].max() / cp["total"].min(), rel=1e-12)
        assert [(int(r["cp_group"]), int(r["cp_rank"])) for r in rows] == [(i // 2, i % 2) for i in range(ranks)]


def test_load_balance_table_names_slowest_and_fastest_rank(results, made):
    rows = {Path(r["file"]).stem: r for r in md_tables(made["md"])[LOAD_HEADING]}
    assert set(rows) == {"zigzag", "contiguous", "dp2", "s16-cp1", "s32-cp2", "no_cp"}
    for name in PLOTS:
        cp = read_cp(results[name])
        assert rows[name]["steps"] == "3"
        slowest = re.fullmatch(r"(\d+) \((\S+)\)", rows[name]["slowest rank (ms)"])
        fastest = re.fullmatch(r"(\d+) \((\S+)\)", rows[name]["fastest rank (ms)"])
        assert int(slowest.group(1)) == int(np.argmax(cp["total"]))
        assert int(fastest.group(1)) == int(np.argmin(cp["total"]))
        assert float(slowest.group(2)) == pytest.approx(cp["total"].max() / 3 * 1e3, rel=1e-3)
        assert number(rows[name]["slowest ÷ fastest"]) == pytest.approx(cp["ratio"], abs=0.005)
        assert number(rows[name]["attention ms/step (mean)"]) == pytest.approx(cp["total"].mean() / 3 * 1e3, rel=1e-3)
    # without /cp: in the table without numbers, named below it, no plot
    for name in ("s16-cp1", "no_cp"):
        assert (rows[name]["steps"], rows[name]["slowest ÷ fastest"]) == ("0", "–")
    text = section(made["md"], LOAD_HEADING)
    assert re.search(r"^cp 1 \(one rank per sequence, no exchange, no `/cp/attention_time_s`\): s16-cp1\.h5\.$",
                     text, re.M)
    assert "No attention times (no `/cp/attention_time_s`, or no finished step in it) in: no_cp.h5." in text


def test_memory_against_sequence_length(results, made):
    """The sequence sweep's two points: one plot of peak and activations per rank against the sequence,
    and a table; the load-balance runs (one sequence length each) make none."""
    plots = made["out"] / "plots"
    text = section(made["md"], SEQUENCE_HEADING)
    assert re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", text) == [f"plots/{SEQUENCE_PLOT}.png"]
    assert len(list(plots.glob("memory_sequence_*.png"))) == 1
    width, height = png_size(plots / f"{SEQUENCE_PLOT}.png")
    assert width >= 1000 and height >= 400
    import matplotlib.image
    assert matplotlib.image.imread(plots / f"{SEQUENCE_PLOT}.png")[..., :3].std() > 0.05

    rows = csv_rows(plots / f"{SEQUENCE_PLOT}.csv")
    points = [("s16-cp1", 16, 1), ("s32-cp2", 32, 2)]
    assert [(int(r["seq"]), int(r["cp"]), r["category"]) for r in rows] == \
        [(seq, cp, c) for _, seq, cp in points for c in CATEGORIES]
    for name, seq, cp in points:
        measured, predicted = read_memory(results[name])
        mine = {r["category"]: r for r in rows if int(r["seq"]) == seq}
        assert {c: int(mine[c]["measured_bytes"]) for c in CATEGORIES} == measured
        assert {c: int(mine[c]["predicted_bytes"]) for c in CATEGORIES} == predicted
        assert {int(r["ranks"]) for r in mine.values()} == {cp}

    table = {int(r["sequence"]): r for r in md_tables(made["md"])[SEQUENCE_HEADING]}
    assert sorted(table) == [16, 32]
    for name, seq, cp in points:
        measured, predicted = read_memory(results[name])
        row = table[seq]
        assert (row["cp"], row["ranks"], row["tokens per rank (S ÷ cp)"], row["strategy"], row["model"]) == \
            (str(cp), str(cp), "16", "cp ring zigzag", "L2 h32 a2 V64")
        assert number(row["peak MiB measured"]) == pytest.approx(measured["peak_total"] / 2**20, abs=0.005)
        assert number(row["activations MiB predicted"]) == pytest.approx(predicted["activations"] / 2**20, abs=0.005)
        assert row["file"] == f"{name}.h5"
    first, last = (read_memory(results[n])[0] for n in ("s16-cp1", "s32-cp2"))
    summary = re.search(r"the sequence grows 16 → 32 \(2\.00×\) with cp 1 → 2; peak per rank \S+ → \S+ MiB "
                        r"\((\S+)×\), activations \S+ → \S+ MiB \((\S+)×\)", text)
    assert summary, text
    assert float(summary.group(1)) == pytest.approx(last["peak_total"] / first["peak_total"], abs=0.005)
    assert float(summary.group(2)) == pytest.approx(last["activations"] / first["activations"], abs=0.005)


def test_cp_runs_without_cp_do_not_break_the_report(results, made):
    rows = md_tables(made["md"])["4. Runs not complete"]
    assert sorted((Path(r["file"]).stem, r["status"], r["steps"], r["strategy"]) for r in rows) == \
        [("killed", "running", "2 of 4", "cp2 ring contiguous"), ("killed_no_cp", "running", "2 of 4",
                                                                  "cp2 ring contiguous")]
    assert "killed" not in made["md"].split("## 4. Runs not complete")[0]

    # Each on its own: the report is written, with nothing to plot.
    for name, complete, other in (("killed", 0, 1), ("killed_no_cp", 0, 1), ("s16-cp1", 1, 0), ("no_cp", 1, 0)):
        out = made["out"].parent / f"alone_{name}"
        done = report(results[name], "--out", out)
        assert done.returncode == 0, done.stderr
        assert f"report: {complete} complete and {other} other run(s)" in done.stdout
        md = (out / "report.md").read_text()
        assert f"### {LOAD_HEADING}" in md and f"### {SEQUENCE_HEADING}" in md
        assert not list((out / "plots").glob("cp_*")) and not list((out / "plots").glob("memory_sequence_*"))
    assert "Needs complete parabench-cp runs." in (made["out"].parent / "alone_killed" / "report.md").read_text()
    assert "Needs complete parabench-cp runs of one model at two sequence lengths or more" in \
        (made["out"].parent / "alone_s16-cp1" / "report.md").read_text()


def test_only_finished_steps_after_warm_up_count(results, tmp_path):
    """A file a run still writes (or a killed rank left) has rows past /steps finished: not counted; the
    warm-up step is left out where a later one finished, else it is all there is."""
    cp = load(results["killed"])["cp_attention"]
    times = read_cp(results["contiguous"])["times"]
    assert (cp["steps"], cp["skipped"]) == (1, 1)  # 2 finished, 1 of them warm-up
    assert cp["total"] == pytest.approx(times[1])
    assert cp["ratio"] == pytest.approx(times[1].max() / times[1].min())

    path = tmp_path / "warm.h5"
    shutil.copy(results["killed"], path)
    with h5py.File(path, "r+") as f:
        f["steps"].attrs["finished"] = np.int64(1)  # killed during warm-up: its one step
    cp = load(path)["cp_attention"]
    assert (cp["steps"], cp["skipped"]) == (1, 0) and cp["total"] == pytest.approx(times[0])
    with h5py.File(path, "r+") as f:
        f["steps"].attrs["finished"] = np.int64(0)  # killed before step 1: nothing to show, no error
    cp = load(path)["cp_attention"]
    assert cp["steps"] == 0 and math.isnan(cp["ratio"])
    assert load(results["no_cp"])["cp_attention"] is None and load(results["s16-cp1"])["cp_attention"] is None
    assert load(results["s16-cp1"])["cp"] == 1 and math.isnan(load(results["s16-cp1"])["cp_attention_time_ratio"])

    with h5py.File(path, "r+") as f:  # a /cp of the wrong shape is a bad file, named with the reason
        f["steps"].attrs["finished"] = np.int64(2)
        del f["cp/attention_time_s"]
        f["cp/attention_time_s"] = np.zeros((4, 3))
    with pytest.raises(ResultError, match=r"/cp/attention_time_s is float64 of shape \(2, 3\), not floats "
                                          r"\[steps, 2 ranks\]"):
        load(path)
    done = report(path, "--out", tmp_path / "out")
    assert done.returncode == 1 and "/cp/attention_time_s is float64" in done.stderr
