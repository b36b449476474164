#!/usr/bin/env python3
"""Reads the allocation histories of --memory-log and checks every allocation's memory category
against its lifetime, as SPEC section 6 defines the categories:

- parameters, master_parameters, gradients, optimizer_states are resident: allocated before the
  first step (or between steps) and never allocated or freed inside a step;
- activations are kept for backward: allocated in a forward (or, with recomputation, in a backward),
  alive when that forward ends, and freed in a backward;
- comm_buffers are handed to a communicator while they live;
- workspace is scratch: freed before the phase that allocated it ends (the phases are the forward and
  the backward of one micro-batch, the rest of the step, the optimizer), unless held from its allocation
  (before the steps, or at its first use) to the end of the run;
- and conversely a block allocated inside a step that a communicator receives into (or reduces in
  place) is a comm_buffer or an activation (an activation received from a pipeline neighbour, or
  completed by tensor parallelism's all-reduce in place).

    mpiexec -n 2 build/bench/fsdp/parabench-fsdp --model tiny --steps 2 --memory-log results/mem
    /usr/bin/python3 -m analysis.memory_log results/mem

prints, per rank, each category's allocations, largest block and peak, then every violation (file,
line, rule); the exit code is 1 when there is one, 2 when a log cannot be read.
"""
import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

CATEGORIES = ("parameters", "master_parameters", "gradients", "optimizer_states", "activations",
              "comm_buffers", "workspace")
RESIDENT = {"parameters", "master_parameters", "gradients", "optimizer_states"}
MARKS = ("step_begin", "forward_begin", "forward_end", "backward_begin", "backward_end", "optimizer_begin",
         "step_end")
# the roles in which a communicator writes into a buffer
WRITTEN = {"recv"}


class LogError(Exception):
    pass


@dataclass
class Block:
    line: int             # of its alloc
    address: int
    category: str
    bytes: int
    phase: str            # where it was allocated: setup, forward, backward, step, optimizer
    phase_id: int         # the stretch between two marks it was allocated in
    forward_id: int = -1  # the forward it was allocated in
    alive_at_forward_end: bool = False
    uses: list = field(default_factory=list)  # (line, "op:role")
    free_line: int = 0
    free_phase: str = ""
    free_phase_id: int = -1

    def describe(self):
        return f"the {self.category} block of {self.bytes} B allocated at line {self.line} (in {self.phase})"


@dataclass
class History:
    path: str
    header: dict
    blocks: list                 # every Block, in allocation order
    marks: int
    ended_steps: int
    last_step_end: int           # the line of the last step_end mark (0: none)


def parse_header(lines):
    """'# app dp, backend cpu, ...' → {'app': 'dp', 'backend': 'cpu', ...}."""
    header = {}
    for text in lines:
        for item in text.lstrip("#").split(","):
            key, _, value = item.strip().partition(" ")
            if key and value:
                header[key] = value
    return header


