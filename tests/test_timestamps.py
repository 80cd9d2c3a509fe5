"""Timestamps are timezone-aware UTC on PostgreSQL and SQLite alike (DESIGN §3)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select, text
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from lorry.db.engine import create_engine
from lorry.db.types import UTCDateTime, isoformat, utcnow
from tests.support.databases import PostgresTemplate, SqliteTemplate

Templates = dict[str, PostgresTemplate | SqliteTemplate]
WIRE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
IST = timezone(timedelta(hours=5, minutes=30))
PST = timezone(timedelta(hours=-8))
NEW_YORK = ZoneInfo("America/New_York")

probe_metadata = MetaData()
probe = Table(
    "timestamp_probe",
    probe_metadata,
    Column("id", Integer, primary_key=True),
    Column("at", UTCDateTime(), nullable=True),
)


@pytest.fixture
def probe_url(backend: str, db_templates: Templates) -> str:
    return db_templates[backend].fresh()  # sync: it may run asyncio.run() itself


@pytest.fixture
async def engine(probe_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(probe_url)
    async with made.begin() as connection:
        await connection.run_sync(probe_metadata.create_all)
    try:
        yield made
    finally:
        await made.dispose()


async def _store(engine: AsyncEngine, values: list[datetime | None]) -> list[datetime | None]:
    async with engine.begin() as connection:
        start = (await connection.execute(select(func.coalesce(func.max(probe.c.id), 0)))).scalar_one()
        ids = list(range(start + 1, start + 1 + len(values)))
        await connection.execute(
            insert(probe), [{"id": i, "at": v} for i, v in zip(ids, values, strict=True)]
        )
    async with engine.connect() as connection:
        rows = (await connection.execute(select(probe.c.id, probe.c.at).where(probe.c.id.in_(ids)))).all()
    by_id = {row.id: row.at for row in rows}
    return [by_id[i] for i in ids]


async def test_values_come_back_aware_utc_and_equal(engine: AsyncEngine) -> None:
    moment = datetime(2024, 3, 10, 6, 59, 58, 123456, tzinfo=UTC)
    values: list[datetime | None] = [
        moment,
        moment.astimezone(IST),
        moment.astimezone(PST),
        moment.astimezone(NEW_YORK),  # 01:59:58 EST, a minute before the DST jump
        datetime(2024, 11, 3, 1, 30, fold=1, tzinfo=NEW_YORK),  # the second 01:30 (EST)
        None,
    ]
    stored = await _store(engine, values)
    assert stored[-1] is None
    for original, back in zip(values[:-1], stored[:-1], strict=True):
        assert back is not None and original is not None
        assert back.tzinfo is not None and back.utcoffset() == timedelta(0), back
        assert back.tzinfo == UTC
        # The same instant, microseconds included. (Compared in UTC: PEP 495 makes an ambiguous
        # wall time with fold=1 unequal to every datetime of another zone.)
        assert back == original.astimezone(UTC)
        assert back.replace(tzinfo=None) == original.astimezone(UTC).replace(tzinfo=None)
    assert stored[4] == datetime(2024, 11, 3, 6, 30, tzinfo=UTC)


async def test_naive_datetimes_are_refused_on_bind(engine: AsyncEngine) -> None:
    with pytest.raises(StatementError) as raised:
        await _store(engine, [datetime(2024, 1, 1, 12, 0)])
    assert isinstance(raised.value.orig, ValueError)
    assert "naive" in str(raised.value.orig)
    # In a WHERE clause too, not only on insert.
    async with engine.connect() as connection:
        with pytest.raises(StatementError):
            await connection.execute(select(probe).where(probe.c.at < datetime(2024, 1, 1)))
    async with engine.connect() as connection:
        assert (await connection.execute(select(func.count()).select_from(probe))).scalar_one() == 0


async def test_comparisons_are_made_in_utc(engine: AsyncEngine) -> None:
    """On SQLite the values are stored as text: they must be normalised to UTC to compare right."""
    base = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    # Wall-clock order (local digits) differs from instant order for these three.
    early_ist = (base - timedelta(hours=1)).astimezone(IST)  # 16:30 local, 11:00 UTC
    middle_pst = base.astimezone(PST)  # 04:00 local, 12:00 UTC
    late_utc = base + timedelta(hours=1)  # 13:00 UTC
    await _store(engine, [early_ist, middle_pst, late_utc])
    async with engine.connect() as connection:
        before_noon_ist = await connection.execute(
            select(probe.c.at).where(probe.c.at < base.astimezone(IST)).order_by(probe.c.at)
        )
        assert before_noon_ist.scalars().all() == [early_ist]
        ordered = (await connection.execute(select(probe.c.at).order_by(probe.c.at))).scalars().all()
        assert ordered == [early_ist, middle_pst, late_utc]
        if engine.dialect.name == "sqlite":
            raw = (
                (await connection.execute(text("SELECT at FROM timestamp_probe ORDER BY id"))).scalars().all()
            )
            assert raw[0].startswith("2024-06-01 11:00:00")
        else:
            kind = (
                await connection.execute(text("SELECT pg_typeof(at)::text FROM timestamp_probe LIMIT 1"))
            ).scalar()
            assert kind == "timestamp with time zone"


def test_utcnow_is_aware_utc() -> None:
    now = utcnow()
    assert now.tzinfo == UTC
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "2024-01-02T03:04:05.678Z"),
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "2024-01-02T03:04:05.000Z"),
        (datetime(2024, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "2024-12-31T23:59:59.999Z"),  # truncated
        (datetime(2024, 1, 1, 0, 30, tzinfo=IST), "2023-12-31T19:00:00.000Z"),
        (datetime(2024, 7, 1, 20, 0, 0, 1000, tzinfo=NEW_YORK), "2024-07-02T00:00:00.001Z"),
        (datetime(5, 1, 1, tzinfo=UTC), "0005-01-01T00:00:00.000Z"),
        (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "9999-12-31T23:59:59.999Z"),
    ],
)
def test_isoformat_wire_format(value: datetime, wire: str) -> None:
    assert isoformat(value) == wire


def test_isoformat_refuses_naive_values() -> None:
    with pytest.raises(ValueError, match="naive"):
        isoformat(datetime(2024, 1, 1))


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.timezones(),
    )
)
def test_isoformat_is_always_the_wire_format_and_round_trips(value: datetime) -> None:
    wire = isoformat(value)
    assert WIRE.fullmatch(wire), wire
    back = datetime.fromisoformat(wire)
    assert back.utcoffset() == timedelta(0)
    exact = value.astimezone(UTC)
    assert back == exact.replace(microsecond=exact.microsecond // 1000 * 1000)
