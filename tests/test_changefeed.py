"""The change feed (DESIGN §6): gap-free, commit-ordered sequence numbers on PostgreSQL and SQLite.

A reader polls ``changes_after(last_seen)`` and advances its cursor to the largest seq it saw. That
is only correct if no smaller seq can become visible later. Appends are serialised by the
``change_counter`` row (``UPDATE … RETURNING``): the row lock is held until the writing transaction
ends, so a second writer blocks until the first commits (and then gets n+1) or rolls back (and then
gets n itself, because the rolled-back increment is undone). Readers therefore never see a gap.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import asyncpg
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from lorry.changefeed import (
    CHANGED_FLAG,
    NOTIFY_CHANNEL,
    ChangeKind,
    append_change,
    changes_after,
    oldest_retained_seq,
    trim_before,
)
from lorry.db.engine import create_engine, create_sessionmaker
from lorry.db.models import ChangeCounter, ChangeLogEntry
from lorry.db.types import new_id, utcnow
from tests.support.databases import PostgresTemplate, SqliteTemplate

Templates = dict[str, PostgresTemplate | SqliteTemplate]
Maker = async_sessionmaker[AsyncSession]
# How long a blocked writer is given to (wrongly) get through before we call it blocked.
BLOCK_PROBE_S = 0.5


@pytest.fixture
def feed_url(backend: str, db_templates: Templates) -> str:
    return db_templates[backend].fresh()


@pytest.fixture
async def engine(feed_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(feed_url)
    try:
        yield made
    finally:
        await made.dispose()


@pytest.fixture
def maker(engine: AsyncEngine) -> Maker:
    return create_sessionmaker(engine)


@pytest.fixture
async def reader(feed_url: str) -> AsyncIterator[Maker]:
    """A separate engine for readers, like a gateway: on SQLite the writer's engine has one connection."""
    made = create_engine(feed_url)
    try:
        yield create_sessionmaker(made)
    finally:
        await made.dispose()


async def _seen(maker: Maker, after: int = 0) -> list[int]:
    async with maker() as session:
        return [entry.seq for entry in await changes_after(session, after)]


async def _counter(maker: Maker) -> int:
    async with maker() as session:
        return int((await session.execute(select(ChangeCounter.value))).scalar_one())


async def _append_and_commit(maker: Maker, resource_id: str) -> int:
    async with maker() as session, session.begin():
        return await append_change(session, ChangeKind.DEPLOYMENT, resource_id)


async def _until(condition: Callable[[], bool], polling: asyncio.Task[None]) -> None:
    """Wait for the poller to catch up; its own assertion failures surface here instead of hanging."""
    async with asyncio.timeout(10):
        while not condition():
            if polling.done():
                await polling
                raise AssertionError("the poller stopped early")
            await asyncio.sleep(0.01)


async def _blocked_on_lock(maker: Maker, task: asyncio.Task[int]) -> None:
    """``task`` has not returned after a while; on PostgreSQL, prove it is waiting on a row lock."""
    done, _ = await asyncio.wait({task}, timeout=BLOCK_PROBE_S)
    assert not done, "a second writer appended while the first transaction was still open"
    if maker.kw["bind"].dialect.name == "postgresql":
        async with maker() as session:
            waiting = (
                await session.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE change_counter%'"
                    )
                )
            ).scalar_one()
        assert waiting == 1


async def test_every_append_gets_the_next_sequence_number(maker: Maker) -> None:
    assert await _counter(maker) == 0
    assert await _seen(maker) == []
    resources = [new_id() for _ in range(7)]
    got: list[int] = []
    # One change per transaction, then several in one transaction.
    for resource in resources[:3]:
        got.append(await _append_and_commit(maker, resource))
    async with maker() as session, session.begin():
        for resource in resources[3:]:
            got.append(await append_change(session, ChangeKind.DEPLOYMENT_KEY, resource))
        assert session.info[CHANGED_FLAG] is True
    assert got == list(range(1, 8))
    assert await _counter(maker) == 7

    async with maker() as session:
        entries = await changes_after(session, 0)
        assert [(e.seq, e.resource_id) for e in entries] == list(zip(got, resources, strict=True))
        assert [e.kind for e in entries] == ["deployment"] * 3 + ["deployment_key"] * 4
        assert all(e.created_at.utcoffset() == timedelta(0) for e in entries)
        assert [e.seq for e in await changes_after(session, 4)] == [5, 6, 7]
        assert [e.seq for e in await changes_after(session, 2, limit=2)] == [3, 4]
        assert await changes_after(session, 7) == []


