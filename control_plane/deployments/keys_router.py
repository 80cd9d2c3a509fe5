"""Routes for deployment keys: `/v1/endpoints/{id}/keys` (DESIGN §4)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Response

from control_plane.database import SessionDep
from control_plane.deployments import keys_service, service
from control_plane.deployments.schemas import (
    DEFAULT_GRACE_S,
    CreatedKeyResponse,
    CreateKeyRequest,
    KeyListResponse,
    RolledKeyResponse,
    RollKeyRequest,
)
from control_plane.scope import ProjectScopeDep

router = APIRouter(tags=["deployment-keys"])


@router.get("/v1/endpoints/{deployment_id}/keys")
async def list_keys(deployment_id: str, scope: ProjectScopeDep, session: SessionDep) -> KeyListResponse:
    deployment = await service.get_deployment(session, scope.project.id, deployment_id)
    return KeyListResponse(keys=await keys_service.list_keys(session, deployment))


@router.post("/v1/endpoints/{deployment_id}/keys", status_code=201)
async def create_key(
    deployment_id: str, body: CreateKeyRequest, scope: ProjectScopeDep, session: SessionDep
) -> CreatedKeyResponse:
    deployment = await service.get_deployment(session, scope.project.id, deployment_id)
    return CreatedKeyResponse(key=await keys_service.create_key(session, scope.principal, deployment, body))


@router.delete("/v1/endpoints/{deployment_id}/keys/{key_id}", status_code=204, response_class=Response)
async def revoke_key(
    deployment_id: str, key_id: str, scope: ProjectScopeDep, session: SessionDep
) -> Response:
    deployment = await service.get_deployment(session, scope.project.id, deployment_id)
    await keys_service.revoke_key(session, scope.principal, deployment, key_id)
    return Response(status_code=204)


@router.post("/v1/endpoints/{deployment_id}/keys/{key_id}/roll", status_code=201)
async def roll_key(
    deployment_id: str,
    key_id: str,
    scope: ProjectScopeDep,
    session: SessionDep,
    body: Annotated[RollKeyRequest | None, Body()] = None,
) -> RolledKeyResponse:
    """The body is optional: without one the old key keeps working for the default grace period."""
    deployment = await service.get_deployment(session, scope.project.id, deployment_id)
    grace = body.grace_period_seconds if body is not None else DEFAULT_GRACE_S
    return await keys_service.roll_key(session, scope.principal, deployment, key_id, grace)
