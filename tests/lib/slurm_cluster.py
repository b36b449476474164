"""A real Slurm for the end-to-end tests (Debian's slurm-wlm and munge), on one machine: either the
machine itself as one node, or several nodes, each a network namespace of its own (NetnsNodes).

`Slurm` starts munged, slurmctld and one slurmd per node in the foreground as children of the test,
configured in a scratch folder (their own key, socket, ports, state, spool and logs, so that nothing
of a Slurm or munge already on the machine is used or disturbed), waits for every node to be idle, and
stops them all by their PIDs at the end, also when a test failed. The setup follows FACTS "A real
single-node Slurm": SlurmUser and SlurmdUser root, linuxproc process tracking, no task or accounting
plugins, cons_tres on cores, pmi2, and nodes declared with more CPUs than the machine has
(config_overrides) in a partition that oversubscribes, so that 4-rank jobs fit.

With NetnsNodes (docs/jobs.md, "A multi-node test cluster on one machine"), every node is a network
namespace with its own address on a bridge that the test creates, in 198.18.0.0/24 (RFC 2544's
benchmarking range), and its slurmd runs in a UTS and mount namespace of its own: its host name is the
node's, and its /etc/hosts (bind-mounted, private to it) names every node. Job steps inherit all of
it, so MPI ranks of different nodes see different host names and reach each other over the bridge.
slurmctld runs in the test's namespace, on the bridge's address. MPICH here is ch4:ucx: UCX would
find the other "nodes" on this machine through shared memory, so the cluster's environment restricts
UCX to TCP over the namespaces' interface (UCX_TLS=tcp,self, UCX_NET_DEVICES=eth0); ranks of one
node still use MPICH's own shared memory. UCX 1.13's TCP transport hangs MPI_Finalize in about half of
the jobs (openucx/ucx#8738), after the run's outputs are written: PARABENCH_FINALIZE_TIMEOUT_S=5 (SPEC
5) bounds it.
"""

import ctypes
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = Path(os.environ.get("PB_BUILD_DIR", str(REPO / "build")))
DAEMONS = ["munged", "slurmctld", "slurmd"]
CLIENTS = ["sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun"]
NETNS_TOOLS = ["ip", "nsenter", "unshare", "mount"]
DROPPED_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "PMI_", "PMIX_", "PARABENCH_", "PB_", "UCX_")


SKIPPED_EXIT_CODE = 77


def pytest_sessionfinish(session, exitstatus):
    """A conftest's hook (imported by name): exit with 77 when every test was skipped, so that ctest
    shows the test as skipped."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = reporter.stats if reporter else {}
    ran = sum(len(stats.get(k, [])) for k in ("passed", "failed", "error", "xfailed", "xpassed"))
    if stats.get("skipped") and ran == 0 and exitstatus == 0:
        session.exitstatus = SKIPPED_EXIT_CODE


def die_with_parent():
    """In a daemon between fork and exec: SIGKILL when the test process ends, however it ends
    (PR_SET_PDEATHSIG), so that a killed test session leaves no daemon behind."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def find_program(name):
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name)
                                      if p.is_file() and os.access(p, os.X_OK)), None)


def skip_unless_slurm_can_run(network=False):
    """Skips (with the reason) where a real Slurm, or the namespaces of a multi-node one, cannot run."""
    if os.geteuid() != 0:
        pytest.skip("a real Slurm needs root here (slurmd starts the jobs as root); run the suite as root")
    missing = [p for p in DAEMONS + CLIENTS if find_program(p) is None]
    if missing:
        pytest.skip(f"Slurm is not installed: {', '.join(missing)} not found "
                    "(scripts/setup.sh installs slurm-wlm and munge)")
    if network:
        missing = [p for p in NETNS_TOOLS if find_program(p) is None]
        if missing:
            pytest.skip(f"the multi-node test cluster needs {', '.join(missing)} (iproute2, util-linux)")


