"""Energy per step from the powercap (RAPL) counters (common/energy.h, SPEC 6 /energy), against a fake
powercap tree that PB_POWERCAP_ROOT points the apps at (only tests set it).

The counted counters of the fake tree are FIFOs fed by the test, one value per read, the next value
only once the last one was read (so that no read sees two): the values the app reads are known exactly,
and a read the test did not expect blocks the run (the test fails by its time limit), a read too few
leaves values unread. The tree has two packages, the first with a core and a dram subzone, and a psys
zone: the node's energy is package-0 + package-0's dram + package-1 (core is inside its package, psys
covers the platform), one counter wraps at its max_energy_range_uj. Two ranks share the node and its
packages: the node's first rank reads them, once per read. Every value of /energy/rapl/joules and the
/summary figures equal what the fed values give.
"""

import fcntl
import os
import struct
import termios
import threading
import time

import h5py
import numpy as np
import pytest

from conftest import app_environment

STEPS, WARMUP = 4, 1
MODEL = ["--model", "tiny", "--steps", str(STEPS), "--warmup", str(WARMUP), "--micro-batch", "1"]
# Reads of each counted counter: one when the app looks for the counters, then two per step.
READS = 1 + 2 * STEPS


def make_zone(root, zone, name, max_range=None, energy=None):
    path = root / zone
    path.mkdir()
    (path / "name").write_text(name + "\n")
    if max_range is not None:
        (path / "max_energy_range_uj").write_text(f"{max_range}\n")
    if energy is not None:
        (path / "energy_uj").write_text(f"{energy}\n")
    return path


def bytes_waiting(fd):
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


class Feeder(threading.Thread):
    """Feeds `values` into the FIFO at `path`, one line at a time, each once the last was read."""

    def __init__(self, path, values):
        super().__init__(daemon=True)
        os.mkfifo(path)
        self.path, self.values, self.fed = path, values, 0
        self.fd = os.open(path, os.O_RDWR)  # held open: a reader never sees end-of-file between values

    def run(self):
        for v in self.values:
            os.write(self.fd, f"{v}\n".encode())
            while bytes_waiting(self.fd) > 0:
                time.sleep(0.0002)
            self.fed += 1


def rapl_delta(start, end, max_range):
    return end - start if end >= start else end + (max_range - start)


@pytest.fixture
def fake_tree(tmp_path):
    """A powercap tree with two packages; returns (root, feeders, expected joules per step)."""
    root = tmp_path / "powercap"
    root.mkdir()
    (root / "intel-rapl").mkdir()  # the control type, not a zone
    ranges = {"package-0": 262143328850, "package-0/dram": 65712999613, "package-1": 1000000}
    p0 = make_zone(root, "intel-rapl:0", "package-0", ranges["package-0"])
    make_zone(root, "intel-rapl:0:0", "core", 262143328850, energy=5)  # inside package-0: not counted
    d0 = make_zone(root, "intel-rapl:0:1", "dram", ranges["package-0/dram"])
    p1 = make_zone(root, "intel-rapl:1", "package-1", ranges["package-1"])
    make_zone(root, "intel-rapl:2", "psys", 262143328850, energy=7)  # the platform: not counted
    rng = np.random.default_rng(7)
    values = {}
    for name, start in (("package-0", 123456789), ("package-0/dram", 42), ("package-1", 975000)):
        steps = rng.integers(1000, 9000, size=READS - 1)
        seq = [start]
        for inc in steps:
            seq.append(int((seq[-1] + inc) % (ranges[name] + 1)) if name == "package-1" else int(seq[-1] + inc))
        values[name] = seq
    p1_seq = values["package-1"]
    assert any(p1_seq[2 + 2 * s] < p1_seq[1 + 2 * s] for s in range(STEPS)), "package-1 wraps inside a step"
    feeders = [Feeder(str(p0 / "energy_uj"), values["package-0"]),
               Feeder(str(d0 / "energy_uj"), values["package-0/dram"]),
               Feeder(str(p1 / "energy_uj"), values["package-1"])]
    expected = []
    for step in range(STEPS):
        start, end = 1 + 2 * step, 2 + 2 * step  # read 0 is the app's look for the counters
        uj = sum(rapl_delta(values[n][start], values[n][end], ranges[n]) for n in values)
        expected.append(uj * 1e-6)
    for f in feeders:
        f.start()
    return root, feeders, expected


