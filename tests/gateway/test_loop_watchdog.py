"""The event-loop watchdog: a blocked loop is logged with its stack, and its lag measured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.loop_watchdog import STALL_MARKER, LoopWatchdog


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def loop_log() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("lorry.gateway.loop")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def a_blocking_call_on_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # what the watchdog is for: a synchronous call on the event loop


@contextlib.asynccontextmanager
async def watched(warn_after_s: float) -> AsyncIterator[list[float]]:
    """A watchdog ticking every 50 ms while inside; yields the lags it measured."""
    lags: list[float] = []
    watchdog = LoopWatchdog(warn_after_s=warn_after_s, interval_s=0.05, observe_lag=lags.append)
    watchdog.start()
    try:
        yield lags
    finally:
        await watchdog.stop()


async def test_a_blocked_loop_is_logged_with_its_stack_and_its_length(loop_log: Lines) -> None:
    async with watched(warn_after_s=0.3) as lags:
        await asyncio.sleep(0.2)
        assert loop_log.lines == []  # a loop that runs is not reported
        a_blocking_call_on_the_loop(0.8)
        await asyncio.sleep(0.2)
    stalls = [line for line in loop_log.lines if line.startswith(STALL_MARKER)]
    assert len(stalls) == 2, loop_log.lines  # one warning while blocked, one when it ran again
    assert "so far; the loop thread is running" in stalls[0]
    assert "a_blocking_call_on_the_loop" in stalls[0] and "time.sleep(seconds)" in stalls[0]
    ran_again = float(stalls[1].split("after ")[1].split(" s")[0])
    assert 0.7 <= ran_again < 2.0, stalls[1]
    assert max(lags) >= 0.7 and min(lags) < 0.1, lags


async def test_short_pauses_are_measured_but_not_logged(loop_log: Lines) -> None:
    async with watched(warn_after_s=1.0) as lags:
        await asyncio.sleep(0.1)
        a_blocking_call_on_the_loop(0.3)
        await asyncio.sleep(0.15)
    assert loop_log.lines == []
    assert max(lags) >= 0.2, lags


async def test_zero_turns_the_watchdog_off(loop_log: Lines) -> None:
    async with watched(warn_after_s=0) as lags:
        a_blocking_call_on_the_loop(0.2)
        await asyncio.sleep(0.1)
    assert lags == [] and loop_log.lines == []