def free_ports(count):
    """`count` distinct ports free now (the sockets are held until all are chosen)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tail(path, lines=40):
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"({path}: {e})"
    return "\n".join(text[-lines:])


def ip(*args, check=True):
    done = subprocess.run(["ip", *map(str, args)], capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(map(str, args))} failed ({done.returncode}): {done.stderr.strip()}")
    return done


class NetnsNodes:
    """`count` nodes in network namespaces on one bridge. Names carry the creating process's id (the
    kernel's interface names are at most 15 characters: "pbt<pid>br", "pbt<pid>v<k>", namespaces
    "pbt<pid>n<k>"), so that `remove_stale` can tell what a session that no longer runs left behind; a
    lock lets one session at a time use the subnet. `remove` kills what runs in the namespaces, deletes
    them (their veth ends with them), the veths and the bridge, whatever `create` got to."""

    SUBNET = "198.18.0"  # RFC 2544's benchmarking range: used only between these namespaces
    PREFIX = "pbt"
    NAME = re.compile(r"^pbt(\d+)(n\d+|v\d+|br)$")  # ours: pbt<pid>n<k>, pbt<pid>v<k>, pbt<pid>br
    LOCK = Path("/run/lock/parabench-test-cluster.lock")  # one cluster at a time: they share the subnet

    def __init__(self, count, hosts_file):
        self.count = count
        self.tag = f"{self.PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}br"
        self.names = [f"pbnode{k}" for k in range(1, count + 1)]  # Slurm's node names and the host names
        self.namespaces = [f"{self.tag}n{k}" for k in range(1, count + 1)]
        self.veths = [f"{self.tag}v{k}" for k in range(1, count + 1)]
        self.addresses = [f"{self.SUBNET}.{10 + k}" for k in range(1, count + 1)]
        self.controller_address = f"{self.SUBNET}.1"
        self.hosts_file = hosts_file

    @classmethod
    def stale(cls, name):
        """Whether `name` is one of ours whose session's process is gone (a killed test run)."""
        match = cls.NAME.match(name)
        return bool(match) and not Path(f"/proc/{match.group(1)}").exists()

    @staticmethod
    def kill_all_in(namespace):
        """SIGKILL to every process in a network namespace, until none is left (or 10 s have passed)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = [int(p) for p in ip("netns", "pids", namespace, check=False).stdout.split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    @classmethod
    def remove_stale(cls):
        """What sessions that no longer run left behind: their namespaces (after killing what still
        runs in them: daemons and job processes outlive a killed test run), veths and bridges."""
        for line in ip("netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if cls.stale(name):
                cls.kill_all_in(name)
                ip("netns", "delete", name, check=False)
        for line in ip("-o", "link", "show", check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
            if cls.stale(name):
                ip("link", "delete", name, check=False)

    def create(self):
        # One test cluster at a time on this machine (they share 198.18.0.0/24): the lock is held until
        # remove(), and released by the kernel if the session dies.
        self.LOCK.parent.mkdir(parents=True, exist_ok=True)
        self.lock = open(self.LOCK, "w")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.remove_stale()
        hosts = ["127.0.0.1 localhost", f"{self.controller_address} {socket.gethostname()}"]
        hosts += [f"{a} {n}" for a, n in zip(self.addresses, self.names)]
        Path(self.hosts_file).write_text("\n".join(hosts) + "\n")
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.controller_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for ns, veth, address in zip(self.namespaces, self.veths, self.addresses):
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", veth, "master", self.bridge, "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def remove(self):
        try:
            for ns in self.namespaces:
                self.kill_all_in(ns)
                ip("netns", "delete", ns, check=False)
            for veth in self.veths:
                ip("link", "delete", veth, check=False)  # deleted with the namespace, unless it never moved
            ip("link", "delete", self.bridge, check=False)
        finally:
            lock = getattr(self, "lock", None)
            if lock is not None:
                lock.close()  # releases the flock
                self.lock = None

    def leftovers(self):
        """What of this cluster still exists (for the cleanup check): namespaces, links, processes."""
        namespaces = ip("netns", "list", check=False).stdout.split()
        left = [ns for ns in self.namespaces if ns in namespaces]
        links = ip("-o", "link", "show", check=False).stdout
        left += [name for name in [self.bridge, *self.veths] if f": {name}:" in links or f": {name}@" in links]
        left += [f"pid {pid} in {ns}" for ns in left if ns in self.namespaces
                 for pid in ip("netns", "pids", ns, check=False).stdout.split()]
        return left

    def command(self, k, argv):
        """argv run on node k (0-based): in its network namespace, with its own host name and hosts file."""
        script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.namespaces[k]}", "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c", script, "node", str(self.hosts_file), self.names[k],
                *map(str, argv)]

    def rx_bytes(self, k):
        """Bytes the bridge received from node k (its veth's counter in the test's namespace)."""
        return int(Path(f"/sys/class/net/{self.veths[k]}/statistics/rx_bytes").read_text())


class Slurm:
    """A running Slurm: `env` for its clients, `run` to call them, logs for messages; `nodes` its node
    names. network=None: the machine itself is the one node (at 127.0.0.1); a NetnsNodes: its nodes."""

    def __init__(self, root, network=None, cluster_name="pbtest", cpus_per_node=8):
        self.root = root
        self.conf = root / "slurm.conf"
        self.network = network
        self.cluster_name = cluster_name
        self.cpus_per_node = cpus_per_node
        self.host = socket.gethostname().split(".")[0]
        self.nodes = network.names if network else [self.host]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV_PREFIXES)}
        self.env.update(SLURM_CONF=str(self.conf), PB_BUILD_DIR=str(BUILD_DIR), HDF5_USE_FILE_LOCKING="FALSE")
        if network:  # MPI between the namespaces over TCP on their interface (see above), whose
            # MPI_Finalize hangs in about half of the jobs (UCX 1.13, openucx/ucx#8738): bounded (SPEC 5).
            self.env.update(UCX_TLS="tcp,self", UCX_NET_DEVICES="eth0", PARABENCH_FINALIZE_TIMEOUT_S="5")
        # Each daemon's stdout and stderr (munged logs there in the foreground; slurmctld and slurmd
        # print what goes wrong before their log files open), then the Slurm log files.
        self.slurmd_names = [f"slurmd-{n}" for n in self.nodes]
        self.logs = [root / "log" / f"{name}.stdout" for name in ["munged", "slurmctld", *self.slurmd_names]]
        self.logs += [root / "log" / "slurmctld.log"] + [root / "log" / f"slurmd.{n}.log" for n in self.nodes]
        self.procs = {}

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
        """Starts the daemons (and the network). From here until stop(), SIGTERM and SIGHUP end the test
        session as Ctrl-C does, so that pytest tears the fixtures down and stop() removes everything; and
        each daemon dies with the test process should it be killed outright (SIGKILL)."""
        self.stop_on_signals()
        munge = self.root / "munge"
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir()
        munge.chmod(0o711)  # clients must reach the socket; munged refuses a folder others may write
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "munge.socket"
        # As root, munged wants --force; -F keeps it in the foreground, our child. Its socket is a file:
        # reachable from every network namespace.
        self.spawn("munged", [find_program("munged"), "-F", "--force", f"--key-file={key}",
                              f"--socket={socket_path}", f"--pid-file={munge / 'munged.pid'}",
                              f"--seed-file={munge / 'munged.seed'}"])
        self.wait_for(lambda: socket_path.exists(), 15, "munged to create its socket")

        if self.network:
            self.network.create()
            controller = self.network.controller_address
            node_lines = "".join(f"NodeName={n} NodeAddr={a} CPUs={self.cpus_per_node} State=UNKNOWN\n"
                                 for n, a in zip(self.network.names, self.network.addresses))
            # A dead node is noticed within seconds, not Slurm's default 5 minutes (the node failure test).
            timeouts = "SlurmdTimeout=10\nMessageTimeout=5\n"
        else:
            controller = "127.0.0.1"
            node_lines = f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus_per_node} State=UNKNOWN\n"
            timeouts = ""
        node_list = ",".join(self.nodes)
        ctld_port, slurmd_port = free_ports(2)
        (self.root / "spool").mkdir(exist_ok=True)
        for n in self.nodes:
            (self.root / "spool" / n).mkdir()
        self.conf.write_text(f"""\