async def test_lower_sequence_number_committing_last_is_never_skipped(maker: Maker, reader: Maker) -> None:
    """T1 takes n and stays open; T2 cannot take n+1 (let alone commit it) before T1 commits."""
    seen: list[int] = []
    batches: list[list[int]] = []
    stop = asyncio.Event()

    async def poller() -> None:
        last_seen = 0
        while not stop.is_set():
            batch = await _seen(reader, last_seen)
            if batch:
                batches.append(batch)
                seen.extend(batch)
                last_seen = batch[-1]
            await asyncio.sleep(0.01)

    base = await _append_and_commit(maker, new_id())
    polling = asyncio.create_task(poller())
    t1 = maker()
    try:
        await t1.begin()
        n = await append_change(t1, ChangeKind.DEPLOYMENT, new_id())
        assert n == base + 1
        t2 = asyncio.create_task(_append_and_commit(maker, new_id()))
        await _blocked_on_lock(reader, t2)
        assert await _seen(reader, base) == []  # neither n nor anything above it is visible
        await t1.commit()
    finally:
        await t1.close()
    assert await asyncio.wait_for(t2, 10) == n + 1
    await _until(lambda: seen[-1:] == [n + 1], polling)
    stop.set()
    await polling
    assert seen == [base, n, n + 1]
    assert all(b == list(range(b[0], b[0] + len(b))) for b in batches)


async def test_rolled_back_append_leaves_no_gap(maker: Maker, reader: Maker) -> None:
    """T1 takes n and rolls back: the increment is undone, so the blocked T2 gets n itself."""
    base = await _append_and_commit(maker, new_id())
    t1 = maker()
    try:
        await t1.begin()
        n = await append_change(t1, ChangeKind.ENGINE, "rolled-back")
        assert n == base + 1
        t2 = asyncio.create_task(_append_and_commit(maker, "committed"))
        await _blocked_on_lock(reader, t2)
        assert await _seen(reader, base) == []
        await t1.rollback()
    finally:
        await t1.close()
    assert await asyncio.wait_for(t2, 10) == n  # reused: n was never visible to anyone
    async with maker() as session:
        entries = await changes_after(session, 0)
    assert [(e.seq, e.resource_id) for e in entries] == [(base, entries[0].resource_id), (n, "committed")]
    assert await _counter(maker) == n


async def test_concurrent_writers_and_a_poller_see_a_gap_free_sequence(maker: Maker, reader: Maker) -> None:
    writers, per_writer = 6, 6
    seen: list[int] = []
    stop = asyncio.Event()
    rng = random.Random(1234)
    delays = [[rng.uniform(0, 0.01) for _ in range(per_writer)] for _ in range(writers)]

    async def poller() -> None:
        last_seen = 0
        while not stop.is_set():
            batch = await _seen(reader, last_seen)
            if batch:
                # Every batch continues exactly where the cursor stopped: nothing appears behind it.
                assert batch == list(range(last_seen + 1, last_seen + 1 + len(batch)))
                seen.extend(batch)
                last_seen = batch[-1]
            await asyncio.sleep(0.005)

    async def writer(index: int) -> list[int]:
        got = []
        for step in range(per_writer):
            async with maker() as session, session.begin():
                got.append(await append_change(session, ChangeKind.JOB, new_id()))
                await asyncio.sleep(delays[index][step])  # hold the transaction open a little
                if step % 3 == 2:  # and some appends roll back
                    await session.rollback()
                    got.pop()
        return got

    polling = asyncio.create_task(poller())
    results = await asyncio.wait_for(asyncio.gather(*(writer(i) for i in range(writers))), 60)
    committed = sorted(seq for got in results for seq in got)
    total = writers * per_writer * 2 // 3
    assert committed == list(range(1, total + 1))
    await _until(lambda: len(seen) >= total, polling)
    stop.set()
    await polling
    assert seen == committed


