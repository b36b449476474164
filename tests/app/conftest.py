"""Shared fixtures of the application-level tests: the mini-apps are run as a user runs them,
through `mpiexec -n RANKS`, and judged by their exit code, their output and their HDF5 result file
(docs/SPEC.md sections 4 to 6).

Environment:
  PB_BIN_DIR   folder of the built apps, <PB_BIN_DIR>/<app>/parabench-<app> (default <repo>/build/bench)
  PB_MPIEXEC   the MPI launcher (default: mpiexec)

Every run gets a clean environment: no SLURM_*, PMI_* or PARABENCH_* variables of the shell that
started pytest (a test run inside a Slurm allocation must not make the app believe it was started
by srun), and HDF5_USE_FILE_LOCKING=FALSE so that a test can read a result file that a running app
still holds open.
"""

import os
import re
import signal
import subprocess
from pathlib import Path

# Before h5py opens any file in this process (the SIGTERM test reads a file that is being written).
os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("PB_BIN_DIR", str(REPO / "build" / "bench")))
MPIEXEC = os.environ.get("PB_MPIEXEC", "mpiexec")
DROPPED_ENV_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "PARABENCH_", "HYDRA_", "MPIR_")

RESULT_FIELDS = ["app", "ranks", "step_time_s", "tokens_per_s", "tflops_per_rank", "mfu", "peak_mem_bytes",
                 "status", "file"]


def app_binary(app):
    path = BIN_DIR / app / f"parabench-{app}"
    if not path.is_file():
        pytest.fail(f"{path} does not exist: build it (cmake --build build) or set PB_BIN_DIR")
    return path


def app_environment(extra=None):
    """The environment of a run: the caller's, cleaned (see the module doc), plus `extra`
    (a value of None removes that variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV_PREFIXES)}
    env["HDF5_USE_FILE_LOCKING"] = "FALSE"
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def _children_map():
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid):
    """Every living descendant of pid (from /proc), parents before children."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def rank_pids(launcher_pid, app):
    """The rank processes of a job started by launcher_pid: its descendants running the app's binary
    (what Slurm's scancel signals)."""
    binary = os.path.realpath(app_binary(app))
    pids = []
    for pid in descendants(launcher_pid):
        try:
            if os.path.realpath(f"/proc/{pid}/exe") == binary:
                pids.append(pid)
        except OSError:
            pass
    return pids


def kill_job(proc):
    """SIGKILL a launcher started in its own session, its process group and every descendant."""
    victims = descendants(proc.pid)
    for pid in reversed(victims):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _command(app, ranks, args):
    return [MPIEXEC, "-n", str(ranks), str(app_binary(app)), *[str(a) for a in args]]


def _describe(cmd, rc, out, err):
    return f"command: {' '.join(cmd)}\nexit code: {rc}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"


@pytest.fixture(scope="session")
def bin_dir():
    return BIN_DIR


@pytest.fixture(scope="session")
def run_app(tmp_path_factory):
    """run_app(app, ranks, args, timeout=60, env=None, cwd=None) -> (returncode, stdout, stderr).

    Runs `mpiexec -n RANKS parabench-APP ARGS` in its own session. A run that does not finish
    within `timeout` seconds is a hang: the whole job is killed and the test fails. `env` adds to
    (or with None values removes from) the cleaned environment; `cwd` defaults to an empty
    scratch folder, so that a run without --out writes nothing into the repository."""
    default_cwd = tmp_path_factory.mktemp("cwd")

    def run(app, ranks, args, timeout=60, env=None, cwd=None):
        cmd = _command(app, ranks, args)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=app_environment(env), cwd=str(cwd or default_cwd),
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_job(proc)
            out, err = proc.communicate()
            pytest.fail(f"did not finish within {timeout} s (a hang?); killed\n" + _describe(cmd, None, out, err))
        return proc.returncode, out, err

    run.describe = _describe
    run.command = _command
    return run


