"""Noticing a blocked event loop: a ticker on the loop and a watchdog thread beside it.

One event loop serves every request of a gateway, so one blocking call on it (a synchronous DNS
lookup, a CPU-heavy parse, a slow log handler) stalls every stream, health check and probe at
once. The ticker measures how late each of its ticks runs (the lag, exported as a histogram). The
thread keeps running while the loop is blocked: once a stall passes ``warn_after_s`` it logs the
loop thread's current stack (code lines only, never local values), and when the loop runs again
the ticker logs how long the stall lasted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

logger = logging.getLogger("lorry.gateway.loop")

STALL_MARKER = "event loop blocked"


class LoopWatchdog:
    def __init__(
        self,
        *,
        warn_after_s: float,
        interval_s: float = 0.1,
        observe_lag: Callable[[float], None] | None = None,
    ) -> None:
        self.warn_after_s = warn_after_s
        self.interval_s = interval_s
        self._observe_lag = observe_lag
        self._beat = time.monotonic()
        self._warned_at: float | None = None  # the beat the thread warned about
        self._loop_thread_id: int | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Called on the loop to watch; a ``warn_after_s`` of 0 turns the watchdog off."""
        if self.warn_after_s <= 0 or self._ticker is not None:
            return
        self._loop_thread_id = threading.get_ident()
        self._beat = time.monotonic()
        self._stop.clear()
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="lorry-loop-ticker")
        self._thread = threading.Thread(target=self._watch, name="lorry-loop-watchdog", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, loop.time() - due)
            warned, beat = self._warned_at, self._beat
            self._beat = time.monotonic()
            if warned is not None and warned == beat:
                self._warned_at = None
                logger.warning("%s: it ran again after %.2f s", STALL_MARKER, self._beat - beat)
            if self._observe_lag is not None:
                self._observe_lag(lag)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            beat = self._beat
            stalled = time.monotonic() - beat
            if stalled < self.warn_after_s or self._warned_at == beat:
                continue
            self._warned_at = beat
            logger.warning(
                "%s for %.2f s so far; the loop thread is running:\n%s",
                STALL_MARKER,
                stalled,
                self._loop_stack(),
            )

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread_id or -1)
        if frame is None:
            return "  (the loop thread is gone)"
        return "".join(traceback.format_stack(frame)).rstrip()
