"""Machine stalls: on this test machine a process that is ready to run sometimes waits seconds for
a CPU (seen: 1 s to 11 s). Earlier sessions took these for the virtual machine freezing; the
watcher's own run-queue time (``/proc/self/schedstat``) showed the waits, and the main cause, vLLM
engine processes left free to run on the other core, is now removed (``RunningEngine.pin``). A
test that measures a deadline or a latency cannot pass through a stall of seconds.

A watcher process sleeps 50 ms at a time and writes down every gap longer than
:data:`NOTE_AFTER_S` (CLOCK_MONOTONIC is one clock for every process), with how much of it it spent
ready to run but waiting for a CPU. A test that fails while a stall of at least
:data:`RERUN_AFTER_S` happened during it is run once more (pytest-rerunfailures' ``flaky`` marker
with a condition): a failure without such a stall, or a second failure, stands. The terminal
summary lists every stall and which tests were run again.
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
def queued():
    with open("/proc/self/schedstat") as stat:
        return int(stat.read().split()[1]) / 1e9
last, waited = time.monotonic(), queued()
while True:
    time.sleep(0.05)
    now, now_waited = time.monotonic(), queued()
    if now - last > {NOTE_AFTER_S}:
        out.write(f"{{last}} {{now}} {{now_waited - waited}}\\n")
    last, waited = now, now_waited
"""


@dataclass
class _Session:
    log: Path | None = None
    watcher: subprocess.Popen[bytes] | None = None
    test_started: float | None = None
    test_id: str = ""
    reruns: list[tuple[str, float]] = field(default_factory=list)


_state = _Session()


@dataclass(frozen=True)
class Stall:
    began: float
    ended: float
    queued: float  # of which the watcher was ready to run, waiting for a CPU

    @property
    def length(self) -> float:
        return self.ended - self.began


def stalls_since(started: float) -> list[Stall]:
    """Every stall that ended after ``started`` (monotonic seconds)."""
    if _state.log is None or not _state.log.exists():
        return []
    found: list[Stall] = []
    for line in _state.log.read_text(encoding="utf-8").splitlines():
        try:
            stall = Stall(*(float(value) for value in line.split()))
        except (TypeError, ValueError):
            continue
        if stall.ended >= started:
            found.append(stall)
    return found


def _longest_stall_in_this_test() -> float:
    if _state.test_started is None:
        return 0.0
    return max((stall.length for stall in stalls_since(_state.test_started)), default=0.0)


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
    worst = sorted(stalls, key=lambda stall: stall.length, reverse=True)[:8]
    terminalreporter.write_line(
        f"a watcher process sleeping 50 ms woke over {NOTE_AFTER_S} s late {len(stalls)} time(s); longest: "
        + ", ".join(f"{stall.length:.1f} s ({stall.queued:.1f} s waiting for a CPU)" for stall in worst)
    )
    for test_id, longest in _state.reruns:
        terminalreporter.write_line(f"run again after a {longest:.1f} s stall: {test_id}")
