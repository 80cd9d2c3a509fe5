"""Health, readiness and metrics for the control plane."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from control_plane.database import ContextDep
from lorry import migrate
from lorry.errors import ServiceUnavailable

router = APIRouter(include_in_schema=True, tags=["operations"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database reachable and at the migration head")
async def readyz(ctx: ContextDep) -> dict[str, str]:
    try:
        async with ctx.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            revision = await migrate.current_revision(connection)
    except Exception as exc:
        raise ServiceUnavailable("Database unreachable", code="database_unavailable") from exc
    head = migrate.head_revision()
    if revision != head:
        raise ServiceUnavailable(
            f"Database at revision {revision}, expected {head}", code="migration_pending"
        )
    return {"status": "ready", "revision": revision or ""}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
