"""``lastUsedAt`` of deployment keys, written behind and batched (DESIGN §1).

A request only records the key id in memory. A background task writes the newest time per key
every ``flush_interval_s`` in one statement batch, never moving a value backwards (several
gateways write the same rows). This write is not configuration: it appends no change event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime

from sqlalchemy import bindparam, or_, update
from sqlalchemy.ext.asyncio import AsyncEngine

from lorry.db.models import DeploymentKey
from lorry.db.types import utcnow

logger = logging.getLogger("lorry.gateway.last_used")

_UPDATE = (
    update(DeploymentKey)
    .where(DeploymentKey.id == bindparam("key_id"))
    .where(or_(DeploymentKey.last_used_at.is_(None), DeploymentKey.last_used_at < bindparam("used_at")))
    .values(last_used_at=bindparam("used_at"))
)


class LastUsedWriter:
    def __init__(
        self, engine: AsyncEngine, *, flush_interval_s: float = 5.0, max_pending: int = 100_000
    ) -> None:
        self._engine = engine
        self.flush_interval_s = flush_interval_s
        self._max_pending = max_pending
        self._pending: dict[str, datetime] = {}
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0
        self.rows_written = 0

    def touch(self, key_id: str) -> None:
        if len(self._pending) >= self._max_pending and key_id not in self._pending:
            return  # the database is away for long; a lost lastUsedAt beats unbounded memory
        self._pending[key_id] = utcnow()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lorry-last-used")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout=5.0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("lastUsedAt flush failed (will retry): %s", type(exc).__name__)

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        params = [{"key_id": key_id, "used_at": used_at} for key_id, used_at in batch.items()]
        try:
            async with self._engine.begin() as conn:
                await conn.execute(_UPDATE, params)
        except BaseException:
            for key_id, used_at in batch.items():  # keep what is newer than a later touch
                if key_id not in self._pending or self._pending[key_id] < used_at:
                    self._pending[key_id] = used_at
            raise
        self.flushes += 1
        self.rows_written += len(params)
