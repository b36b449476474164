"""python3 -m analysis.report on hostile input (issue 11, item 9): cluster names, tags, app options,
error messages and file names holding Markdown, HTML, table pipes and newlines, and --out paths that
cannot be written. The report must show such text as written, on one line, without it ending a table
row or starting a heading, a list, a link or a tag (report.md and report.html), and an --out it
cannot use must end it with exit code 1 and one line naming the path and the reason, no traceback,
and nothing half-written.

Self-contained: the result files are made here with h5py (the attributes analysis/results.py reads,
docs/SPEC.md section 6), so no app needs to be built. Run from the repository root:
    /usr/bin/python3 -m pytest -q tests/faults/test_report_hostile.py
The read-only-mount cases need root (mount -t tmpfs -o ro); they are skipped, with the reason, where
mount is not allowed."""

import csv
import html
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = ["parameters", "master_parameters", "gradients", "optimizer_states", "activations", "comm_buffers",
              "workspace"]
TINY = {"layers": 2, "hidden": 64, "heads": 4, "seq": 32, "vocab": 256}  # the model label "tiny"

# Cluster names: Markdown (bold, a link, a code span, emphasis), HTML (a script and an img tag), a
# table pipe and a newline before a would-be heading; A starts like a list item, B like a numbered
# one, so that a paragraph starting with the name would start a list.
EVIL_A = "- evil|<script>alert(1)</script> **bold** [link](http://x.invalid) `tick` _em_\n# injected A"
EVIL_B = "1. two\r\n## injected B <img src=x onerror=alert(2)> ~~struck~~ &amp; \"q\", c"
EVIL_TAG = "sweep=x | <script>alert(3)</script>\n# injected tag"
EVIL_ERROR = "boom | <script>alert(4)</script> **loud**\n# injected error\tat step 2"
EVIL_FILE = "run|<script>alert(5)<\\script> **f** [l](u) `t`\n# injected file"
BASELINE = min(EVIL_A, EVIL_B)  # the report's default baseline: the first cluster by name
INJECTED = ("injected A", "injected B", "injected tag", "injected error", "injected file")


def write_result(path, cluster, app="dp", ranks=2, micro_batch=1, global_batch=None, shard=None, status="complete",
                 error="", tag="", tokens_per_s=1000.0, steps=3):
    """A parabench result file (schema version 1) with what the report reads; memory and speed made up
    but plausible (sharding divides the model states)."""
    global_batch = global_batch or ranks * micro_batch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update({"schema": "parabench", "schema_version": np.int64(1), "status": status,
                        "created": "2026-11-26T00:00:00Z"})
        if error:
            f.attrs["error"] = error
        config = {"app": app, "world_size": np.int64(ranks), "micro_batch": np.int64(micro_batch),
                  "global_batch": np.int64(global_batch), "dtype": "fp32", "cluster": cluster, "tag": tag,
                  "backend": "cpu", "steps": np.int64(steps), "warmup": np.int64(1),
                  **{k: np.int64(v) for k, v in TINY.items()}}
        if shard:
            config["shard"] = shard
        f.create_group("config").attrs.update(config)
        f.create_group("system").attrs.update({"cluster": cluster, "nodes": np.int64(1), "cpu_model": "fake cpu"})
        f.create_dataset("steps/loss", data=np.full((steps if status == "complete" else 1, ranks), 5.0))
        if status == "complete":
            f.create_group("summary").attrs.update({
                "step_time_s": 500.0 / tokens_per_s, "step_time_s_min": 400.0 / tokens_per_s,
                "step_time_s_max": 700.0 / tokens_per_s,
                "tokens_per_s": tokens_per_s, "tflops_per_rank": 0.01, "mfu": float("nan"), "final_loss": 5.0})
        divide = {"NO_SHARD": 1, "FULL_SHARD": ranks}.get(shard, 1)
        for kind in ("measured", "predicted"):
            total = 0
            for i, c in enumerate(CATEGORIES):
                value = (i + 1) * 2**20 * (micro_batch if c == "activations" else 1) // (
                    divide if c in ("parameters", "gradients", "optimizer_states") else 1)
                f.create_dataset(f"memory/{kind}/{c}", data=np.full(ranks, value, dtype=np.int64))
                total += value
            f.create_dataset(f"memory/{kind}/peak_total", data=np.full(ranks, total, dtype=np.int64))
    return path


