"""Shared fixtures: real PostgreSQL and SQLite databases, a live control plane, an admin client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.app import create_app
from control_plane.context import AppContext
from lorry import keys
from lorry.settings import LorrySettings
from tests.support.databases import PostgresTemplate, SqliteTemplate, row_counts, templates
from tests.support.log_leaks import no_plaintext_key_in_logs as _no_plaintext_key_in_logs

pytest_plugins = ["tests.fixtures_engine", "tests.machine_stalls", "pytester"]

# Autouse for the whole session: every log record and *.log file is searched for plaintext keys.
no_plaintext_key_in_logs = pytest.fixture(scope="session", autouse=True)(_no_plaintext_key_in_logs)

BACKENDS = ["sqlite", "postgres"]
ADMIN_TOKEN = keys.issue(keys.TokenKind.ADMIN_TOKEN).plaintext
BASE_DOMAIN = "lorry.test"


@pytest.fixture(scope="session")
def db_templates(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, PostgresTemplate | SqliteTemplate]]:
    with templates(tmp_path_factory.mktemp("sqlite")) as made:
        yield made


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str, db_templates: dict[str, PostgresTemplate | SqliteTemplate]) -> str:
    return db_templates[backend].fresh()


@pytest.fixture
def admin_token() -> str:
    return ADMIN_TOKEN


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> LorrySettings:
    (tmp_path / "imports").mkdir()
    return LorrySettings(
        database_url=database_url,
        base_domain=BASE_DOMAIN,
        bootstrap_admin_token=ADMIN_TOKEN,
        adapter_store=tmp_path / "store",
        import_roots=[tmp_path / "imports"],
        cache_dir=tmp_path / "cache",
    )


@pytest.fixture
async def control_plane(settings: LorrySettings) -> AsyncIterator[FastAPI]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
def ctx(control_plane: FastAPI) -> AppContext:
    context: AppContext = control_plane.state.ctx
    return context


@pytest.fixture
def sessionmaker(ctx: AppContext) -> async_sessionmaker[AsyncSession]:
    return ctx.sessionmaker


def client_for(
    app: FastAPI, token: str | None = None, *, base_url: str = "http://admin.lorry.test"
) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url, headers=headers)


@pytest.fixture
async def admin(control_plane: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the admin API holding the bootstrap install token."""
    async with client_for(control_plane, ADMIN_TOKEN) as client:
        yield client


@pytest.fixture
async def anonymous(control_plane: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(control_plane) as client:
        yield client


class RowCounter:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def snapshot(self) -> dict[str, int]:
        async with self._sessionmaker() as session:
            return await row_counts(session)


@pytest.fixture
def rows(sessionmaker: async_sessionmaker[AsyncSession]) -> RowCounter:
    return RowCounter(sessionmaker)


DEFAULT_SCOPE = {"orgSlug": "default", "projectSlug": "default"}
