"""Waiting for something to become true, and measuring how long it took."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def until(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, interval: float = 0.01
) -> float:
    """Seconds until ``check()`` holds (a plain or an awaitable answer), polled every ``interval``;
    fails the test after ``timeout``."""
    started = time.monotonic()
    while True:
        value = check()
        if not isinstance(value, bool):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not observed within {timeout} s")
        await asyncio.sleep(interval)