# Written by tests/lib/slurm_cluster.py for one test session.
ClusterName={self.cluster_name}
SlurmctldHost={self.host}({controller})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={self.root / 'state'}
SlurmdSpoolDir={self.root / 'spool' / '%n'}
SlurmctldPidFile={self.root / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'slurmd.%n.pid'}
SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}
SlurmdLogFile={self.root / 'log' / 'slurmd.%n.log'}
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
{timeouts}{node_lines}PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
        # -D: in the foreground, our children, stopped by their PIDs.
        self.spawn("slurmctld", [find_program("slurmctld"), "-D", "-f", self.conf])
        for k in range(len(self.nodes)):
            self.spawn_slurmd(k)
        self.wait_until_idle(self.nodes)

    def spawn_slurmd(self, k):
        n = self.nodes[k]
        cmd = [find_program("slurmd"), "-D", "-f", self.conf, "-N", n]
        self.spawn(f"slurmd-{n}", self.network.command(k, cmd) if self.network else cmd)

    def wait_until_idle(self, nodes, seconds=60):
        def idle():
            done = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10)
            states = dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)
            return done.returncode == 0 and all(states.get(n) == "idle" for n in nodes)

        self.wait_for(idle, seconds, f"node(s) {', '.join(nodes)} to be idle in sinfo")

    def restart_node(self, k):
        """Node k back after kill_node: its slurmd started again; it registers and returns to service
        (ReturnToService=2)."""
        old = self.procs.get(f"slurmd-{self.nodes[k]}")
        if old is not None:
            old.wait(timeout=20)  # killed: reaped here
        self.spawn_slurmd(k)
        self.wait_until_idle([self.nodes[k]], seconds=90)

    def spawn(self, name, cmd):
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen([str(c) for c in cmd], env=self.env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=die_with_parent)
        log.close()

    def stop_on_signals(self):
        """SIGTERM and SIGHUP raise KeyboardInterrupt in the test session (pytest then runs the fixtures'
        teardown, and with it stop()); the handlers before are restored by stop()."""
        if threading.current_thread() is not threading.main_thread():
            return
        def interrupt(signum, _frame):
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}: stopping the test cluster")
        self.previous_handlers = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def wait_for(self, condition, seconds, what, daemons_must_run=True):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead and daemons_must_run:
                pytest.fail(f"{', '.join(dead)} stopped while waiting for {what}\n" + self.diagnostics())
            time.sleep(0.5)
        pytest.fail(f"timed out after {seconds} s waiting for {what}\n" + self.diagnostics())

    def kill_node(self, k):
        """Node k dies: SIGKILL to everything in its namespace (slurmd, slurmstepd, the job's ranks)."""
        self.network.kill_all_in(self.network.namespaces[k])

    def stop(self):
        """Cancels what is left, stops the daemons by their PIDs, and removes the network (if any); a
        second SIGTERM or SIGHUP meanwhile is ignored, so that the cleanup runs to its end."""
        previous = getattr(self, "previous_handlers", {})
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            try:
                if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
                    subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True,
                                   timeout=20)
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline:
                        done = subprocess.run(["squeue", "-h"], env=self.env, capture_output=True, text=True,
                                              timeout=10)
                        if done.returncode != 0 or not done.stdout.strip():
                            break
                        time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass  # a controller that no longer answers: its daemons are stopped below all the same
            for name in reversed(list(self.procs)):
                proc = self.procs[name]
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            if self.network:  # whatever is left in a node (a job's orphans)
                for k in range(self.network.count):
                    self.kill_node(k)
        finally:
            try:
                if self.network:
                    self.network.remove()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                self.previous_handlers = {}
