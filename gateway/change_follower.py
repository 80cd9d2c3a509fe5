"""Follows the change feed so the snapshot and key cache stay fresh (DESIGN §6).

- Every ``poll_interval_s`` (200 ms) it reads ``change_log`` after its cursor, in case a
  notification was lost; a wake-up (Postgres ``NOTIFY lorry_changes`` on a raw asyncpg connection,
  or :meth:`ChangeFollower.notify` from an in-process control plane) reads at once.
- Sequence numbers are gap-free and commit-ordered, so the first entry after the cursor must be
  ``cursor + 1``. Anything else means entries were trimmed while this process was away: it
  resynchronises fully. So it does after losing its ``LISTEN`` connection, and after the database
  was unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from lorry.changefeed import NOTIFY_CHANNEL, changes_after

logger = logging.getLogger("lorry.gateway.changes")


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    kind: str
    resource_id: str


ApplyChanges = Callable[[AsyncConnection, Sequence[Change]], Awaitable[None]]
Resync = Callable[[AsyncConnection], Awaitable[int]]  # returns the cursor the snapshot is at


def asyncpg_dsn(database_url: str) -> str | None:
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return None
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeFollower:
    def __init__(
        self,
        engine: AsyncEngine,
        database_url: str,
        *,
        apply: ApplyChanges,
        resync: Resync,
        poll_interval_s: float = 0.2,
        batch_size: int = 1000,
        listen: bool = True,
    ) -> None:
        self._engine = engine
        self._dsn = asyncpg_dsn(database_url) if listen else None
        self._apply = apply
        self._resync = resync
        self.poll_interval_s = poll_interval_s
        self._batch_size = batch_size
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listen_conn: asyncpg.Connection | None = None
        self._need_resync = True
        self.cursor = 0
        self.synced = False
        self.database_ok = False
        self.last_success = 0.0
        self.resyncs = 0
        self.polls = 0
        self.listening = False
        self._last_error_log = 0.0
        self._tick_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """One synchronisation attempt now (so a healthy start serves at once), then the loops."""
        self._loop = asyncio.get_running_loop()
        await self._tick()
        self._tasks.append(asyncio.create_task(self._run(), name="lorry-change-poll"))
        if self._dsn is not None:
            self._tasks.append(asyncio.create_task(self._listen_forever(), name="lorry-change-listen"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self._close_listener()

    def notify(self) -> None:
        """Wake the follower now: safe from this loop or from another thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    def request_resync(self) -> None:
        self._need_resync = True
        self.notify()

    # -- polling -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            await self._tick()

    async def sync_now(self) -> None:
        """Read the feed immediately (tests and the in-process hook use this to skip the wait)."""
        await self._tick()

    async def _tick(self) -> None:
        async with self._tick_lock:
            await self._tick_locked()

    async def _tick_locked(self) -> None:
        try:
            if self._need_resync:
                await self._full_resync()
            else:
                await self._read_changes()
            self.database_ok = True
            self.last_success = time.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Unknown what was missed while away: resynchronise once the database answers again.
            self._need_resync = True
            self.database_ok = False
            now = time.monotonic()
            if now - self._last_error_log > 10.0:
                self._last_error_log = now
                logger.warning("change feed unavailable: %s: %s", type(exc).__name__, exc)

    async def _full_resync(self) -> None:
        async with self._engine.connect() as conn:
            cursor = await self._resync(conn)
        self.cursor = cursor
        self._need_resync = False
        self.synced = True
        self.resyncs += 1

    async def _read_changes(self) -> None:
        while True:
            self.polls += 1
            async with AsyncSession(self._engine) as session:
                entries = [
                    Change(seq=int(entry.seq), kind=entry.kind, resource_id=entry.resource_id)
                    for entry in await changes_after(session, self.cursor, limit=self._batch_size)
                ]
                if entries and entries[0].seq != self.cursor + 1:
                    logger.info(
                        "change log trimmed past cursor %d (next %d): full resync",
                        self.cursor,
                        entries[0].seq,
                    )
                    self._need_resync = True
                    await session.rollback()
                    break
                if entries:
                    conn = await session.connection()
                    await self._apply(conn, entries)
                    self.cursor = entries[-1].seq
                await session.rollback()
            if len(entries) < self._batch_size:
                return
        await self._full_resync()

    # -- LISTEN (PostgreSQL) -----------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        assert self._dsn is not None
        backoff = self.poll_interval_s
        connected_before = False
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("LISTEN connect failed: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = self.poll_interval_s
            self._listen_conn = conn

            def on_notify(*_args: Any) -> None:
                self._wake.set()

            def on_terminated(*_args: Any, _lost: asyncio.Event = lost) -> None:
                _lost.set()

            try:
                conn.add_termination_listener(on_terminated)
                await conn.add_listener(NOTIFY_CHANNEL, on_notify)
                self.listening = True
                if connected_before:
                    # Notifications sent while we were not listening are gone: start over.
                    self.request_resync()
                connected_before = True
                while not lost.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(1.0):
                            await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("LISTEN connection failed: %s", exc)
            finally:
                self.listening = False
                await self._close_listener()
            logger.info("lost the LISTEN connection; reconnecting")
            self.request_resync()

    async def _close_listener(self) -> None:
        conn, self._listen_conn = self._listen_conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)
            if not conn.is_closed():
                conn.terminate()
