"""Alembic migrations on an empty PostgreSQL and SQLite database: head, base, round trip, no drift."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Connection, Integer, MetaData, String, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from lorry import migrate
from lorry.db.engine import create_engine
from lorry.db.models import Base, ChangeCounter
from tests.support.databases import PostgresTemplate, SqliteTemplate

Templates = dict[str, PostgresTemplate | SqliteTemplate]
EXPECTED_TABLES = set(Base.metadata.tables)


@pytest.fixture
def empty_url(backend: str, db_templates: Templates) -> str:
    return db_templates[backend].empty()


async def _upgrade(url: str) -> None:
    await asyncio.to_thread(migrate.upgrade, url)


async def _downgrade(url: str) -> None:
    await asyncio.to_thread(migrate.downgrade, url, "base")


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as connection:
        return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))


def _columns(sync: Connection) -> dict[str, set[str]]:
    inspector = inspect(sync)
    return {name: {c["name"] for c in inspector.get_columns(name)} for name in inspector.get_table_names()}


def _diff(metadata: MetaData) -> Any:
    def run(sync: Connection) -> Any:
        context = MigrationContext.configure(sync, opts={"compare_type": True})
        return compare_metadata(context, metadata)

    return run


async def _drift(engine: AsyncEngine, metadata: MetaData = Base.metadata) -> list[Any]:
    async with engine.connect() as connection:
        return list(await connection.run_sync(_diff(metadata)))


async def _current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await migrate.current_revision(connection)


def test_there_is_one_head() -> None:
    assert migrate.head_revision() == "0001"
    assert {"change_log", "change_counter", "deployment_keys", "admin_tokens"} <= EXPECTED_TABLES


async def test_upgrade_head_creates_every_table(empty_url: str) -> None:
    engine = create_engine(empty_url)
    try:
        assert await _tables(engine) == set()
        await _upgrade(empty_url)
        assert await _tables(engine) == EXPECTED_TABLES | {"alembic_version"}
        assert await _current_revision(engine) == migrate.head_revision()

        async with engine.connect() as connection:
            columns = await connection.run_sync(_columns)
            for table in Base.metadata.sorted_tables:
                assert columns[table.name] == set(table.columns.keys()), table.name
            # The counter row the change feed's UPDATE … RETURNING relies on.
            counters = (await connection.execute(select(ChangeCounter.id, ChangeCounter.value))).all()
            assert [tuple(row) for row in counters] == [(1, 0)]

        # Upgrading a database already at head is a no-op.
        await _upgrade(empty_url)
        assert await _current_revision(engine) == migrate.head_revision()
        async with engine.connect() as connection:
            assert (await connection.execute(select(ChangeCounter.value))).scalars().all() == [0]
    finally:
        await engine.dispose()


async def test_downgrade_base_then_upgrade_round_trip(empty_url: str) -> None:
    engine = create_engine(empty_url)
    try:
        await _upgrade(empty_url)
        await _downgrade(empty_url)
        assert await _tables(engine) <= {"alembic_version"}
        assert await _current_revision(engine) is None
        if await _tables(engine):
            async with engine.connect() as connection:
                versions = await connection.execute(text("SELECT version_num FROM alembic_version"))
                assert versions.all() == []

        await _upgrade(empty_url)
        assert await _tables(engine) == EXPECTED_TABLES | {"alembic_version"}
        assert await _current_revision(engine) == migrate.head_revision()
        assert await _drift(engine) == []
        async with engine.connect() as connection:
            assert (await connection.execute(select(ChangeCounter.value))).scalars().all() == [0]
    finally:
        await engine.dispose()


async def test_models_and_migrations_do_not_drift(empty_url: str) -> None:
    engine = create_engine(empty_url)
    try:
        await _upgrade(empty_url)
        assert await _drift(engine) == []

        # The comparison is sharp on this very connection: it sees an extra column and a changed type.
        altered = MetaData(naming_convention=Base.metadata.naming_convention)
        for table in Base.metadata.sorted_tables:
            table.to_metadata(altered)
        altered.tables["change_log"].append_column(Column("extra", Integer, nullable=True))
        altered.tables["organizations"].c.name.type = String(201)
        differences = await _drift(engine, altered)
        kinds = {entry[0] if isinstance(entry, tuple) else entry[0][0] for entry in differences}
        assert "add_column" in kinds
        assert "modify_type" in kinds
    finally:
        await engine.dispose()
