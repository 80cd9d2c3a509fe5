"""Appending to the audit log; every configuration write calls `record` in its transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.principal import Principal
from lorry.db.models import AuditEvent


def record(
    session: AsyncSession,
    principal: Principal | None,
    action: str,
    resource_type: str,
    resource_id: str,
    *,
    org_id: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    """Details must never carry a secret: callers pass labels, slugs and ids only."""
    session.add(
        AuditEvent(
            org_id=org_id,
            actor_token_id=principal.token_id if principal else None,
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            details=details or {},
        )
    )