@pytest.mark.parametrize("backend", ["postgres"])
async def test_postgres_notify_is_delivered_on_commit_only(maker: Maker, feed_url: str) -> None:
    dsn = feed_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    listener = await asyncpg.connect(dsn)
    received: asyncio.Queue[str] = asyncio.Queue()

    def on_notify(_conn: object, _pid: int, channel: str, payload: str) -> None:
        assert channel == NOTIFY_CHANNEL
        received.put_nowait(payload)

    try:
        await listener.add_listener(NOTIFY_CHANNEL, on_notify)
        async with maker() as session:
            await session.begin()
            await append_change(session, ChangeKind.DEPLOYMENT, new_id())
            await asyncio.sleep(BLOCK_PROBE_S)
            assert received.empty()  # not before commit
            await session.rollback()
        await asyncio.sleep(BLOCK_PROBE_S)
        assert received.empty()  # never for a rolled-back transaction

        async with maker() as session:
            await session.begin()
            seq = await append_change(session, ChangeKind.DEPLOYMENT, new_id())
            await asyncio.sleep(BLOCK_PROBE_S)
            assert received.empty()
            await session.commit()
        assert seq == 1  # the rolled-back increment was undone
        assert await asyncio.wait_for(received.get(), 5) == str(seq)
        await asyncio.sleep(0.2)
        assert received.empty()  # exactly one notification
    finally:
        await listener.close()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_single_writer_serialises_appends(maker: Maker, reader: Maker, feed_url: str) -> None:
    """One engine has one connection: a second session waits for it, and seq order is commit order."""
    t1 = maker()
    try:
        await t1.begin()
        n = await append_change(t1, ChangeKind.DEPLOYMENT, new_id())
        t2 = asyncio.create_task(_append_and_commit(maker, new_id()))
        await _blocked_on_lock(reader, t2)
        assert await _seen(reader) == []
        await t1.commit()
    finally:
        await t1.close()
    assert (n, await asyncio.wait_for(t2, 10)) == (1, 2)

    # A second engine on the same file (another process, say) is held off by SQLite's write lock.
    other = create_engine(feed_url)
    try:
        other_maker = create_sessionmaker(other)
        t1 = maker()
        try:
            await t1.begin()
            n = await append_change(t1, ChangeKind.DEPLOYMENT, new_id())
            t2 = asyncio.create_task(_append_and_commit(other_maker, new_id()))
            await _blocked_on_lock(reader, t2)
            assert await _seen(reader, 2) == []
            await t1.commit()
        finally:
            await t1.close()
        assert (n, await asyncio.wait_for(t2, 15)) == (3, 4)
        assert await _seen(other_maker) == [1, 2, 3, 4]
    finally:
        await other.dispose()


async def test_trim_before_and_oldest_retained_seq(maker: Maker) -> None:
    async with maker() as session:
        assert await oldest_retained_seq(session) is None
    seqs = [await _append_and_commit(maker, new_id()) for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    now = utcnow()
    async with maker() as session, session.begin():
        await session.execute(
            update(ChangeLogEntry).where(ChangeLogEntry.seq <= 3).values(created_at=now - timedelta(hours=2))
        )
    async with maker() as session:
        assert await oldest_retained_seq(session) == 1

    async with maker() as session, session.begin():
        assert await trim_before(session, now - timedelta(hours=3)) == 0
        assert await trim_before(session, now - timedelta(hours=1)) == 3
    async with maker() as session:
        assert await oldest_retained_seq(session) == 4
        assert [e.seq for e in await changes_after(session, 0)] == [4, 5]
    # A reader whose cursor (say 2) is older than the oldest retained entry (4) cannot follow the log
    # any more: 3 is gone. That is what oldest_retained_seq() > cursor + 1 tells it.

    # Trimming never rewinds the counter: the next change is 6, not 4.
    assert await _append_and_commit(maker, new_id()) == 6

    # Even when every entry is old, the newest one is kept: a lagging reader must still see that it
    # is behind (with an empty log and cursor 3, "nothing after 3" would look up to date).
    async with maker() as session, session.begin():
        await session.execute(update(ChangeLogEntry).values(created_at=now - timedelta(days=30)))
    async with maker() as session, session.begin():
        assert await trim_before(session, now) == 2
    async with maker() as session:
        assert await oldest_retained_seq(session) == 6
        assert [e.seq for e in await changes_after(session, 3)] == [6]