def test_rapl_energy_of_a_node_shared_by_two_ranks(fake_tree, run_app, out_dir):
    root, feeders, expected = fake_tree
    out = out_dir / "energy.h5"
    rc, stdout, stderr = run_app("dp", 2, [*MODEL, "--out", out], timeout=60,
                                 env=app_environment({"PB_POWERCAP_ROOT": root}))
    assert rc == 0, stderr
    assert [f.fed for f in feeders] == [READS] * 3, "each counter read once at the start and twice per step"
    with h5py.File(out, "r") as f:
        rapl = f["energy/rapl"]
        assert rapl.attrs["available"] == 1 and rapl.attrs["columns"] == "nodes"
        assert list(rapl["read_by"][()]) == [0]
        assert rapl["detail"][0].decode() == "package-0 package-0/dram package-1"
        joules = rapl["joules"][()]
        assert joules.shape == (STEPS, 1) and rapl["joules"].attrs["units"] == "J"
        assert list(joules[:, 0]) == expected
        assert f["energy/nvml"].attrs["available"] == 0 and "energy/nvml/joules" not in f
        s = dict(f["summary"].attrs)
        times = f["steps/time_s"][()][:, 0]  # rank 0 reads the node's counters
        tokens_per_step = int(f["config"].attrs["global_batch"]) * int(f["config"].attrs["seq"])
    measured = expected[WARMUP:]
    per_step = sum(measured) / len(measured)
    assert s["energy_sources"] == "rapl"
    assert s["energy_rapl_j_per_step"] == pytest.approx(per_step, rel=1e-12)
    assert s["energy_j_per_step"] == pytest.approx(per_step, rel=1e-12)
    assert s["rapl_devices"] == 1
    assert s["power_rapl_w_per_device"] == pytest.approx(sum(measured) / times[WARMUP:].sum(), rel=1e-12)
    assert s["joules_per_token"] == pytest.approx(per_step / tokens_per_step, rel=1e-12)
    assert s["tokens_per_joule"] == pytest.approx(tokens_per_step / per_step, rel=1e-12)
    assert "energy per step (J)" in stdout and "tokens per joule" in stdout


def test_unreadable_counter_is_recorded_not_zero(tmp_path, run_app, out_dir):
    root = tmp_path / "powercap"
    root.mkdir()
    make_zone(root, "intel-rapl:0", "package-0", 262143328850, energy=1000)
    p1 = make_zone(root, "intel-rapl:1", "package-1", 262143328850)
    (p1 / "energy_uj").mkdir()  # a read fails (as a root-only energy_uj does for other users)
    out = out_dir / "unreadable.h5"
    rc, stdout, stderr = run_app("dp", 1, [*MODEL, "--out", out], env=app_environment({"PB_POWERCAP_ROOT": root}))
    assert rc == 0, stderr
    with h5py.File(out, "r") as f:
        rapl = f["energy/rapl"]
        assert rapl.attrs["available"] == 0
        assert "intel-rapl:1/energy_uj" in rapl.attrs["reason"] and "Is a directory" in rapl.attrs["reason"]
        assert "energy/rapl/joules" not in f
        s = dict(f["summary"].attrs)
    assert s["energy_sources"] == ""
    assert np.isnan(s["energy_j_per_step"]) and np.isnan(s["tokens_per_joule"])
    assert "rapl: no counter" in stdout


def test_no_powercap_at_all(tmp_path, run_app, out_dir):
    out = out_dir / "none.h5"
    rc, _, stderr = run_app("dp", 1, [*MODEL, "--out", out],
                            env=app_environment({"PB_POWERCAP_ROOT": tmp_path / "absent"}))
    assert rc == 0, stderr
    with h5py.File(out, "r") as f:
        assert f["energy/rapl"].attrs["reason"] == f"no counter: no {tmp_path / 'absent'}"
        assert f["energy/nvml"].attrs["available"] == 0
