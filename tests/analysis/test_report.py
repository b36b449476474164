"""python3 -m analysis.report on result files that the apps write here: two clusters, alpha and
beta (the same machine under two --cluster names), with runs at equal configurations on both and
some on one only; copies of a run marked as killed (running, no /summary) and failed; and bad files
(truncated, random bytes, schema version 2, another schema). The report is run as a user runs it
and judged by its exit code, its messages, report.md (tables parsed back), report.html and the
numbers behind each plot (plots/*.csv), against the result files read here with h5py."""

import csv
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

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench")))
MODEL = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--vocab", "64", "--steps", "3",
         "--warmup", "1", "--quiet"]
CATEGORIES = ["parameters", "master_parameters", "gradients", "optimizer_states", "activations", "comm_buffers",
              "workspace", "peak_total"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# name: (cluster, app, ranks, app options). Both clusters: fsdp NO_SHARD and FULL_SHARD (memory and
# step time per strategy), dp on 1 and 2 ranks (weak scaling). alpha only: fsdp at micro-batch 2
# (memory against micro-batch) and dp on 1 rank at global batch 2 (strong scaling with dp on 2 ranks).
RUNS = {
    f"{cluster}_{name}": (cluster, app, ranks, options)
    for cluster in ("alpha", "beta")
    for name, (app, ranks, options) in {
        "fsdp_NO_SHARD": ("fsdp", 2, ["--shard", "NO_SHARD"]),
        "fsdp_FULL_SHARD": ("fsdp", 2, ["--shard", "FULL_SHARD"]),
        "dp_1": ("dp", 1, []),
        "dp_2": ("dp", 2, []),
    }.items()
}
RUNS["alpha_fsdp_FULL_SHARD_b2"] = ("alpha", "fsdp", 2, ["--shard", "FULL_SHARD", "--micro-batch", "2"])
RUNS["alpha_dp_1_G2"] = ("alpha", "dp", 1, ["--global-batch", "2"])
BOTH_CLUSTERS = ["fsdp_NO_SHARD", "fsdp_FULL_SHARD", "dp_1", "dp_2"]


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def read(path):
    """What the report shows of a run, read directly."""
    with h5py.File(path, "r") as f:
        return {
            "status": text(f.attrs["status"]),
            "tokens_per_s": float(f["summary"].attrs["tokens_per_s"]) if "summary" in f else None,
            "step_time_s": float(f["summary"].attrs["step_time_s"]) if "summary" in f else None,
            "measured": {c: int(np.max(f[f"memory/measured/{c}"][()])) for c in CATEGORIES},
            "predicted": {c: int(np.max(f[f"memory/predicted/{c}"][()])) for c in CATEGORIES},
        }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{name: path} of the runs above, under results/<cluster>/, plus 'killed' and 'failed' copies."""
    root = tmp_path_factory.mktemp("results")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "PARABENCH_"))}
    files = {}
    for name, (cluster, app, ranks, options) in RUNS.items():
        path = root / cluster / f"{name}.h5"
        cmd = ["mpiexec", "-n", str(ranks), str(BIN_DIR / app / f"parabench-{app}"), *MODEL, *options,
               "--cluster", cluster, "--out", str(path)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"
        files[name] = path
    # A run killed after its first steps looks like this: status still "running", no /summary.
    files["killed"] = root / "beta" / "killed.h5"
    shutil.copy(files["beta_dp_2"], files["killed"])
    with h5py.File(files["killed"], "r+") as f:
        f.attrs["status"] = "running"
        del f["summary"]
    files["failed"] = root / "alpha" / "failed.h5"
    shutil.copy(files["alpha_fsdp_NO_SHARD"], files["failed"])
    with h5py.File(files["failed"], "r+") as f:
        f.attrs["status"] = "failed"
        f.attrs["error"] = "NaN loss at step 2"
    return files


@pytest.fixture(scope="module")
def bad_files(results, tmp_path_factory):
    """Files the report cannot use, each in a folder of its own, by kind."""
    root = tmp_path_factory.mktemp("bad")
    source = results["alpha_dp_2"].read_bytes()
    kinds = {"truncated": root / "truncated.h5", "damaged": root / "damaged.h5", "random": root / "random.h5",
             "v2": root / "v2.h5", "foreign": root / "foreign.h5"}
    kinds["truncated"].write_bytes(source[: len(source) // 2])  # a copy cut short
    damaged = bytearray(source)  # metadata overwritten: it opens, its groups do not
    damaged[len(source) // 10: len(source) // 10 + 4096] = b"\xff" * 4096
    kinds["damaged"].write_bytes(bytes(damaged))
    kinds["random"].write_bytes(np.random.default_rng(7).bytes(4096))
    shutil.copy(results["alpha_dp_2"], kinds["v2"])
    with h5py.File(kinds["v2"], "r+") as f:
        f.attrs["schema_version"] = np.int64(2)
    with h5py.File(kinds["foreign"], "w") as f:
        f.attrs["schema"] = "something-else"
    return kinds


def report(*args):
    return subprocess.run([sys.executable, "-m", "analysis.report", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def made(results, tmp_path_factory):
    """The report of every run (both clusters, the killed and failed copies): exit code, output, folder."""
    out = tmp_path_factory.mktemp("report")
    done = report(results["alpha_dp_2"].parent.parent, "--out", out)
    assert done.returncode == 0, done.stderr
    return {"run": done, "out": out, "md": (out / "report.md").read_text()}


def md_tables(md):
    """{heading: [row dicts]} of every table in report.md, under the nearest heading above it."""
    tables, heading, lines = {}, None, md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i].lstrip("#").strip()
        elif lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|-"):
            head = [c.strip() for c in lines[i].strip("|").split(" | ")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("| "):
                rows.append(dict(zip(head, (c.strip() for c in lines[i].strip("|").split(" | ")))))
                i += 1
            tables.setdefault(heading, []).extend(rows)
            continue
        i += 1
    return tables


def number(cell):
    return float(cell.replace(",", "").rstrip("×%"))


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_summary_per_cluster_and_app(results, made):
    assert re.fullmatch(r"report: 10 complete and 2 other run\(s\) from 2 cluster\(s\); wrote .*\n", made["run"].stdout)
    tables = md_tables(made["md"])
    for cluster in ("alpha", "beta"):
        for app in ("dp", "fsdp"):
            rows = tables[f"{cluster}: {app}"]
            expected = {n for n, (c, a, _, _) in RUNS.items() if c == cluster and a == app}
            assert {Path(r["file"]).stem for r in rows} == expected
            for row in rows:
                run = read(results[Path(row["file"]).stem])
                assert number(row["tokens/s"]) == pytest.approx(run["tokens_per_s"], rel=0.01, abs=0.5)
                assert number(row["step time s"]) == pytest.approx(run["step_time_s"], rel=1e-3)
                assert number(row["peak MiB measured"]) == pytest.approx(run["measured"]["peak_total"] / 2**20,
                                                                         abs=0.005)
                assert number(row["peak MiB predicted"]) == pytest.approx(run["predicted"]["peak_total"] / 2**20,
                                                                          abs=0.005)
                assert row["model"] == "L2 h32 a2 S16 V64" and row["dtype"] == "fp32"
    assert [r["strategy"] for r in tables["alpha: fsdp"]] == ["NO_SHARD", "FULL_SHARD", "FULL_SHARD"]


def test_runs_not_complete_are_listed_apart(results, made):
    rows = md_tables(made["md"])["4. Runs not complete"]
    assert {(Path(r["file"]).stem, r["status"]) for r in rows} == {("killed", "running"), ("failed", "failed")}
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["error"] == "NaN loss at step 2" and failed["strategy"] == "NO_SHARD"
    assert next(r for r in rows if r["status"] == "running")["steps"] == "3 of 3"
    # ... and used nowhere else: not in any other table, nor in the numbers behind a plot.
    body = made["md"].split("## 4. Runs not complete")[0]
    assert "killed.h5" not in body and "failed.h5" not in body
    for path in (made["out"] / "plots").glob("*.csv"):
        assert "killed" not in path.read_text() and "failed" not in path.read_text()


def test_cross_cluster_table_matches_equal_configurations(results, made):
    rows = csv_rows(made["out"] / "cross_cluster.csv")
    assert len(rows) == 2 * len(BOTH_CLUSTERS)  # alpha-only configurations are not compared
    by_config = {}
    for row in rows:
        by_config.setdefault((row["app"], row["strategy"], row["ranks"], row["global_batch"]), {})[row["cluster"]] = row
    assert set(by_config) == {("fsdp", "NO_SHARD", "2", "2"), ("fsdp", "FULL_SHARD", "2", "2"), ("dp", "dp", "1", "1"),
                              ("dp", "dp", "2", "2")}
    names = {("fsdp", "NO_SHARD", "2", "2"): "fsdp_NO_SHARD", ("fsdp", "FULL_SHARD", "2", "2"): "fsdp_FULL_SHARD",
             ("dp", "dp", "1", "1"): "dp_1", ("dp", "dp", "2", "2"): "dp_2"}
    for config, clusters in by_config.items():
        alpha, beta = (read(results[f"{c}_{names[config]}"]) for c in ("alpha", "beta"))
        assert float(clusters["beta"]["tokens_per_s_ratio"]) == pytest.approx(
            beta["tokens_per_s"] / alpha["tokens_per_s"], rel=1e-9)
        assert float(clusters["alpha"]["tokens_per_s_ratio"]) == 1.0  # the baseline: first by name
        assert float(clusters["beta"]["peak_ratio"]) == pytest.approx(
            beta["measured"]["peak_total"] / alpha["measured"]["peak_total"], rel=1e-9)
    table = md_tables(made["md"])["2. Across clusters at equal configurations"]
    assert len(table) == len(BOTH_CLUSTERS)
    for row in table:
        assert re.fullmatch(r"\d+\.\d\d×", row["beta / alpha tokens/s"]), row


def test_baseline_option(results, tmp_path):
    done = report(results["alpha_dp_2"].parent.parent, "--out", tmp_path, "--baseline", "beta")
    assert done.returncode == 0, done.stderr
    assert "alpha / beta tokens/s" in (tmp_path / "report.md").read_text()
    done = report(results["alpha_dp_2"].parent.parent, "--out", tmp_path / "x", "--baseline", "gamma")
    assert done.returncode == 1
    assert "--baseline gamma: no such cluster in the results (clusters: alpha, beta)" in done.stderr


def test_default_baseline_is_the_first_cluster_with_complete_runs(results, tmp_path):
    """A cluster that sorts first but ran nothing to completion (only a failed run, "aaa") is listed among
    the runs that did not complete, and is not the baseline: the ratios are to alpha, the first cluster with
    complete runs, and none of them is empty."""
    root = tmp_path / "results"
    shutil.copytree(results["alpha_dp_2"].parent.parent, root)
    failed = root / "aaa" / "failed.h5"
    failed.parent.mkdir()
    shutil.copy(results["failed"], failed)
    with h5py.File(failed, "r+") as f:
        f["system"].attrs["cluster"] = "aaa"
    done = report(root, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    rows = csv_rows(tmp_path / "out" / "cross_cluster.csv")
    assert {r["cluster"] for r in rows} == {"alpha", "beta"}
    assert all(r["tokens_per_s_ratio"] not in ("", "nan") for r in rows), rows
    assert {float(r["tokens_per_s_ratio"]) for r in rows if r["cluster"] == "alpha"} == {1.0}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "beta / alpha tokens/s" in md and "/ aaa" not in md


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_every_plot_is_a_png_with_its_numbers(made):
    plots = made["out"] / "plots"
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", made["md"])
    assert sorted(linked) == sorted(f"plots/{p.name}" for p in plots.glob("*.png"))
    names = {Path(p).stem for p in linked}
    assert names == {
        "memory_strategy_alpha_L2_h32_a2_S16_V64_2ranks_b1_G2_fp32",
        "memory_strategy_beta_L2_h32_a2_S16_V64_2ranks_b1_G2_fp32",
        "memory_micro_batch_alpha_fsdp_FULL_SHARD_L2_h32_a2_S16_V64_2ranks_fp32",
        "scaling",
        "step_time_L2_h32_a2_S16_V64_1ranks_b1_G1_fp32",  # dp on 1 rank on both clusters
        "step_time_L2_h32_a2_S16_V64_2ranks_b1_G2_fp32",  # dp, NO_SHARD and FULL_SHARD on both
    }  # not dp on 1 rank at global batch 2: one strategy on one cluster compares nothing
    import matplotlib.image
    for name in names:
        width, height = png_size(plots / f"{name}.png")
        assert width >= 600 and height >= 400
        pixels = matplotlib.image.imread(plots / f"{name}.png")
        assert pixels[..., :3].std() > 0.05, f"{name}.png is (nearly) blank"
        assert (plots / f"{name}.csv").is_file()


def test_memory_plots_show_the_files_numbers(results, made):
    plots = made["out"] / "plots"
    rows = csv_rows(plots / "memory_strategy_alpha_L2_h32_a2_S16_V64_2ranks_b1_G2_fp32.csv")
    assert [r["strategy"] for r in rows[::len(CATEGORIES)]] == ["dp", "NO_SHARD", "FULL_SHARD"]
    for strategy, name in (("dp", "alpha_dp_2"), ("NO_SHARD", "alpha_fsdp_NO_SHARD"),
                           ("FULL_SHARD", "alpha_fsdp_FULL_SHARD")):
        run = read(results[name])
        got = {r["category"]: r for r in rows if r["strategy"] == strategy}
        assert {c: int(got[c]["measured_bytes"]) for c in CATEGORIES} == run["measured"]
        assert {c: int(got[c]["predicted_bytes"]) for c in CATEGORIES} == run["predicted"]
    # FULL_SHARD shards the parameters: a guard that the plot is not of identical bars
    assert int(next(r for r in rows if r["strategy"] == "FULL_SHARD" and r["category"] == "parameters")
               ["measured_bytes"]) < int(next(r for r in rows if r["strategy"] == "NO_SHARD"
                                              and r["category"] == "parameters")["measured_bytes"])

    rows = csv_rows(plots / "memory_micro_batch_alpha_fsdp_FULL_SHARD_L2_h32_a2_S16_V64_2ranks_fp32.csv")
    activations = {r["micro_batch"]: int(r["measured_bytes"]) for r in rows if r["category"] == "activations"}
    assert activations == {"1": read(results["alpha_fsdp_FULL_SHARD"])["measured"]["activations"],
                           "2": read(results["alpha_fsdp_FULL_SHARD_b2"])["measured"]["activations"]}
    assert activations["2"] > activations["1"] > 0


def test_scaling_series_and_efficiency(results, made):
    rows = csv_rows(made["out"] / "plots" / "scaling.csv")
    series = {}
    for row in rows:
        series.setdefault((row["cluster"], row["kind"], row["series"]), []).append(row)
    # weak: 1 sample per rank on both clusters (dp_1, dp_2); strong: alpha at global batch 2 (dp_1_G2, dp_2)
    expected = {("alpha", "weak", "1 sample(s) per rank"): ["alpha_dp_1", "alpha_dp_2"],
                ("beta", "weak", "1 sample(s) per rank"): ["beta_dp_1", "beta_dp_2"],
                ("alpha", "strong", "global batch 2"): ["alpha_dp_1_G2", "alpha_dp_2"]}
    assert set(series) == set(expected)
    for key, names in expected.items():
        tps = [read(results[n])["tokens_per_s"] for n in names]
        got = series[key]
        assert [int(r["ranks"]) for r in got] == [1, 2]
        assert [float(r["tokens_per_s"]) for r in got] == pytest.approx(tps)
        assert float(got[0]["efficiency"]) == 1.0
        assert float(got[1]["efficiency"]) == pytest.approx(tps[1] / tps[0] / 2)


def test_step_time_plot_has_every_strategy_of_both_clusters(results, made):
    rows = csv_rows(made["out"] / "plots" / "step_time_L2_h32_a2_S16_V64_2ranks_b1_G2_fp32.csv")
    got = {(r["strategy"], r["cluster"]): float(r["step_time_s"]) for r in rows}
    names = {"dp": "dp_2", "NO_SHARD": "fsdp_NO_SHARD", "FULL_SHARD": "fsdp_FULL_SHARD"}
    assert got == {(s, c): pytest.approx(read(results[f"{c}_{n}"])["step_time_s"])
                   for s, n in names.items() for c in ("alpha", "beta")}


def test_html_has_the_tables_and_images(made):
    page = (made["out"] / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    separators = [line for line in made["md"].splitlines() if line.startswith("|---")]
    assert page.count("<table>") == len(separators) > 0
    for png in re.findall(r"\((plots/[^)]+\.png)\)", made["md"]):
        assert f'<img src="{png}"' in page


@pytest.mark.parametrize("kind, message", [
    ("truncated", "cannot open as HDF5 (Unable to open file (truncated file"),
    ("damaged", "cannot read"),
    ("random", "cannot open as HDF5"),
    ("v2", "schema_version 2 is not supported: this report reads schema version 1"),
    ("foreign", "not a parabench result (schema = 'something-else')"),
])
def test_a_bad_file_fails_the_report_unless_skipped(results, bad_files, kind, message, tmp_path):
    good = results["alpha_dp_2"].parent.parent
    done = report(good, bad_files[kind], "--out", tmp_path / "strict")
    assert done.returncode == 1
    assert f"report: error: {bad_files[kind]}: " in done.stderr and message in done.stderr, done.stderr
    if kind in ("truncated", "damaged", "random"):
        assert "truncated or corrupt" in done.stderr
    assert "1 of 13 file(s) cannot be used; nothing written" in done.stderr
    assert not (tmp_path / "strict").exists()

    done = report(results["alpha_dp_1"], bad_files[kind], "--out", tmp_path / "lenient", "--skip-bad")
    assert done.returncode == 0, done.stderr
    assert f"report: warning: left out {bad_files[kind]}: " in done.stderr
    assert "1 file(s) left out" in done.stdout
    rows = md_tables((tmp_path / "lenient" / "report.md").read_text())["5. Files left out"]
    assert [r["file"] for r in rows] == [str(bad_files[kind])] and message in rows[0]["reason"]


def test_one_cluster_has_no_cross_cluster_table(results, tmp_path):
    done = report(results["alpha_dp_1"], results["alpha_dp_2"], "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "report.md").read_text()
    assert "Needs complete runs from two clusters or more; these results have 1." in md
    assert not (tmp_path / "cross_cluster.csv").exists()


def test_no_results_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    done = report(tmp_path / "empty", "--out", tmp_path / "out")
    assert done.returncode == 1 and "no *.h5 files in this directory" in done.stderr
    done = report(tmp_path / "absent.h5", "--out", tmp_path / "out")
    assert done.returncode == 1 and "absent.h5: no such file or directory" in done.stderr
    assert not (tmp_path / "out").exists()
    done = report("--out", tmp_path / "out")
    assert done.returncode == 2 and "usage" in done.stderr
