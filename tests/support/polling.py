"""Waiting for something to become true, and measuring how long it took."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass


async def until(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, interval: float = 0.01
) -> float:
    """Seconds until ``check()`` holds (a plain or an awaitable answer), polled every ``interval``;
    fails the test when a check begun after ``timeout`` still fails (a check that was under way
    when the deadline passed, perhaps slowed by a stalled machine, does not decide)."""
    started = time.monotonic()
    while True:
        began = time.monotonic()
        value = check()
        if not isinstance(value, bool):
            value = await value
        if value:
            return time.monotonic() - started
        if began - started > timeout:
            raise AssertionError(f"not observed within {timeout} s")
        await asyncio.sleep(interval)


@dataclass
class LoopLag:
    worst: float = 0.0


@contextlib.asynccontextmanager
async def loop_lag(interval: float = 0.05) -> AsyncIterator[LoopLag]:
    """How late, at worst, a timer on the test's own event loop ran while inside (a stalled test
    loop makes a server look slow)."""
    lag = LoopLag()
    loop = asyncio.get_running_loop()

    async def tick() -> None:
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            lag.worst = max(lag.worst, loop.time() - due)

    ticker = asyncio.create_task(tick())
    try:
        yield lag
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