@pytest.fixture
def start_app(tmp_path):
    """start_app(app, ranks, args, env=None) -> Popen of mpiexec (own session, text pipes) for tests
    that act on a running job; every job still running at teardown is killed."""
    started = []

    def start(app, ranks, args, env=None):
        proc = subprocess.Popen(_command(app, ranks, args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=app_environment(env), cwd=str(tmp_path),
                                start_new_session=True)
        proc.cmd = _command(app, ranks, args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            kill_job(proc)
            proc.communicate()


@pytest.fixture
def out_dir(tmp_path):
    """An empty folder for result files."""
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def parse_result_line():
    """parse_result_line(stdout) -> dict of the PARABENCH_RESULT line (SPEC section 5); fails the test
    unless stdout has exactly one, as its last line, with exactly the spec's fields in order."""

    def parse(stdout):
        lines = [l for l in stdout.splitlines() if l.startswith("PARABENCH_RESULT")]
        assert len(lines) == 1, f"expected one PARABENCH_RESULT line, got {len(lines)}:\n{stdout}"
        assert stdout.rstrip("\n").splitlines()[-1] == lines[0], "PARABENCH_RESULT must be the final line"
        tokens = lines[0].split(" ")
        assert tokens[0] == "PARABENCH_RESULT"
        fields = []
        for token in tokens[1:]:
            m = re.fullmatch(r"([a-z_]+)=(\S*)", token)
            assert m, f"malformed field {token!r} in {lines[0]!r}"
            fields.append((m.group(1), m.group(2)))
        assert [k for k, _ in fields] == RESULT_FIELDS, lines[0]
        return dict(fields)

    return parse


def padded_vocab(vocab, tp=1, divisor=128):
    """The vocabulary as embed.tok and head.w store it (SPEC 2, Megatron-LM's make-vocab-size-divisible-by):
    the smallest multiple of divisor · tp that is at least vocab."""
    multiple = divisor * tp
    return -(-vocab // multiple) * multiple


def gpt_num_parameters(layers, hidden, seq, vocab, ffn=None, padded=True):
    """Parameters of the reference model (SPEC section 2): embeddings, L blocks, final LayerNorm, head;
    as stored (the vocabulary padded, what memory holds and collectives move), or the model's."""
    h, f, L, S = hidden, ffn or 4 * hidden, layers, seq
    V = padded_vocab(vocab) if padded else vocab
    per_layer = (2 * h                    # ln1
                 + 3 * h * h + 3 * h      # attn.qkv
                 + h * h + h              # attn.out
                 + 2 * h                  # ln2
                 + h * f + f              # mlp.fc1
                 + f * h + h)             # mlp.fc2
    return V * h + S * h + L * per_layer + 2 * h + h * V


@pytest.fixture(scope="session")
def num_params():
    return gpt_num_parameters


PRESETS = {  # SPEC section 4
    "tiny": dict(layers=2, hidden=64, heads=4, seq=32, vocab=256),
    "small": dict(layers=4, hidden=256, heads=8, seq=128, vocab=4096),
}


@pytest.fixture(scope="session")
def presets():
    return PRESETS



@pytest.fixture(scope="session")
def job_pids():
    """job_pids(launcher_pid, app) -> pids of the rank processes of a running job (see rank_pids)."""
    return rank_pids


@pytest.fixture(scope="session")
def kill():
    """kill(proc): SIGKILL a job started by start_app, launcher, process group and descendants."""
    return kill_job


@pytest.fixture(scope="session")
def launcher_version():
    """The first lines of `mpiexec --version` (MPICH's launcher says "HYDRA build details")."""
    try:
        done = subprocess.run([MPIEXEC, "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=20)
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"


# ---- shared by test_fsdp.py and test_recompute.py --------------------------------------------------

MEMORY_CATEGORIES = ["parameters", "master_parameters", "gradients", "optimizer_states", "activations",
                     "comm_buffers", "workspace", "peak_total"]
COMM_OPS = ["all_reduce", "reduce_scatter", "all_gather", "all_to_all", "send", "recv", "broadcast"]


def read_result(path):
    """What the equivalence, memory and communication tests compare, from one result file."""
    import h5py

    def text(value):
        return value.decode() if isinstance(value, bytes) else value

    with h5py.File(path, "r") as f:
        return {
            "status": text(f.attrs["status"]),
            "config": {k: text(v) for k, v in f["config"].attrs.items()},
            "loss": f["steps/loss"][()],
            "grad_norm": f["steps/grad_norm"][()],
            "param_norm": float(f["summary"].attrs["final_param_norm"]),
            "measured": {c: f[f"memory/measured/{c}"][()] for c in MEMORY_CATEGORIES},
            "predicted": {c: f[f"memory/predicted/{c}"][()] for c in MEMORY_CATEGORIES},
            "calls": {op: f[f"comm/{op}/calls"][()] for op in COMM_OPS},
            "bytes": {op: f[f"comm/{op}/bytes"][()] for op in COMM_OPS},
        }


@pytest.fixture(scope="session")
def cached_run(run_app, tmp_path_factory):
    """cached_run(app, ranks, args, timeout=90) -> read_result(...) of `mpiexec -n RANKS parabench-APP
    ARGS --quiet --out FILE`, plus "command" and "path" (FILE, for app-specific datasets). Each distinct
    (app, ranks, args) runs once per session, so that tests of one run's losses, memory and communication
    (and modules that share a reference run) do not train it again; a run that failed fails every test
    that asks for it, without running again."""
    cache = {}

    def run(app, ranks, args, timeout=90):
        key = (app, ranks, tuple(str(a) for a in args))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{app}-{ranks}ranks") / "run.h5"
            full = [*args, "--quiet", "--out", path]
            cmd = run_app.command(app, ranks, full)
            rc, out, err = run_app(app, ranks, full, timeout=timeout)
            if rc != 0:
                cache[key] = run_app.describe(cmd, rc, out, err)
            else:
                result = read_result(path)
                result["command"] = " ".join(str(c) for c in cmd)
                result["path"] = path
                cache[key] = result
        if isinstance(cache[key], str):
            pytest.fail("the run failed\n" + cache[key])
        return cache[key]

    return run


MODEL_STATES = ["parameters", "master_parameters", "gradients", "optimizer_states"]
OTHER_CATEGORIES = ["activations", "comm_buffers", "workspace", "peak_total"]


def assert_memory_matches_prediction(run, what, inexact=()):
    """SPEC 6 /memory, per rank: every category to the byte (the memory model follows each app's
    allocations, and tests/app/test_memory_log.py checks that each is filed under the right category), but
    those in `inexact` within 10 %; peak_total, the sum of the categories' peaks (docs/memory-model.md
    section 8), is an upper bound of the measured peak of the sum and at most 10 % above it (within 10 %
    where it is in `inexact`)."""
    for cat in MODEL_STATES + OTHER_CATEGORIES:
        measured, predicted = run["measured"][cat], run["predicted"][cat]
        assert measured.shape == predicted.shape == (int(run["config"]["world_size"]),), (what, cat)
        for rank, (m, p) in enumerate(zip(measured.tolist(), predicted.tolist())):
            if cat in inexact:
                ok, rule = abs(m - p) <= 0.10 * p, "within 10 %"
            elif cat == "peak_total":
                ok, rule = m <= p <= 1.10 * m, "at most 10 % above"
            else:
                ok, rule = m == p, "exactly"
            assert ok, f"{what}: rank {rank} {cat} measured {m} B, predicted {p} B (not {rule})\n{run['command']}"



def assert_memory_log_fits(logs, measured, ranks, app=None, steps=None):
    """A run's --memory-log folder: one file per rank (rank<r>.tsv), every allocation within its
    category's lifetime (analysis/memory_log.py states the rules), the header's app and every step logged
    where given, and the log the tracker's own: replayed, each category peaks where the result file's
    /memory/measured says, per rank and byte for byte."""
    import sys
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from analysis import memory_log

    files = memory_log.log_files([logs])
    assert [f.name for f in files] == [f"rank{r}.tsv" for r in range(ranks)]
    for rank, path in enumerate(files):
        history = memory_log.read(path)
        if app is not None:
            assert history.header["app"] == app, path
        if steps is not None:
            assert history.ended_steps == steps, path
        problems = memory_log.violations(history)
        assert not problems, "\n".join(f"{path}:{line}: {text}" for line, text in problems)
        peaks = {c: peak for c, (_, _, peak) in memory_log.summary(history).items()}
        for c in MEMORY_CATEGORIES[:-1]:
            assert peaks[c] == measured[c][rank], f"rank {rank} {c}: log {peaks[c]}, result {measured[c][rank]}"

def finished_steps(path):
    """Steps a result file holds so far (its /steps attribute `finished`, SPEC section 6); 0 while the
    file does not exist or cannot be read (mid-write)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f["steps"].attrs["finished"])
    except (OSError, KeyError, ValueError):
        return 0


def check_rejected(run_app, tmp_path, app, ranks, args, names, env=None, timeout=20):
    """A command line that must be refused: exit 2 within `timeout` s, every one of `names` on stderr,
    the message printed once (by rank 0), no result line and no file left behind. No --out is given,
    so a run that went ahead would leave results/ in the scratch folder."""
    rc, out, err = run_app(app, ranks, args, timeout=timeout, cwd=tmp_path, env=env)
    what = run_app.describe(run_app.command(app, ranks, args), rc, out, err)
    assert rc == 2, what
    for name in [names] if isinstance(names, str) else names:
        assert name in err, f"stderr does not name {name!r}\n{what}"
    assert err.count(f"parabench-{app}: error") == 1, f"the message must be printed once, by rank 0\n{what}"
    assert "PARABENCH_RESULT" not in out, what
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [], f"a rejected command line left {left}\n{what}"
