"""The change feed (DESIGN §6): every configuration write appends here in its own transaction.

Appends bump one counter row with ``UPDATE … RETURNING``. The row lock is held until the writing
transaction ends, so appends are serialised and sequence numbers become visible in commit order:
a reader that has seen ``seq = n`` never later sees a smaller one appear.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from lorry.db.models import ChangeCounter, ChangeLogEntry

NOTIFY_CHANNEL = "lorry_changes"
# Set on a session that appended a change, so whoever commits it can wake local readers.
CHANGED_FLAG = "lorry.changed"
COUNTER_ID = 1


class ChangeKind(enum.StrEnum):
    ORG = "org"
    PROJECT = "project"
    ADMIN_TOKEN = "admin_token"
    DEPLOYMENT = "deployment"
    DEPLOYMENT_KEY = "deployment_key"
    JOB = "job"
    ENGINE = "engine"


async def append_change(session: AsyncSession, kind: ChangeKind, resource_id: str) -> int:
    """Record one configuration change inside the caller's transaction; returns its seq."""
    seq = (
        await session.execute(
            update(ChangeCounter)
            .where(ChangeCounter.id == COUNTER_ID)
            .values(value=ChangeCounter.value + 1)
            .returning(ChangeCounter.value)
        )
    ).scalar_one()
    session.add(ChangeLogEntry(seq=seq, kind=kind.value, resource_id=resource_id))
    session.info[CHANGED_FLAG] = True
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        # Delivered at commit, never for a rolled-back transaction.
        await session.execute(
            text("SELECT pg_notify(:channel, :payload)"), {"channel": NOTIFY_CHANNEL, "payload": str(seq)}
        )
    return int(seq)


async def changes_after(session: AsyncSession, seq: int, limit: int = 1000) -> Sequence[ChangeLogEntry]:
    result = await session.execute(
        select(ChangeLogEntry).where(ChangeLogEntry.seq > seq).order_by(ChangeLogEntry.seq).limit(limit)
    )
    return result.scalars().all()


async def oldest_retained_seq(session: AsyncSession) -> int | None:
    result = await session.execute(select(ChangeLogEntry.seq).order_by(ChangeLogEntry.seq).limit(1))
    return result.scalar_one_or_none()


async def trim_before(session: AsyncSession, cutoff: datetime) -> int:
    """Drop entries older than ``cutoff``; readers behind the oldest kept entry resynchronise.

    The newest entry is always kept, however old: with an empty log a reader whose cursor is behind
    could not tell that it missed changes (``oldest_retained_seq`` would be None).
    """
    newest = select(func.max(ChangeLogEntry.seq)).scalar_subquery()
    result = await session.execute(
        delete(ChangeLogEntry).where(ChangeLogEntry.created_at < cutoff, ChangeLogEntry.seq < newest)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
