"""Machine stalls: this test machine (a virtual machine) now and then freezes every process for
seconds at a time (seen: 1 s to 11 s, a sleeping ``python3`` and two gateways' watchdog threads
frozen alike, most often while vLLM engines start). A test that measures a deadline or a
latency cannot pass through that.

A watcher process sleeps 50 ms at a time and writes down every gap longer than
:data:`NOTE_AFTER_S` (CLOCK_MONOTONIC is one clock for every process). A test that fails while a
stall of at least :data:`RERUN_AFTER_S` happened during it is run once more (pytest-rerunfailures'
``flaky`` marker with a condition): a failure without such a stall, or a second failure, stands.
The terminal summary lists every stall and which tests were run again.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NOTE_AFTER_S = 0.5
RERUN_AFTER_S = 1.0

_WATCHER = f"""
import sys, time
out = open(sys.argv[1], "a", buffering=1)
last = time.monotonic()
while True:
    time.sleep(0.05)
    now = time.monotonic()
    if now - last > {NOTE_AFTER_S}:
        out.write(f"{{last}} {{now}}\\n")
    last = now
"""


@dataclass
class _Session:
    log: Path | None = None
    watcher: subprocess.Popen[bytes] | None = None
    test_started: float | None = None
    test_id: str = ""
    reruns: list[tuple[str, float]] = field(default_factory=list)


_state = _Session()


def stalls_since(started: float) -> list[tuple[float, float]]:
    """(began, ended) of every stall that ended after ``started`` (monotonic seconds)."""
    if _state.log is None or not _state.log.exists():
        return []
    found: list[tuple[float, float]] = []
    for line in _state.log.read_text(encoding="utf-8").splitlines():
        began, _, ended = line.partition(" ")
        try:
            stall = (float(began), float(ended))
        except ValueError:
            continue
        if stall[1] >= started:
            found.append(stall)
    return found


def _longest_stall_in_this_test() -> float:
    if _state.test_started is None:
        return 0.0
    return max((ended - began for began, ended in stalls_since(_state.test_started)), default=0.0)


def stalled_during_this_test(_error: BaseException | None = None) -> bool:
    """The rerun condition: a stall of RERUN_AFTER_S or more since the current test began.
    (pytest-rerunfailures asks it after passing runs too: what was run again is noted from the
    reports, in :func:`pytest_runtest_logreport`.)"""
    return _longest_stall_in_this_test() >= RERUN_AFTER_S


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    rerun = str(report.outcome) == "rerun"  # pytest-rerunfailures' outcome, beyond pytest's Literal
    if rerun and report.nodeid not in (test_id for test_id, _ in _state.reruns[-1:]):
        _state.reruns.append((report.nodeid, _longest_stall_in_this_test()))


def pytest_sessionstart(session: pytest.Session) -> None:
    _state.log = Path(tempfile.mkdtemp(prefix="lorry-stalls-")) / "stalls.txt"
    _state.log.touch()
    _state.watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(_state.log)], stdin=subprocess.DEVNULL
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _state.watcher is not None:
        _state.watcher.terminate()
        _state.watcher.wait(5)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.flaky(reruns=1, condition=stalled_during_this_test))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _state.test_started = time.monotonic()
    _state.test_id = item.nodeid


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stalls = stalls_since(0.0)
    if not stalls and not _state.reruns:
        return
    terminalreporter.section("machine stalls")
    lengths = sorted((ended - began for began, ended in stalls), reverse=True)
    terminalreporter.write_line(
        f"a watcher process sleeping 50 ms woke over {NOTE_AFTER_S} s late {len(stalls)} time(s); longest: "
        + ", ".join(f"{length:.1f} s" for length in lengths[:8])
    )
    for test_id, longest in _state.reruns:
        terminalreporter.write_line(f"run again after a {longest:.1f} s stall: {test_id}")
