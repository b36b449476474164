"""What parabench's ReFrame checks run, without ReFrame: the cluster profile, the points of the sweeps
(from jobs/submit --points, so the same points as jobs/submit's job arrays) and the references a site
filled in. jobs/reframe/parabench.py builds its checks from it; jobs/reframe/run runs it first, so that
a wrong sweep, profile or references file stops the run with its message instead of leaving ReFrame
with no check to run.

    python3 jobs/reframe/parabench_points.py     # the profile, points and references of the environment below

Environment (jobs/reframe/README.md): PB_CLUSTER, PB_REFRAME_SWEEPS, PB_REFRAME_ARGS, PB_REFRAME_REFERENCES.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "jobs" / "clusters"
DEFAULT_SWEEPS = "strategy"
# The performance variables of a check and their units (references must use the same).
PERF_UNITS = {"tokens_per_s": "tokens/s", "step_time": "s", "tflops_per_rank": "TFLOP/s", "mfu": "%",
              "peak_memory": "GiB"}


class SetupError(ValueError):
    """A profile, sweep or references file that the checks cannot be built from; the message says why."""


@dataclass(frozen=True)
class Point:
    sweep: str
    label: str
    app: str
    nodes: int
    ranks_per_node: int
    args: tuple  # the app's arguments

    @property
    def name(self):
        return f"{self.sweep}/{self.label}"


def profile_name(system=""):
    """PB_CLUSTER, else the ReFrame system's name where a profile of that name exists, else local."""
    name = os.environ.get("PB_CLUSTER", "")
    if not name:
        name = system if system and (PROFILES / f"{system}.env").is_file() else "local"
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise SetupError(f"PB_CLUSTER={name} is not a profile name (one of jobs/clusters/*.env, without .env)")
    if not (PROFILES / f"{name}.env").is_file():
        raise SetupError(f"PB_CLUSTER={name}: no profile {PROFILES / (name + '.env')}")
    return name


def read_profile(name):
    """The profile's PB_* variables as the jobs see them (sourced by bash)."""
    done = subprocess.run(["bash", "-c", 'set -a && source "$1" && env -0', "profile", str(PROFILES / f"{name}.env")],
                          capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    if done.returncode != 0:
        raise SetupError(f"jobs/clusters/{name}.env could not be sourced: {done.stderr.strip()}")
    pairs = (item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)
    return {k: v for k, v in pairs if k.startswith("PB_")}


def sweep_points(profile):
    """Every point of the sweeps in PB_REFRAME_SWEEPS (';'-separated jobs/submit command lines without
    --cluster, default "strategy"), with PB_REFRAME_ARGS as the app arguments of each."""
    app_args = shlex.split(os.environ.get("PB_REFRAME_ARGS", ""))
    points = []
    for sweep_line in os.environ.get("PB_REFRAME_SWEEPS", DEFAULT_SWEEPS).split(";"):
        words = shlex.split(sweep_line)
        if not words:
            continue
        cmd = [str(REPO / "jobs" / "submit"), *words, "--cluster", profile, "--points", "--", *app_args]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SetupError(f"PB_REFRAME_SWEEPS: '{sweep_line.strip()}': {done.stderr.strip()}")
        for line in done.stdout.splitlines()[1:]:
            _, label, app, nodes, ranks_per_node, args = line.split("\t", 5)
            points.append(Point(words[0], label, app, int(nodes), int(ranks_per_node), tuple(shlex.split(args))))
    names = [p.name for p in points]
    if not points:
        raise SetupError("PB_REFRAME_SWEEPS names no sweep")
    if len(set(names)) != len(names):
        raise SetupError(f"PB_REFRAME_SWEEPS gives a point twice: {sorted(names)}")
    return points


def load_references():
    """PB_REFRAME_REFERENCES (default jobs/reframe/references.json):
    {"system", "system:partition" or "*": {point name or "*": {variable: [value, lower, upper, unit]}}},
    lower and upper as ReFrame's fractions of the value (null: unbounded)."""
    path = Path(os.environ.get("PB_REFRAME_REFERENCES", REPO / "jobs" / "reframe" / "references.json"))
    if not path.is_file():
        raise SetupError(f"PB_REFRAME_REFERENCES: no file {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise SetupError(f"{path}: not JSON: {e}") from None
    for target, by_point in data.items():
        for point, variables in by_point.items():
            for var, ref in variables.items():
                ok = (var in PERF_UNITS and isinstance(ref, list) and len(ref) == 4 and ref[3] == PERF_UNITS[var]
                      and isinstance(ref[0], (int, float))
                      and all(t is None or isinstance(t, (int, float)) for t in ref[1:3]))
                if not ok:
                    raise SetupError(f"{path}: {target} / {point} / {var}: {ref}: want [value, lower, upper, "
                                     f"\"{PERF_UNITS.get(var, '?')}\"] for one of {', '.join(PERF_UNITS)}")
    return data


def references_for(references, system, partition, point):
    """The references that apply to a point on system:partition, the more specific winning: system "*",
    then the system, then system:partition; in each, point "*", then the point."""
    merged = {}
    for key in ("*", system, f"{system}:{partition}"):
        by_point = references.get(key, {})
        for name in ("*", point):
            merged.update({var: tuple(ref) for var, ref in by_point.get(name, {}).items()})
    return merged


def slurm_seconds(text):
    """A Slurm time (minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) in seconds."""
    days, _, clock = text.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    else:
        h, m, sec = ([0] + parts)[-3:]
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec


def main():
    try:
        profile = profile_name()
        read_profile(profile)
        points = sweep_points(profile)
        references = load_references()
    except SetupError as e:
        print(f"reframe/parabench_points: error: {e}", file=sys.stderr)
        return 2
    print(f"profile {profile}: {len(points)} point(s); references for {len(references)} system(s)")
    for p in points:
        print(f"  {p.name}: parabench-{p.app} on {p.nodes} node(s) x {p.ranks_per_node} rank(s): {shlex.join(p.args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
