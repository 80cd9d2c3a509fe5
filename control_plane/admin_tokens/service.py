"""Admin tokens: list, create, revoke and roll (DESIGN §2, §5).

Visibility: an install token sees every token; an org token sees only the org tokens of its own
org. A token id outside what the caller can see is 404 `token_not_found`, exactly like an unknown
one, so an org token learns nothing about other orgs' tokens or about install tokens.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from sqlalchemy import ColumnElement, and_, event, select, true
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from control_plane import audit_log
from control_plane.admin_tokens.schemas import (
    AdminTokenDto,
    CreateAdminTokenRequest,
    CreatedAdminTokenDto,
    PreviousToken,
    RolledAdminTokenResponse,
)
from control_plane.credential_roll import end_with_grace
from control_plane.principal import INSTALL, ORG, AdminTokenVerifier, Principal
from control_plane.scope import resolve_org
from lorry import keys
from lorry.changefeed import ChangeKind, append_change
from lorry.db.models import AdminToken, Organization
from lorry.db.types import is_id, isoformat, utcnow
from lorry.errors import Conflict, Forbidden, InvalidRequest, NotFound


def is_active(token: AdminToken, now: datetime) -> bool:
    return token.revoked_at is None and (token.expires_at is None or token.expires_at > now)


def to_dto(token: AdminToken, org_slug: str | None, now: datetime) -> AdminTokenDto:
    return AdminTokenDto(
        id=token.id,
        label=token.label,
        prefix=token.prefix,
        kind=token.kind,
        org_id=token.org_id,
        org_slug=org_slug,
        enabled=is_active(token, now),
        created_at=token.created_at,
        last_used_at=token.last_used_at,
        expires_at=token.expires_at,
    )


def _created_dto(
    token: AdminToken, org_slug: str | None, plaintext: str, now: datetime
) -> CreatedAdminTokenDto:
    return CreatedAdminTokenDto(**to_dto(token, org_slug, now).model_dump(), plaintext=plaintext)


def _visible(principal: Principal) -> ColumnElement[bool]:
    if principal.is_install:
        return true()
    return and_(AdminToken.kind == ORG, AdminToken.org_id == principal.org_id)


def _forget_now_and_after_commit(session: AsyncSession, verifier: AdminTokenVerifier, token_id: str) -> None:
    """Drop the token's cached verifications now, and again once the change is committed.

    The second pass closes the window in which a concurrent request, still reading the old row,
    could cache the token again between this call and the commit.
    """
    verifier.forget(token_id)

    def after_commit(_session: Session) -> None:
        verifier.forget(token_id)

    event.listen(session.sync_session, "after_commit", after_commit, once=True)


async def list_tokens(
    session: AsyncSession, principal: Principal, org_slug: str | None
) -> list[AdminTokenDto]:
    query = (
        select(AdminToken, Organization.slug)
        .outerjoin(Organization, Organization.id == AdminToken.org_id)
        .where(_visible(principal))
    )
    if org_slug:
        org = await resolve_org(session, principal, org_slug)
        query = query.where(AdminToken.org_id == org.id)
    query = query.order_by(AdminToken.created_at, AdminToken.id)
    now = utcnow()
    return [to_dto(token, slug, now) for token, slug in (await session.execute(query)).all()]


async def create_token(
    session: AsyncSession, principal: Principal, body: CreateAdminTokenRequest
) -> CreatedAdminTokenDto:
    now = utcnow()
    org: Organization | None = None
    if body.kind == INSTALL:
        if not principal.is_install:
            raise Forbidden("Only an install token may create install tokens")
        if body.org_slug is not None:
            raise InvalidRequest("orgSlug is only for org tokens")
    else:
        if not body.org_slug:
            raise InvalidRequest("orgSlug is required for an org token")
        org = await resolve_org(session, principal, body.org_slug)
    if body.expires_at is not None and body.expires_at <= now:
        raise InvalidRequest("expiresAt must be in the future")
    issued = await asyncio.to_thread(keys.issue, keys.TokenKind.ADMIN_TOKEN)  # argon2: off the loop
    token = AdminToken(
        kind=body.kind,
        org_id=org.id if org else None,
        kid=issued.kid,
        secret_hash=issued.secret_hash,
        label=body.label,
        prefix=issued.prefix,
        expires_at=body.expires_at,
    )
    session.add(token)
    await session.flush()
    await append_change(session, ChangeKind.ADMIN_TOKEN, token.id)
    audit_log.record(
        session,
        principal,
        "admin_token.create",
        "admin_token",
        token.id,
        org_id=token.org_id,
        details={
            "label": token.label,
            "kind": token.kind,
            "prefix": token.prefix,
            "orgSlug": org.slug if org else None,
            "expiresAt": isoformat(token.expires_at) if token.expires_at else None,
        },
    )
    return _created_dto(token, org.slug if org else None, issued.plaintext, now)


async def _load(session: AsyncSession, principal: Principal, token_id: str, *, lock: bool) -> AdminToken:
    if not is_id(token_id):
        raise NotFound("Admin token not found", code="token_not_found")
    query = select(AdminToken).where(AdminToken.id == token_id, _visible(principal))
    if lock:
        query = query.with_for_update()
    token: AdminToken | None = (await session.execute(query)).scalar_one_or_none()
    if token is None:
        raise NotFound("Admin token not found", code="token_not_found")
    return token


async def _lock_active_install_tokens(session: AsyncSession, now: datetime) -> list[str]:
    """Lock every active install token, in id order so that concurrent revokes cannot deadlock."""
    query = (
        select(AdminToken.id)
        .where(AdminToken.kind == INSTALL, AdminToken.revoked_at.is_(None))
        .where(AdminToken.expires_at.is_(None) | (AdminToken.expires_at > now))
        .order_by(AdminToken.id)
        .with_for_update()
    )
    return list((await session.execute(query)).scalars().all())


async def _org_slug(session: AsyncSession, token: AdminToken) -> str | None:
    if token.org_id is None:
        return None
    slug: str | None = (
        await session.execute(select(Organization.slug).where(Organization.id == token.org_id))
    ).scalar_one_or_none()
    return slug


async def revoke_token(
    session: AsyncSession, principal: Principal, verifier: AdminTokenVerifier, token_id: str
) -> None:
    """Idempotent: revoking a revoked token changes nothing and records nothing."""
    now = utcnow()
    token = await _load(session, principal, token_id, lock=False)
    active_install: list[str] = []
    if token.kind == INSTALL:
        # Two concurrent revokes of the last two install tokens must not both succeed: both
        # lock the whole set of active install tokens first (same order), then the target.
        active_install = await _lock_active_install_tokens(session, now)
    await session.refresh(token, with_for_update=True)
    if token.revoked_at is not None:
        _forget_now_and_after_commit(session, verifier, token.id)
        return
    if token.kind == INSTALL and is_active(token, now) and not [i for i in active_install if i != token.id]:
        raise Conflict(
            "This is the last active install token; create another one before revoking it",
            code="last_install_token",
        )
    token.revoked_at = now
    await session.flush()
    await append_change(session, ChangeKind.ADMIN_TOKEN, token.id)
    audit_log.record(
        session,
        principal,
        "admin_token.revoke",
        "admin_token",
        token.id,
        org_id=token.org_id,
        details={"label": token.label, "kind": token.kind, "prefix": token.prefix},
    )
    _forget_now_and_after_commit(session, verifier, token.id)


async def roll_token(
    session: AsyncSession,
    principal: Principal,
    verifier: AdminTokenVerifier,
    token_id: str,
    grace_period_seconds: int,
) -> RolledAdminTokenResponse:
    """A new token with the same kind, org, label and expiry; the old one ends after the grace.

    Grace 0 revokes the old token at once. A grace never extends an earlier expiry.
    """
    old = await _load(session, principal, token_id, lock=True)
    now = utcnow()
    if not is_active(old, now):
        raise Conflict("A revoked or expired token cannot be rolled", code="token_inactive")
    original_expiry = end_with_grace(old, now, grace_period_seconds)
    issued = await asyncio.to_thread(keys.issue, keys.TokenKind.ADMIN_TOKEN)  # argon2: off the loop
    new = AdminToken(
        kind=old.kind,
        org_id=old.org_id,
        kid=issued.kid,
        secret_hash=issued.secret_hash,
        label=old.label,
        prefix=issued.prefix,
        expires_at=original_expiry,
        rolled_from=old.id,
    )
    session.add(new)
    await session.flush()
    await append_change(session, ChangeKind.ADMIN_TOKEN, old.id)
    await append_change(session, ChangeKind.ADMIN_TOKEN, new.id)
    assert old.expires_at is not None
    audit_log.record(
        session,
        principal,
        "admin_token.roll",
        "admin_token",
        old.id,
        org_id=old.org_id,
        details={
            "label": old.label,
            "kind": old.kind,
            "prefix": old.prefix,
            "newTokenId": new.id,
            "newPrefix": new.prefix,
            "gracePeriodSeconds": grace_period_seconds,
            "previousExpiresAt": isoformat(old.expires_at),
        },
    )
    # The cached verification carries the old expiry: drop it so the new one applies at once.
    _forget_now_and_after_commit(session, verifier, old.id)
    return RolledAdminTokenResponse(
        token=_created_dto(new, await _org_slug(session, new), issued.plaintext, now),
        previous=PreviousToken(id=old.id, expires_at=old.expires_at),
    )
