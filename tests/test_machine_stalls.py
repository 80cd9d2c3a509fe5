"""The rerun-after-a-machine-stall rule (tests/machine_stalls.py), in a pytest run of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

INNER = """
import os, signal, time
from tests import machine_stalls

attempts = []

def test_fails_once_while_the_machine_stalls():
    attempts.append(1)
    if len(attempts) == 1:
        watcher = machine_stalls._state.watcher.pid
        os.kill(watcher, signal.SIGSTOP)  # what a frozen machine looks like to the watcher
        time.sleep(2.5)
        os.kill(watcher, signal.SIGCONT)
        time.sleep(0.3)
        assert False, "failed during a stall"

def test_fails_without_a_stall():
    attempts.append(2)
    assert False, "a plain failure"

def test_passes_through_a_stall():
    watcher = machine_stalls._state.watcher.pid
    os.kill(watcher, signal.SIGSTOP)
    time.sleep(1.5)
    os.kill(watcher, signal.SIGCONT)
    time.sleep(0.3)
"""


def test_only_a_failure_during_a_stall_is_run_again(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest('pytest_plugins = ["tests.machine_stalls"]')
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(passed=2, failed=1)
    output = result.stdout.str()
    assert "1 failed, 2 passed, 1 rerun" in output
    assert "run again after a 2." in output and "test_fails_once_while_the_machine_stalls" in output
    assert "test_passes_through_a_stall" not in output  # a pass is not listed as run again
    assert "a plain failure" in output
