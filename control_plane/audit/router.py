"""Routes for audit: `GET /v1/audit-events` (DESIGN §4)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from control_plane.audit import service
from control_plane.audit.schemas import DEFAULT_LIMIT, MAX_LIMIT, AuditEventListResponse
from control_plane.auth import PrincipalDep
from control_plane.database import SessionDep
from control_plane.scope import OrgSlugQuery

router = APIRouter(tags=["audit"])


@router.get("/v1/audit-events", response_model=AuditEventListResponse)
async def list_audit_events(
    session: SessionDep,
    principal: PrincipalDep,
    org_slug: OrgSlugQuery = None,
    action: Annotated[str | None, Query(pattern=r"^[a-z0-9_.]{1,60}$")] = None,
    since: Annotated[
        str | None, Query(pattern=r"^[0-9A-Za-z:.+ -]{1,64}$", description="ISO 8601 datetime")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> AuditEventListResponse:
    """Audit events, newest first."""
    events = await service.list_events(
        session, principal, org_slug=org_slug, action=action, since=since, limit=limit
    )
    return AuditEventListResponse(events=events)
