"""A real single-node Slurm for the end-to-end tests of jobs/ (Debian's slurm-wlm and munge).

The `slurm` fixture starts munged, slurmctld and slurmd in the foreground as children of this
process, configured in a scratch folder (their own key, socket, ports, state, spool and logs, so
that nothing of a Slurm or munge already on the machine is used or disturbed), waits for the node
to be idle and stops all three by their PIDs at the end, also when a test failed. The setup follows
FACTS "A real single-node Slurm": SlurmUser and SlurmdUser root, linuxproc process tracking, no
task or accounting plugins, cons_tres on cores, pmi2, and a node declared with 8 CPUs (more than
the machine has, config_overrides) in a partition that oversubscribes, so that 4-rank jobs fit.

Where Slurm cannot run (not installed, or not root) every test is skipped with the reason and
pytest exits with 77, which ctest reports as skipped (SKIP_RETURN_CODE).
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("PB_BUILD_DIR", str(REPO / "build")))
SKIPPED_EXIT_CODE = 77
DAEMONS = ["munged", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun"]
DROPPED_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "PMIX_", "PARABENCH_", "PB_")


def pytest_sessionfinish(session, exitstatus):
    """Exit with 77 when every test was skipped, so that ctest shows the test as skipped."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = reporter.stats if reporter else {}
    ran = sum(len(stats.get(k, [])) for k in ("passed", "failed", "error", "xfailed", "xpassed"))
    if stats.get("skipped") and ran == 0 and exitstatus == 0:
        session.exitstatus = SKIPPED_EXIT_CODE


def find_program(name):
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name)
                                      if p.is_file() and os.access(p, os.X_OK)), None)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, lines=40):
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({path}: {e})"
    return "\n".join(text[-lines:])


class Slurm:
    """A running single-node Slurm: `env` for its clients, `run` to call them, logs for messages."""

    def __init__(self, root):
        self.root = root
        self.conf = root / "slurm.conf"
        # Each daemon's stdout and stderr (munged logs there in the foreground; slurmctld and slurmd
        # print what goes wrong before their log files open), then the Slurm log files.
        self.logs = [root / "log" / f"{name}.stdout" for name in DAEMONS]
        self.logs += [root / "log" / "slurmctld.log", root / "log" / "slurmd.log"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV_PREFIXES)}
        self.env.update(SLURM_CONF=str(self.conf), PB_BUILD_DIR=str(BUILD_DIR), HDF5_USE_FILE_LOCKING="FALSE")
        self.procs = {}
        self.node = socket.gethostname().split(".")[0]

    def run(self, *cmd, timeout=30, check=True):
        done = subprocess.run([str(c) for c in cmd], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
        if check and done.returncode != 0:
            pytest.fail(f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout}{done.stderr}\n"
                        + self.diagnostics())
        return done

    def diagnostics(self):
        """The daemons' state and the ends of their logs, for a failure message."""
        parts = []
        for name, proc in self.procs.items():
            state = "running" if proc.poll() is None else f"exited with {proc.returncode}"
            parts.append(f"{name} (pid {proc.pid}) {state}")
        for path in self.logs:
            parts.append(f"--- end of {path} ---\n{tail(path)}")
        return "\n".join(parts)

    def start(self):
        munge = self.root / "munge"
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir()
        munge.chmod(0o711)  # clients must reach the socket; munged refuses a folder others may write
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "munge.socket"
        # As root, munged wants --force; -F keeps it in the foreground, our child.
        self.spawn("munged", [find_program("munged"), "-F", "--force", f"--key-file={key}",
                              f"--socket={socket_path}", f"--pid-file={munge / 'munged.pid'}",
                              f"--seed-file={munge / 'munged.seed'}"])
        self.wait_for(lambda: socket_path.exists(), 15, "munged to create its socket")

        self.conf.write_text(f"""\
# Written by tests/slurm/conftest.py for one test session.
ClusterName=pbtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool'}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.pid'}
SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}
SlurmdLogFile={self.root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
ReturnToService=2
SlurmdParameters=config_overrides
MailProg=/bin/true
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
        # -D: in the foreground, our children, stopped by their PIDs.
        self.spawn("slurmctld", [find_program("slurmctld"), "-D", "-f", self.conf])
        self.spawn("slurmd", [find_program("slurmd"), "-D", "-f", self.conf, "-N", self.node])

        def idle():
            done = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            return done.returncode == 0 and done.stdout.strip() == "idle"

        self.wait_for(idle, 60, f"node {self.node} to be idle in sinfo")

    def spawn(self, name, cmd):
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen([str(c) for c in cmd], env=self.env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def wait_for(self, condition, seconds, what):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                pytest.fail(f"{', '.join(dead)} stopped while waiting for {what}\n" + self.diagnostics())
            time.sleep(0.5)
        pytest.fail(f"timed out after {seconds} s waiting for {what}\n" + self.diagnostics())

    def stop(self):
        """Cancels what is left, then stops slurmd, slurmctld and munged by their PIDs."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=20)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                done = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True, timeout=10)
                if done.returncode != 0 or not done.stdout.strip():
                    break
                time.sleep(0.5)
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("a real Slurm needs root here (slurmd starts the jobs as root); run the suite as root")
    missing = [p for p in DAEMONS + CLIENTS if find_program(p) is None]
    if missing:
        pytest.skip(f"Slurm is not installed: {', '.join(missing)} not found "
                    "(scripts/setup.sh installs slurm-wlm and munge)")
    cluster = Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
