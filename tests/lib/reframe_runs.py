"""Runs parabench's ReFrame checks (jobs/reframe) through ReFrame itself, for tests/reframe (the local
scheduler) and tests/cluster (the test cluster's Slurm): ReFrame from scripts/setup.sh's
third_party/reframe, the checks' outputs and perflogs under a scratch prefix."""

import os
import re
import subprocess
from pathlib import Path

import h5py
import pytest

REPO = Path(__file__).resolve().parents[2]
REFRAME = REPO / "third_party" / "reframe" / "bin" / "reframe"
# Small enough for 2 cores, and valid for every app of the strategy sweep up to 4 ranks: pp4's layers, tp4 and
# cp4's heads, 8 chunks of the sequence for cp4 zigzag, 8 experts over ep4.
APP_ARGS = "--layers 4 --hidden 32 --heads 4 --seq 16 --vocab 64 --steps 3 --warmup 1"


def reframe_or_skip():
    if not REFRAME.is_file():
        pytest.skip(f"ReFrame is not installed ({REFRAME}): scripts/setup.sh installs it from PyPI")
    return REFRAME


def run_checks(prefix, cluster, env, *args, sweeps="strategy", app_args=APP_ARGS, references=None, timeout=600):
    """jobs/reframe/run -r with profile and configuration `cluster`: the finished process."""
    reframe_or_skip()
    env = {**env, "PB_CLUSTER": cluster, "PB_REFRAME_PREFIX": str(prefix), "PB_REFRAME_SWEEPS": sweeps,
           "PB_REFRAME_ARGS": app_args, "PATH": f"{REFRAME.parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
           "RFM_COLORIZE": "n"}
    if references is not None:
        env["PB_REFRAME_REFERENCES"] = str(references)
    return subprocess.run([str(REPO / "jobs" / "reframe" / "run"), "-r", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def summary(done):
    """(ran, failures) from ReFrame's closing line."""
    match = re.search(r"Ran (\d+)/\d+ test case\(s\) from \d+ check\(s\) \((\d+) failure", done.stdout)
    assert match, done.stdout[-3000:] + done.stderr[-3000:]
    return int(match.group(1)), int(match.group(2))


def text(value):
    return value.decode() if isinstance(value, bytes) else value


def outputs(prefix, system):
    """{point name: the kept result file's attributes and /system}, from each check's output folder."""
    found = {}
    for path in sorted(Path(prefix).glob(f"output/{system}/*/*/*/result.h5")):
        with h5py.File(path, "r") as f:
            tag = text(f["config"].attrs["tag"])
            name = "/".join(re.fullmatch(r"sweep=(\S+) point=(\S+)", tag).groups())
            found[name] = {"status": text(f.attrs["status"]), "nodes": int(f["system"].attrs["nodes"]),
                           "ranks": int(f["config"].attrs["world_size"]),
                           "hostnames": [text(h) for h in f["system/hostnames"][()]]}
    return found


def job_scripts(prefix, system):
    """The job script ReFrame wrote for each check (kept in its output folder)."""
    return [path.read_text() for path in sorted(Path(prefix).glob(f"output/{system}/*/*/*/rfm_job.sh"))]


def perflog(prefix, system):
    """The performance log's lines: [(check info, result, {variable: (value, unit)})]."""
    rows = []
    for path in Path(prefix).glob(f"perflogs/{system}/*/parabench_point.log"):
        for line in path.read_text().splitlines()[1:]:
            fields = line.split("|")
            values = {}
            for item in fields[3:]:
                m = re.match(r"(\w+)=(\S+) (\S+) \(ref", item)
                if m:
                    values[m.group(1)] = (float(m.group(2)), m.group(3))
            rows.append((fields[1], fields[2], values))
    return rows
