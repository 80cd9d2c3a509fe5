"""Real test databases: a migrated template per backend per run, a fresh copy per test."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from lorry import migrate
from lorry.db.models import Base

PG_ADMIN_DSN = os.environ.get("LORRY_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_url(database: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{database}"


def postgres_unavailable(reason: str) -> None:
    """A missing Postgres fails the run in CI and skips the test elsewhere (brief: never skip in CI)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"PostgreSQL unavailable: {reason}")


async def _pg_admin(sql: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def pg_execute(sql: str) -> None:
    asyncio.run(_pg_admin(sql))


class PostgresTemplate:
    def __init__(self) -> None:
        self.name = f"lorry_tpl_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.created: list[str] = []
        self.error: str | None = None
        try:
            pg_execute(f'CREATE DATABASE "{self.name}"')
        except (OSError, asyncpg.PostgresError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return
        migrate.upgrade(pg_url(self.name))

    def fresh(self) -> str:
        if self.error:
            postgres_unavailable(self.error)
        name = f"lorry_t_{os.getpid()}_{uuid.uuid4().hex[:10]}"
        pg_execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.name}"')
        self.created.append(name)
        return pg_url(name)

    def empty(self) -> str:
        """A database with no schema at all, for migration tests."""
        if self.error:
            postgres_unavailable(self.error)
        name = f"lorry_e_{os.getpid()}_{uuid.uuid4().hex[:10]}"
        pg_execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return pg_url(name)

    def drop_all(self) -> None:
        if self.error:
            return
        for name in [*self.created, self.name]:
            pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class SqliteTemplate:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.template = directory / "template.db"
        migrate.upgrade(sqlite_url(self.template))

    def fresh(self) -> str:
        target = self.directory / f"{uuid.uuid4().hex[:10]}.db"
        shutil.copyfile(self.template, target)
        return sqlite_url(target)

    def empty(self) -> str:
        return sqlite_url(self.directory / f"empty-{uuid.uuid4().hex[:10]}.db")


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def row_counts(session: AsyncSession) -> dict[str, int]:
    """Rows in every table; compared before and after bad input to prove nothing changed."""
    counts = {}
    for table in Base.metadata.sorted_tables:
        counts[table.name] = (await session.execute(select(func.count()).select_from(table))).scalar_one()
    return counts


@contextmanager
def templates(tmp_root: Path) -> Iterator[dict[str, PostgresTemplate | SqliteTemplate]]:
    pg = PostgresTemplate()
    try:
        yield {"sqlite": SqliteTemplate(tmp_root), "postgres": pg}
    finally:
        pg.drop_all()