def read(path):
    """Replays one rank's log; raises LogError for a malformed or inconsistent one."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise LogError(f"{path}: {e.strerror}") from e
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # a run killed mid-write: its history up to the last whole line
    if not lines or not lines[0].startswith("# parabench memory log"):
        raise LogError(f"{path}: not a parabench memory log (its first line is not '# parabench memory log ...')")
    header = parse_header([x for x in lines[1:] if x.startswith("#")])
    live = {}        # address → Block
    blocks = []
    phase, phase_id, forward_id, in_step, marks, ended_steps, last_step_end = "setup", 0, -1, False, 0, 0, 0
    for number, line in enumerate(lines, start=1):
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        kind = fields[0]
        try:
            if kind == "mark":
                name = fields[1]
                if name not in MARKS:
                    raise LogError(f"{path}:{number}: unknown mark {name!r}")
                marks += 1
                phase_id += 1
                if name == "forward_end":
                    for b in live.values():
                        if b.forward_id == forward_id:
                            b.alive_at_forward_end = True
                if name == "step_begin":
                    in_step, phase = True, "step"
                elif name == "step_end":
                    in_step, phase = False, "between steps"
                    ended_steps += 1
                    last_step_end = number
                elif name in ("forward_begin", "backward_begin"):
                    phase = name.split("_")[0]
                    if name == "forward_begin":
                        forward_id = phase_id
                elif name in ("forward_end", "backward_end"):
                    phase = "step" if in_step else "between steps"
                elif name == "optimizer_begin":
                    phase = "optimizer"
            elif kind in ("alloc", "free"):
                address, category, size = int(fields[1], 16), fields[2], int(fields[3])
                if category not in CATEGORIES:
                    raise LogError(f"{path}:{number}: unknown category {category!r}")
                if kind == "alloc":
                    if address in live:
                        raise LogError(f"{path}:{number}: {address:#x} allocated again while live (line "
                                       f"{live[address].line})")
                    b = Block(number, address, category, size, phase, phase_id,
                              forward_id if phase == "forward" else -1)
                    live[address] = b
                    blocks.append(b)
                else:
                    b = live.pop(address, None)
                    if b is None:
                        raise LogError(f"{path}:{number}: free of {address:#x}, which is not live")
                    if (b.category, b.bytes) != (category, size):
                        raise LogError(f"{path}:{number}: {address:#x} freed as {category} {size} B but allocated "
                                       f"as {b.category} {b.bytes} B at line {b.line}")
                    b.free_line, b.free_phase, b.free_phase_id = number, phase, phase_id
            elif kind == "use":
                address, what, size = int(fields[1], 16), fields[2], int(fields[3])
                owner = owner_of(live, address, size)
                if owner is None:
                    raise LogError(f"{path}:{number}: a communicator was handed {size} B at {address:#x} "
                                   f"({what}), which no live block holds")
                owner.uses.append((number, what))
            else:
                raise LogError(f"{path}:{number}: unknown event {kind!r}")
        except (IndexError, ValueError) as e:
            raise LogError(f"{path}:{number}: malformed line {line!r}") from e
    return History(path, header, blocks, marks, ended_steps, last_step_end)


def owner_of(live, address, size):
    """The live block that holds [address, address + size), or None."""
    for b in live.values():  # logs of tiny test models: a scan is fast enough
        if b.address <= address and address + size <= b.address + b.bytes:
            return b
    return None


def violations(history):
    """[(line, rule text)] of the blocks whose category does not fit their lifetime."""
    recompute = history.header.get("recompute", "none") != "none"
    found = []
    for b in history.blocks:
        freed = b.free_line > 0
        in_step = b.phase in ("step", "forward", "backward", "optimizer")
        freed_in_step = b.free_phase in ("step", "forward", "backward", "optimizer")
        written = [(n, w) for n, w in b.uses if w.split(":")[1] in WRITTEN]
        if b.category in RESIDENT:
            if in_step:
                found.append((b.line, f"{b.describe()}: {b.category} are resident, but it was allocated inside a step"))
            elif freed and freed_in_step:
                found.append((b.line, f"{b.describe()}: {b.category} are resident, but it was freed inside a step "
                                      f"(line {b.free_line}, in {b.free_phase})"))
        elif b.category == "activations":
            # With recomputation a forward drops what its backward recomputes.
            if b.phase == "forward":
                if freed and not b.alive_at_forward_end and not recompute:
                    found.append((b.line, f"{b.describe()}: activations are kept for backward, but it was freed "
                                          f"before its forward ended (line {b.free_line})"))
            elif not (b.phase == "backward" and recompute):
                found.append((b.line, f"{b.describe()}: activations are allocated in a forward"
                                      + (" (or a recomputation)" if recompute else "")))
            if freed and b.free_phase != "backward" and not (recompute and b.free_phase_id == b.phase_id):
                found.append((b.line, f"{b.describe()}: activations are freed by a backward, but it was freed "
                                      f"in {b.free_phase} (line {b.free_line})"))
        elif b.category == "comm_buffers":
            if not b.uses:
                found.append((b.line, f"{b.describe()}: a comm_buffer no communicator was handed"))
        elif b.category == "workspace":
            held_for_run = not freed or b.free_line > history.last_step_end  # made at its first use
            if in_step and not held_for_run and b.free_phase_id != b.phase_id:
                found.append((b.line, f"{b.describe()}: workspace is scratch of one phase, but it outlived it "
                                      f"(freed at line {b.free_line} in {b.free_phase})"))
        if in_step and written and b.category not in ("comm_buffers", "activations"):
            n, w = written[0]
            found.append((b.line, f"{b.describe()}: a communicator writes into it ({w}, line {n}), so it is a "
                                  f"comm_buffer"))
    return found


def summary(history):
    """{category: (allocations, largest block, peak bytes)}."""
    current = {c: 0 for c in CATEGORIES}
    peak = dict(current)
    count = dict(current)
    largest = dict(current)
    events = sorted([(b.line, b.category, b.bytes) for b in history.blocks] +
                    [(b.free_line, b.category, -b.bytes) for b in history.blocks if b.free_line])
    for _, c, delta in events:
        current[c] += delta
        peak[c] = max(peak[c], current[c])
        if delta > 0:
            count[c] += 1
            largest[c] = max(largest[c], delta)
    return {c: (count[c], largest[c], peak[c]) for c in CATEGORIES}


def log_files(paths):
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("rank*.tsv"), key=lambda f: int(f.stem[4:]) if f.stem[4:].isdigit() else -1)
            if not found:
                raise LogError(f"{p}: no rank*.tsv in this directory (is it a --memory-log directory?)")
            files += found
        else:
            files.append(p)
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="--memory-log directories or rank<r>.tsv files")
    parser.add_argument("--quiet", action="store_true", help="print the violations only")
    args = parser.parse_args(argv)
    try:
        histories = [read(f) for f in log_files(args.logs)]
    except LogError as e:
        print(f"memory_log: error: {e}", file=sys.stderr)
        return 2
    bad = 0
    for h in histories:
        found = violations(h)
        bad += len(found)
        if not args.quiet:
            print(f"{h.path}: {len(h.blocks)} allocations, {h.ended_steps} steps")
            print(f"  {'category':<18} {'allocations':>11} {'largest B':>12} {'peak B':>12}")
            for c, (n, largest, peak) in summary(h).items():
                print(f"  {c:<18} {n:>11} {largest:>12} {peak:>12}")
        for line, text in found:
            print(f"{h.path}:{line}: {text}")
    if not args.quiet:
        print(f"{bad} violation{'s' if bad != 1 else ''} in {len(histories)} log{'s' if len(histories) != 1 else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
