"""Deployment keys: list, create, revoke and roll (DESIGN §4, §5).

Only the kid, the argon2id hash of the secret and the display prefix are stored. The plaintext
exists in the create and roll responses only: it is never logged, audited or stored.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import audit_log
from control_plane.credential_roll import end_with_grace
from control_plane.deployments.schemas import (
    CreatedKeyDto,
    CreateKeyRequest,
    KeyDto,
    PreviousKey,
    RolledKeyResponse,
)
from control_plane.principal import Principal
from lorry import keys
from lorry.changefeed import ChangeKind, append_change
from lorry.db.models import Deployment, DeploymentKey
from lorry.db.types import is_id, isoformat, utcnow
from lorry.errors import Conflict, InvalidRequest, NotFound

RESOURCE = "deployment_key"


def is_active(key: DeploymentKey, now: datetime) -> bool:
    return key.revoked_at is None and (key.expires_at is None or key.expires_at > now)


def to_dto(key: DeploymentKey, now: datetime) -> KeyDto:
    return KeyDto(
        id=key.id,
        label=key.label,
        prefix=key.prefix,
        enabled=is_active(key, now),
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        expires_at=key.expires_at,
    )


def _created_dto(key: DeploymentKey, plaintext: str) -> CreatedKeyDto:
    return CreatedKeyDto(
        id=key.id,
        label=key.label,
        plaintext=plaintext,
        prefix=key.prefix,
        created_at=key.created_at,
        expires_at=key.expires_at,
    )


async def _issue() -> keys.IssuedToken:
    # argon2id takes tens of milliseconds: keep it off the event loop.
    return await asyncio.to_thread(keys.issue, keys.TokenKind.DEPLOYMENT_KEY)


async def list_keys(session: AsyncSession, deployment: Deployment) -> list[KeyDto]:
    """Every key the deployment ever had; revoked and expired ones with `enabled: false`."""
    rows = (
        (
            await session.execute(
                select(DeploymentKey)
                .where(DeploymentKey.deployment_id == deployment.id)
                .order_by(DeploymentKey.created_at, DeploymentKey.id)
            )
        )
        .scalars()
        .all()
    )
    now = utcnow()
    return [to_dto(key, now) for key in rows]


async def create_key(
    session: AsyncSession, principal: Principal, deployment: Deployment, body: CreateKeyRequest
) -> CreatedKeyDto:
    now = utcnow()
    if body.expires_at is not None and body.expires_at <= now:
        raise InvalidRequest("expiresAt must be in the future")
    issued = await _issue()
    key = DeploymentKey(
        deployment_id=deployment.id,
        kid=issued.kid,
        secret_hash=issued.secret_hash,
        label=body.label,
        prefix=issued.prefix,
        created_at=now,
        expires_at=body.expires_at,
    )
    session.add(key)
    await session.flush()
    await append_change(session, ChangeKind.DEPLOYMENT_KEY, key.id)
    audit_log.record(
        session,
        principal,
        "deployment_key.create",
        RESOURCE,
        key.id,
        org_id=deployment.org_id,
        details={
            "deploymentId": deployment.id,
            "slug": deployment.slug,
            "label": key.label,
            "prefix": key.prefix,
            "expiresAt": isoformat(key.expires_at) if key.expires_at else None,
        },
    )
    return _created_dto(key, issued.plaintext)


async def _load_for_update(session: AsyncSession, deployment: Deployment, key_id: str) -> DeploymentKey:
    key = None
    if is_id(key_id):
        key = (
            await session.execute(
                select(DeploymentKey)
                .where(DeploymentKey.id == key_id, DeploymentKey.deployment_id == deployment.id)
                .with_for_update()
            )
        ).scalar_one_or_none()
    if key is None:
        raise NotFound("Key not found", code="key_not_found")
    return key


async def revoke_key(
    session: AsyncSession, principal: Principal, deployment: Deployment, key_id: str
) -> None:
    """Idempotent: revoking a revoked key changes nothing and records nothing."""
    key = await _load_for_update(session, deployment, key_id)
    if key.revoked_at is not None:
        return
    key.revoked_at = utcnow()
    await session.flush()
    await append_change(session, ChangeKind.DEPLOYMENT_KEY, key.id)
    audit_log.record(
        session,
        principal,
        "deployment_key.revoke",
        RESOURCE,
        key.id,
        org_id=deployment.org_id,
        details={
            "deploymentId": deployment.id,
            "slug": deployment.slug,
            "label": key.label,
            "prefix": key.prefix,
        },
    )


async def roll_key(
    session: AsyncSession,
    principal: Principal,
    deployment: Deployment,
    key_id: str,
    grace_period_seconds: int,
) -> RolledKeyResponse:
    """A new key with the same label and expiry; the old one stops working after the grace period.

    Grace 0 revokes the old key at once. A grace never extends an earlier expiry.
    """
    old = await _load_for_update(session, deployment, key_id)
    now = utcnow()
    if not is_active(old, now):
        raise Conflict("A revoked or expired key cannot be rolled", code="key_inactive")
    original_expiry = end_with_grace(old, now, grace_period_seconds)
    issued = await _issue()
    new = DeploymentKey(
        deployment_id=deployment.id,
        kid=issued.kid,
        secret_hash=issued.secret_hash,
        label=old.label,
        prefix=issued.prefix,
        created_at=now,
        expires_at=original_expiry,
        rolled_from=old.id,
    )
    session.add(new)
    await session.flush()
    await append_change(session, ChangeKind.DEPLOYMENT_KEY, old.id)
    await append_change(session, ChangeKind.DEPLOYMENT_KEY, new.id)
    assert old.expires_at is not None
    audit_log.record(
        session,
        principal,
        "deployment_key.roll",
        RESOURCE,
        old.id,
        org_id=deployment.org_id,
        details={
            "deploymentId": deployment.id,
            "slug": deployment.slug,
            "label": old.label,
            "prefix": old.prefix,
            "newKeyId": new.id,
            "newPrefix": new.prefix,
            "gracePeriodSeconds": grace_period_seconds,
            "previousExpiresAt": isoformat(old.expires_at),
        },
    )
    return RolledKeyResponse(
        key=_created_dto(new, issued.plaintext),
        previous=PreviousKey(id=old.id, expires_at=old.expires_at),
    )