def write_cluster(folder, cluster, tag="", name=lambda n: n):
    """The runs of one cluster: dp on 1 and 2 ranks (a scaling series), fsdp NO_SHARD and FULL_SHARD
    (memory and step time per strategy), FULL_SHARD at micro-batch 2 (memory against micro-batch)."""
    runs = {"dp_1": dict(app="dp", ranks=1), "dp_2": dict(app="dp", ranks=2, tokens_per_s=1500.0),
            "fsdp_NO_SHARD": dict(app="fsdp", shard="NO_SHARD"),
            "fsdp_FULL_SHARD": dict(app="fsdp", shard="FULL_SHARD"),
            "fsdp_FULL_SHARD_b2": dict(app="fsdp", shard="FULL_SHARD", micro_batch=2)}
    return [write_result(Path(folder) / f"{name(n)}.h5", cluster, tag=tag, **options) for n, options in runs.items()]


def report(*args):
    return subprocess.run([sys.executable, "-m", "analysis.report", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=180)


def one_line(text):
    """The documented rule (docs/report.md): control characters shown as escapes."""
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def cells(line):
    """The cells of a GFM table row: split at | not escaped by a backslash."""
    assert line.startswith("|") and line.endswith("|"), line
    out, cell, i = [], "", 1
    while i < len(line) - 1:
        if line[i] == "\\":
            cell += line[i:i + 2]
            i += 2
            continue
        if line[i] == "|":
            out.append(cell.strip())
            cell = ""
        else:
            cell += line[i]
        i += 1
    out.append(cell.strip())
    return out


def unescape(cell):
    """Markdown text as it shows: backslash escapes of ASCII punctuation and entities, in one pass."""
    return re.sub(r"\\([!-/:-@\[-`{-~])|&(amp|lt|gt|quot);",
                  lambda m: m.group(1) if m.group(1) is not None else html.unescape(m.group()), cell)


def md_tables(md):
    """[(heading above, header cells, [row cells])] of report.md, checking that every line of a table
    is a row: a table ends only at a blank line."""
    tables, heading, lines, i = [], None, md.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("#"):
            heading = lines[i]
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|-"):
            head, rows = cells(lines[i]), []
            i += 2
            while i < len(lines) and lines[i]:
                assert lines[i].startswith("| ") and lines[i].endswith(" |"), f"not a table row: {lines[i]!r}"
                rows.append(cells(lines[i]))
                i += 1
            tables.append((heading, head, rows))
            continue
        i += 1
    return tables


def assert_no_injection(md, page):
    """No raw tag in either output, and no line of report.md that user text started."""
    for text in (md, page):
        assert "<script" not in text.lower() and "<img src=x" not in text.lower()
    for line in md.splitlines():
        assert not any(line.lstrip("#- 1.").startswith(word) for word in INJECTED), f"injected line: {line!r}"
        if line.startswith("#"):  # only the report's headings; user text in them escaped
            assert re.match(r"#{1,3} \S", line) and not re.search(r"(?<!\\)[*`\[\]<>|]", line), line
        assert not re.match(r"\s*([-+*]|\d+[.)])\s", line), f"a list item: {line!r}"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The report of two hostile clusters (one's runs also under hostile file names) and a failed run
    with a hostile error: {"out", "md", "html", "root"}."""
    root = tmp_path_factory.mktemp("hostile")
    write_cluster(root / "a", EVIL_A, tag=EVIL_TAG)
    write_cluster(root / EVIL_FILE.replace("/", "_"), EVIL_B, name=lambda n: f"{EVIL_FILE}_{n}")
    write_result(root / "a" / "failed.h5", EVIL_A, app="fsdp", shard="FULL_SHARD", status="failed",
                 error=EVIL_ERROR)
    out = tmp_path_factory.mktemp("report") / "out"
    done = report(root, "--out", out)
    assert done.returncode == 0, done.stderr
    return {"out": out, "root": root, "md": (out / "report.md").read_text(), "html": (out / "report.html").read_text()}


def test_markdown_tables_keep_their_columns_with_hostile_text(hostile):
    tables = md_tables(hostile["md"])
    assert len(tables) >= 5  # clusters, two summaries of each cluster, across clusters, scaling, not complete
    assert len([line for line in hostile["md"].splitlines() if line.startswith("|---")]) == len(tables)
    for heading, head, rows in tables:
        for row in rows:
            assert len(row) == len(head), (heading, head, row)
    clusters = next(rows for _, head, rows in tables if head[0] == "cluster" and "complete runs" in head)
    assert sorted(unescape(row[0]) for row in clusters) == sorted(one_line(c) for c in (EVIL_A, EVIL_B))
    across = next((head, rows) for heading, head, rows in tables if "Across clusters" in heading)
    assert {unescape(h) for h in across[0]} >= {f"{one_line(EVIL_A)} tokens/s", f"{one_line(EVIL_B)} peak MiB"}


def test_markdown_shows_hostile_text_as_written_and_injects_nothing(hostile):
    """Cluster names everywhere they appear; the tag (EVIL_TAG) is not shown by the report, and
    assert_no_injection checks that it injects nothing either."""
    md, page = hostile["md"], hostile["html"]
    assert_no_injection(md, page)
    assert r"\*\*bold\*\*" in md and r"\`tick\`" in md and r"\_em\_" in md
    assert r"\[link\](http\://x.invalid)" in md  # not a link, nor a GitHub autolink
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md and r"\~\~struck\~\~" in md
    # the headings of the summary: "### <cluster>: <app>", the cluster escaped and on one line
    headings = [unescape(line[4:]) for line in md.splitlines() if line.startswith("### ") and ": " in line]
    assert f"{one_line(EVIL_A)}: dp" in headings and f"{one_line(EVIL_B)}: fsdp" in headings
    # the baseline in bold in the across-clusters paragraph, the ** of its name escaped
    assert f"**{md_escaped(BASELINE)}**" in md
    # a paragraph that starts with the cluster name (memory against micro-batch) does not start a list
    assert any(line.startswith(r"\- evil") for line in md.splitlines())


def md_escaped(text):
    """The rule in docs/report.md, written out again."""
    text = one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"[\\`*\[\]|#~$]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|:(?=//)|(?i:(?<=\bwww)\.)",
                  lambda m: "\\" + m.group(), text)


def test_html_shows_hostile_text_as_written(hostile):
    page = hostile["html"]
    assert "<script" not in page and "<img src=x" not in page
    cells_html = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", page, flags=re.S)]
    assert one_line(EVIL_A) in cells_html and one_line(EVIL_B) in cells_html
    assert not any("\n" in c or "\r" in c for c in cells_html)
    headings = [html.unescape(h) for h in re.findall(r"<h3>(.*?)</h3>", page, flags=re.S)]
    assert f"{one_line(EVIL_A)}: dp" in headings
    assert f"<strong>{html.escape(one_line(BASELINE))}</strong>" in page  # the baseline, bold, escaped


def test_file_names_and_error_texts_are_escaped(hostile, tmp_path):
    md = hostile["md"]
    tables = md_tables(md)
    files = [unescape(row[-1]) for heading, head, rows in tables if head[-1] == "file" for row in rows]
    assert f"{one_line(EVIL_FILE)}_dp_1.h5" in {Path(f).name for f in files}
    failed = next(rows for heading, head, rows in tables if "Runs not complete" in heading)
    assert [unescape(row[6]) for row in failed] == [one_line(EVIL_ERROR)]

    # a file that cannot be read, with a hostile name: listed with --skip-bad, escaped
    bad = tmp_path / f"{EVIL_FILE}.h5"
    bad.write_bytes(b"not an HDF5 file" * 64)
    good = next((hostile["root"] / "a").glob("dp_1.h5"))
    done = report(good, bad, "--out", tmp_path / "out", "--skip-bad")
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    assert_no_injection(md, page)
    left_out = next(rows for heading, head, rows in md_tables(md) if "Files left out" in heading)
    assert [unescape(row[0]) for row in left_out] == [one_line(str(bad))]
    # the command line in the header names the inputs, escaped too
    assert md_escaped(str(bad)) in md.replace("'", "")


def test_csv_files_quote_hostile_text(hostile):
    """A guard: the .csv beside the report are written through the csv module (pandas), quoted."""
    with open(hostile["out"] / "cross_cluster.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["cluster"] for r in rows} == {EVIL_A, EVIL_B}
    with open(hostile["out"] / "plots" / "scaling.csv", newline="") as f:
        assert {r["cluster"] for r in csv.DictReader(f)} == {EVIL_A, EVIL_B}


def test_dollar_signs_in_names_do_not_break_the_plots(tmp_path):
    write_cluster(tmp_path / "r", "cost $^$ cluster")  # matplotlib reads $...$ as mathtext: this one fails
    done = report(tmp_path / "r", "--out", tmp_path / "out")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    assert r"cost \$^\$ cluster" in md
    assert len(list((tmp_path / "out" / "plots").glob("*.png"))) >= 3


def linked_plots(out):
    md = (out / "report.md").read_text()
    linked = re.findall(r"\]\((plots/[^)]+\.png)\)", md)
    for p in linked:
        assert (out / p).is_file() and (out / p).with_suffix(".csv").is_file()
    return linked


def test_names_that_slug_alike_get_plots_of_their_own(tmp_path):
    write_cluster(tmp_path / "r" / "1", "x|y")
    write_cluster(tmp_path / "r" / "2", "x<y")  # both x_y in a file name
    done = report(tmp_path / "r", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    strategy = [p for p in linked_plots(tmp_path / "out") if "memory_strategy" in p]
    assert len(strategy) == 2 and len(set(strategy)) == 2, strategy
    assert len(list((tmp_path / "out" / "plots").glob("memory_strategy*.png"))) == 2


def test_a_very_long_name_gets_a_short_file_name(tmp_path):
    write_cluster(tmp_path / "r", "z" * 300)  # a file name has 255 bytes at most
    done = report(tmp_path / "r", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    linked = linked_plots(tmp_path / "out")
    assert len(linked) >= 3 and all(len(Path(p).name) <= 200 for p in linked)


# ---- --out that cannot be used ------------------------------------------------------------------------

def assert_clean_failure(done, out, reason):
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"report: error: --out {out}: ") and reason in lines[0], lines[0]
    assert done.stdout == ""


def snapshot(folder):
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else None) for p in sorted(Path(folder).rglob("*"))}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    write_cluster(root / "alpha", "alpha")
    write_cluster(root / "beta", "beta")
    return root


def test_out_an_existing_file(results, tmp_path):
    out = tmp_path / "report.txt"
    out.write_text("keep me\n")
    done = report(results, "--out", out)
    assert_clean_failure(done, out, "File exists and is not a directory")
    assert out.read_text() == "keep me\n" and sorted(tmp_path.iterdir()) == [out]


def test_out_under_a_regular_file(results, tmp_path):
    """Not a directory for any user, root too."""
    parent = tmp_path / "file"
    parent.write_text("keep me\n")
    out = parent / "sub" / "report"
    done = report(results, "--out", out)
    assert_clean_failure(done, out, f"Not a directory ({parent} is not a directory)")
    assert parent.read_text() == "keep me\n" and sorted(tmp_path.iterdir()) == [parent]


def test_out_in_a_folder_without_write_permission(results, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes regardless of permissions; the read-only mount tests cover this as root")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        done = report(results, "--out", locked / "report")
        assert_clean_failure(done, locked / "report", "Permission denied")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs mounted read-write at tmp_path/mnt, unmounted at the end whatever happens; yields
    (folder, remount) where remount(ro) switches it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    folder = tmp_path / "mnt"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "rw,size=4m", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    def remount(read_only):
        subprocess.run(["mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(folder)], check=True)

    try:
        yield folder, remount
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_out_on_a_read_only_file_system(results, tmpfs):
    folder, remount = tmpfs
    remount(True)
    for out in (folder / "report", folder / "a" / "b", folder):
        done = report(results, "--out", out)
        assert_clean_failure(done, out, "Read-only file system")
    remount(False)
    assert list(folder.iterdir()) == []


def test_an_earlier_report_on_a_read_only_file_system_stays_as_it_was(results, tmpfs):
    folder, remount = tmpfs
    out = folder / "report"
    assert report(results, "--out", out).returncode == 0
    before = snapshot(out)
    remount(True)
    done = report(results / "alpha", "--out", out)
    assert_clean_failure(done, out, "Read-only file system")
    assert snapshot(out) == before


def test_an_earlier_report_is_replaced(results, tmp_path):
    out = tmp_path / "out"
    assert report(results, "--out", out).returncode == 0  # two clusters: cross_cluster.csv, beta's plots
    assert (out / "cross_cluster.csv").is_file()
    (out / "notes.txt").write_text("mine\n")
    done = report(results / "alpha", "--out", out)  # one cluster
    assert done.returncode == 0, done.stderr
    assert not (out / "cross_cluster.csv").exists()  # the earlier report's, gone with it
    md = (out / "report.md").read_text()
    linked = sorted(re.findall(r"\((plots/[^)]+\.png)\)", md))
    assert linked == sorted(f"plots/{p.name}" for p in (out / "plots").glob("*.png"))
    assert not any("beta" in p.name for p in (out / "plots").iterdir())
    assert (out / "notes.txt").read_text() == "mine\n"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "plots", "report.html", "report.md"]


def test_a_failure_while_writing_leaves_an_earlier_report_as_it_was(results, tmp_path):
    """plots/ a regular file: the report cannot be put there; what is there stays, no staging left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("earlier\n")
    (out / "plots").write_text("not a folder\n")
    before = snapshot(out)
    done = report(results, "--out", out)
    assert_clean_failure(done, out, f"File exists ({out / 'plots'})")
    assert snapshot(out) == before


def test_no_folder_is_left_when_the_results_are_bad(tmp_path):
    """The folders --out made are removed again when the report stops (bad input, exit 1)."""
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\0" * 100)
    done = report(bad, "--out", tmp_path / "new" / "deeper" / "out")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]
