"""Routes for admin tokens: `/v1/admin-tokens` (DESIGN §2)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from control_plane.admin_tokens import service
from control_plane.admin_tokens.schemas import (
    AdminTokenListResponse,
    CreateAdminTokenRequest,
    CreatedAdminTokenResponse,
    RollAdminTokenRequest,
    RolledAdminTokenResponse,
)
from control_plane.auth import PrincipalDep
from control_plane.database import ContextDep, SessionDep
from control_plane.scope import OrgSlugQuery

router = APIRouter(tags=["admin-tokens"])


@router.get("/v1/admin-tokens", response_model=AdminTokenListResponse)
async def list_admin_tokens(
    session: SessionDep, principal: PrincipalDep, org_slug: OrgSlugQuery = None
) -> AdminTokenListResponse:
    """Every token (install tokens; `?orgSlug=` filters) or the caller's org's org tokens."""
    return AdminTokenListResponse(tokens=await service.list_tokens(session, principal, org_slug))


@router.post("/v1/admin-tokens", response_model=CreatedAdminTokenResponse, status_code=201)
async def create_admin_token(
    session: SessionDep, principal: PrincipalDep, body: CreateAdminTokenRequest
) -> CreatedAdminTokenResponse:
    """Create a token; its plaintext is in this response only."""
    return CreatedAdminTokenResponse(token=await service.create_token(session, principal, body))


@router.delete("/v1/admin-tokens/{token_id}", status_code=204, response_class=Response)
async def revoke_admin_token(
    session: SessionDep, ctx: ContextDep, principal: PrincipalDep, token_id: str
) -> Response:
    """Revoke a token; this process refuses it from the next request on."""
    await service.revoke_token(session, principal, ctx.verifier, token_id)
    return Response(status_code=204)


@router.post("/v1/admin-tokens/{token_id}/roll", response_model=RolledAdminTokenResponse, status_code=201)
async def roll_admin_token(
    session: SessionDep,
    ctx: ContextDep,
    principal: PrincipalDep,
    token_id: str,
    body: RollAdminTokenRequest | None = None,
) -> RolledAdminTokenResponse:
    """Replace a token with a new one (same label); the old one works until the grace period ends."""
    grace = (body or RollAdminTokenRequest()).grace_period_seconds
    return await service.roll_token(session, principal, ctx.verifier, token_id, grace)
