#!/usr/bin/env python3
"""Where a pipeline's measured bubble comes from: the theory, the schedule replayed with the measured
compute times, and the measurement.

    bubble_replay.py RESULT.h5 TRACE.json

For each stage, the median forward and backward times of the measured steps (from the --trace of a
parabench-pp run) are fed to the run's schedule with instant messages: that replay is the bubble the
schedule gives these compute times. Then

    measured − replay  = communication and waiting the schedule does not explain (latency, progress),
    replay − theory    = unequal stages (the theory assumes every stage as fast as every other).

Schedules naive, gpipe and 1f1b (one model chunk per rank).
"""

import json
import statistics
import sys
from collections import defaultdict

import h5py


def schedule(name, p, s, m):
    """[(forward?, micro-batch)] of stage s, as bench/pp/schedule.cpp orders them."""
    if name == "naive":
        return [x for i in range(m) for x in ((True, i), (False, i))]
    if name == "gpipe":
        return [(True, i) for i in range(m)] + [(False, i) for i in range(m)]
    if name == "1f1b":
        warmup = min(p - s - 1, m)
        steps = [(True, i) for i in range(warmup)]
        for i in range(m - warmup):
            steps += [(True, warmup + i), (False, i)]
        return steps + [(False, i) for i in range(m - warmup, m)]
    raise ValueError(f"schedule {name} is not replayed (naive, gpipe and 1f1b are)")


def replay(name, tf, tb, m):
    """Per-stage bubble of the schedule with compute times tf[s], tb[s] (per stage, or per stage and
    micro-batch: tf[s][i]) and instant messages."""
    p = len(tf)
    def duration(times, s, i):
        return times[s][i] if isinstance(times[s], (list, tuple)) else times[s]
    end = {}  # (forward?, stage, micro) -> end time
    clock = [0.0] * p
    pending = [list(schedule(name, p, s, m)) for s in range(p)]
    while any(pending):
        progressed = False
        for s in range(p):
            while pending[s]:
                fwd, i = pending[s][0]
                dep = (True, s - 1, i) if fwd and s > 0 else (False, s + 1, i) if not fwd and s < p - 1 else None
                if dep is not None and dep not in end:
                    break
                start = max(clock[s], end[dep] if dep else 0.0)
                clock[s] = end[(fwd, s, i)] = start + duration(tf if fwd else tb, s, i)
                pending[s].pop(0)
                progressed = True
        if not progressed:
            raise RuntimeError("the schedule deadlocks")
    makespan = max(clock)
    return [1.0 - sum(duration(tf, s, i) + duration(tb, s, i) for i in range(m)) / makespan for s in range(p)]


def step_times(trace_path, stages, m, warmup):
    """{step: (tf, tb)} with tf[s][i], tb[s][i] the measured compute time (ms) of micro-batch i's forward
    and backward on stage s, for every step after `warmup`."""
    events = json.load(open(trace_path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    steps = defaultdict(lambda: ([[0.0] * m for _ in range(stages)], [[0.0] * m for _ in range(stages)]))
    for e in events:
        args = e.get("args", {})
        if e.get("ph") == "X" and e.get("cat") == "compute" and e["name"][:1] in "FB" and e["name"][1:].isdigit() \
                and args.get("step", 0) > warmup:
            tf, tb = steps[args["step"]]
            (tf if e["name"][0] == "F" else tb)[e["pid"]][args["micro_batch"]] = e["dur"] / 1e3
    return dict(steps)


def stage_times(trace_path, stages, warmup):
    """Median forward and backward compute time (ms) of each stage over the steps after `warmup`, from a
    parabench-pp --trace (pp × dp 1: rank = stage)."""
    events = json.load(open(trace_path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    durations = defaultdict(list)  # (rank, "F" or "B") -> ms
    for e in events:
        args = e.get("args", {})
        if e.get("ph") == "X" and e.get("cat") == "compute" and e["name"][:1] in "FB" and e["name"][1:].isdigit() \
                and args.get("step", 0) > warmup:
            durations[(e["pid"], e["name"][0])].append(e["dur"] / 1e3)
    return ([statistics.median(durations[(s, "F")]) for s in range(stages)],
            [statistics.median(durations[(s, "B")]) for s in range(stages)])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with h5py.File(sys.argv[1], "r") as f:
        conf = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f["config"].attrs.items()}
        measured = f["pipeline/bubble_fraction"][()]
        theory = float(f["pipeline/bubble_fraction"].attrs["theoretical"])
    name, p, m, warmup = conf["schedule"], int(conf["pp"]), int(conf["grad_accum"]), int(conf["warmup"])
    if p * int(conf.get("dp", 1)) != len(measured):
        sys.exit("bubble_replay.py: only pp × dp 1 runs are replayed")
    tf, tb = stage_times(sys.argv[2], p, warmup)
    replayed = replay(name, tf, tb, m)
    print(f"{name}, pp {p}, {m} micro-batches: theory {theory:.3f}")
    print(f"{'stage':>5} {'forward ms':>10} {'backward ms':>11} {'replay':>7} {'measured':>8}")
    for s in range(p):
        print(f"{s:>5} {tf[s]:>10.2f} {tb[s]:>11.2f} {replayed[s]:>7.3f} {measured[s]:>8.3f}")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f" mean {'':>10} {'':>11} {mean(replayed):>7.3f} {mean(measured):>8.3f}   "
          f"unequal stages {mean(replayed) - theory:+.3f}, communication and waiting {mean(measured) - mean(replayed):+.3f}")


if __name__ == "__main__":
    main()
