"""analysis.results.load reads each file in a child process: a file that crashes the HDF5 library (a
segmentation fault, not an exception) is reported as unreadable, and the caller lives on."""

import faulthandler
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from analysis import results  # noqa: E402


def test_a_crash_while_reading_is_a_result_error(monkeypatch, tmp_path):
    monkeypatch.setattr(results, "_load", lambda path: os.kill(os.getpid(), signal.SIGSEGV))
    handler_was_on = faulthandler.is_enabled()
    faulthandler.disable()  # pytest's crash dump of the child would be noise here
    try:
        with pytest.raises(results.ResultError, match=r"cannot read \(the HDF5 library crashed reading it: exit code -11\)"):
            results.load(tmp_path / "any.h5")
    finally:
        if handler_was_on:
            faulthandler.enable()


def test_a_bug_while_reading_is_raised_with_its_traceback(monkeypatch, tmp_path):
    def broken(path):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(results, "_load", broken)
    with pytest.raises(RuntimeError, match="ZeroDivisionError: a bug"):
        results.load(tmp_path / "any.h5")


def test_not_a_result_is_a_result_error(tmp_path):
    path = tmp_path / "empty.h5"
    path.write_bytes(b"")
    with pytest.raises(results.ResultError, match="cannot open as HDF5"):
        results.load(path)
