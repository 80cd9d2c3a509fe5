"""The control-plane app factory: `create_app(settings)`."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from control_plane import error_handlers, openapi, operations
from control_plane.admin_tokens.router import router as admin_tokens_router
from control_plane.audit.router import router as audit_router
from control_plane.bootstrap import ensure_bootstrapped
from control_plane.context import AppContext
from control_plane.deployments.router import router as deployments_router
from control_plane.engines.router import router as engines_router
from control_plane.jobs.router import router as jobs_router
from control_plane.principal import AdminTokenVerifier
from control_plane.tenancy.router import router as tenancy_router
from lorry import __version__, migrate
from lorry.db.engine import create_engine, create_sessionmaker
from lorry.engine_spec import static_engines
from lorry.settings import LorrySettings

logger = logging.getLogger("lorry.control_plane")

_UPLOAD_PATH = re.compile(r"^/v1/jobs/[^/]+/artifacts$")


def create_context(settings: LorrySettings) -> AppContext:
    engine = create_engine(settings.database_url)
    return AppContext(
        settings=settings,
        engine=engine,
        sessionmaker=create_sessionmaker(engine),
        verifier=AdminTokenVerifier(),
    )


def create_app(settings: LorrySettings, ctx: AppContext | None = None) -> FastAPI:
    context = ctx or create_context(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        static_engines(settings)  # a malformed LORRY_ENGINES fails the start, not a later request
        if settings.auto_migrate:
            await _run_migrations(settings.database_url)
        async with context.sessionmaker() as session:
            if await ensure_bootstrapped(session, settings.bootstrap_admin_token):
                logger.info("initialised an empty database with org and project 'default'")
            await session.commit()
        try:
            yield
        finally:
            if ctx is None:
                await context.engine.dispose()

    app = FastAPI(
        title="Lorry admin API",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.ctx = context
    error_handlers.install(app)
    openapi.install(app)
    app.add_middleware(
        error_handlers.BodyLimitMiddleware,
        limit_for=lambda path: (
            settings.max_upload_bytes if _UPLOAD_PATH.match(path) else settings.max_body_bytes
        ),
    )
    app.include_router(operations.router)
    for router in (
        tenancy_router,
        admin_tokens_router,
        deployments_router,
        jobs_router,
        engines_router,
        audit_router,
    ):
        app.include_router(router)
    return app


async def _run_migrations(database_url: str) -> None:
    await asyncio.to_thread(migrate.upgrade, database_url)
