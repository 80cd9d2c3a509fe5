"""Response models for `/v1/audit-events`."""

from __future__ import annotations

from typing import Any

from control_plane.schemas import ResponseModel, Timestamp

DEFAULT_LIMIT = 100
MAX_LIMIT = 500


class AuditEventDto(ResponseModel):
    id: str
    org_id: str | None
    actor_token_id: str | None
    action: str
    resource_type: str
    resource_id: str
    details: dict[str, Any]
    created_at: Timestamp


class AuditEventListResponse(ResponseModel):
    events: list[AuditEventDto]
