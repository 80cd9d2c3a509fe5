"""Reading the audit log (writes go through `control_plane.audit_log.record`).

Scope: an install token may omit `orgSlug` and then sees every event, install-level ones (org
tokens, orgs) included; with `orgSlug` it sees that org's events. An org token sees only its own
org's events: `orgSlug` defaults to its org, and naming another org is 403.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.audit.schemas import AuditEventDto
from control_plane.principal import Principal
from control_plane.scope import resolve_org
from lorry.db.models import AuditEvent, Organization
from lorry.errors import InvalidRequest


def parse_since(value: str | None) -> datetime | None:
    """An ISO 8601 datetime (`Z` or an offset; a value without one is read as UTC)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise InvalidRequest("since must be an ISO 8601 datetime, e.g. 2025-01-31T12:00:00Z") from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def to_dto(event: AuditEvent) -> AuditEventDto:
    return AuditEventDto(
        id=event.id,
        org_id=event.org_id,
        actor_token_id=event.actor_token_id,
        action=event.action,
        resource_type=event.resource_type,
        resource_id=event.resource_id,
        details=event.details,
        created_at=event.created_at,
    )


async def list_events(
    session: AsyncSession,
    principal: Principal,
    *,
    org_slug: str | None,
    action: str | None,
    since: str | None,
    limit: int,
) -> list[AuditEventDto]:
    since_at = parse_since(since)
    org_id: str | None = None
    if org_slug:
        org: Organization = await resolve_org(session, principal, org_slug)
        org_id = org.id
    elif not principal.is_install:
        org_id = principal.org_id
    query = select(AuditEvent)
    if org_id is not None:
        query = query.where(AuditEvent.org_id == org_id)
    if action:
        query = query.where(AuditEvent.action == action)
    if since_at is not None:
        query = query.where(AuditEvent.created_at >= since_at)
    query = query.order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc()).limit(limit)
    return [to_dto(event) for event in (await session.execute(query)).scalars().all()]
