"""Deployments: create, read, update and soft-delete (DESIGN §4).

Every write flushes its own rows first and appends to the change log last, so a transaction that
waits on another one (a slug being inserted concurrently) never holds the change-counter lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import audit_log
from control_plane.deployments.schemas import (
    DEFAULT_RETENTION_DAYS,
    AdapterTarget,
    BaseModelTarget,
    CheckpointAdapterRef,
    CreateDeploymentRequest,
    DeploymentDto,
    UpdateDeploymentRequest,
)
from control_plane.deployments.slugs import check_slug
from control_plane.engines.catalog import all_engines, can_serve
from control_plane.scope import ProjectScope
from lorry.changefeed import ChangeKind, append_change
from lorry.db.models import Adapter, Deployment, DeploymentKey, Job
from lorry.db.types import is_id, utcnow
from lorry.engine_spec import EngineSpec
from lorry.errors import Conflict, InvalidRequest, NotFound
from lorry.settings import LorrySettings

RESOURCE = "deployment"


def deployment_not_found() -> NotFound:
    return NotFound("Deployment not found", code="deployment_not_found")


# --- targets -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvedTarget:
    kind: str
    job_id: str | None
    adapter_id: str | None
    base_model: str | None


async def resolve_target(
    session: AsyncSession, project_id: str, target: AdapterTarget | BaseModelTarget
) -> ResolvedTarget:
    """The rows a target names, looked up inside the project; 404 when the job or adapter is missing."""
    if isinstance(target, BaseModelTarget):
        return ResolvedTarget(kind="base_model", job_id=None, adapter_id=None, base_model=target.base_model)
    ref = target.adapter
    job = None
    if is_id(ref.job_id):
        job = (
            await session.execute(select(Job).where(Job.id == ref.job_id, Job.project_id == project_id))
        ).scalar_one_or_none()
    if job is None:
        # A malformed id is not echoed: it may hold anything, lone surrogates included.
        named = f"Job '{ref.job_id}'" if is_id(ref.job_id) else "Job"
        raise NotFound(f"{named} not found in this project", code="job_not_found")
    query = select(Adapter).where(Adapter.job_id == job.id, Adapter.kind == ref.kind)
    if isinstance(ref, CheckpointAdapterRef):
        query = query.where(Adapter.step == ref.step)
        missing = f"Job '{job.id}' has no checkpoint at step {ref.step}"
    else:
        missing = f"Job '{job.id}' has no final adapter"
    adapter = (await session.execute(query)).scalar_one_or_none()
    if adapter is None:
        raise NotFound(missing, code="adapter_not_found")
    return ResolvedTarget(
        kind="adapter", job_id=job.id, adapter_id=adapter.id, base_model=job.model or adapter.base_model
    )


def _apply_target(deployment: Deployment, target: dict[str, Any], resolved: ResolvedTarget) -> None:
    deployment.target = target
    deployment.target_kind = resolved.kind
    deployment.job_id = resolved.job_id
    deployment.adapter_id = resolved.adapter_id
    deployment.base_model = resolved.base_model


# --- retention ---------------------------------------------------------------------------------


def _retention_pair(mode: str, days: int | None) -> tuple[str, int | None]:
    if mode == "days" and days is None:
        raise InvalidRequest("runRetentionDays is required when runRetentionMode is 'days'")
    if mode != "days" and days is not None:
        raise InvalidRequest(
            f"runRetentionDays is only allowed when runRetentionMode is 'days', not '{mode}'"
        )
    return mode, days


def _create_retention(body: CreateDeploymentRequest) -> tuple[str, int | None]:
    if body.run_retention_mode is None:
        # Both left out: the default. Days alone: the default mode with those days.
        return "days", body.run_retention_days or DEFAULT_RETENTION_DAYS
    return _retention_pair(body.run_retention_mode, body.run_retention_days)


def _updated_retention(deployment: Deployment, body: UpdateDeploymentRequest) -> tuple[str, int | None]:
    fields = body.model_fields_set
    if "run_retention_mode" in fields:
        assert body.run_retention_mode is not None  # null is refused by the schema
        # A mode other than `days` clears the stored days.
        return _retention_pair(body.run_retention_mode, body.run_retention_days)
    if "run_retention_days" in fields:
        return _retention_pair(deployment.run_retention_mode, body.run_retention_days)
    return deployment.run_retention_mode, deployment.run_retention_days


# --- reads -------------------------------------------------------------------------------------


async def get_deployment(
    session: AsyncSession, project_id: str, deployment_id: str, *, for_update: bool = False
) -> Deployment:
    """A live deployment of the project; unknown, malformed, deleted and foreign ids are all 404."""
    if not is_id(deployment_id):
        raise deployment_not_found()
    query = select(Deployment).where(
        Deployment.id == deployment_id, Deployment.project_id == project_id, Deployment.deleted_at.is_(None)
    )
    if for_update:
        query = query.with_for_update()
    deployment = (await session.execute(query)).scalar_one_or_none()
    if deployment is None:
        raise deployment_not_found()
    return deployment


async def list_deployments(session: AsyncSession, project_id: str) -> Sequence[Deployment]:
    query = (
        select(Deployment)
        .where(Deployment.project_id == project_id, Deployment.deleted_at.is_(None))
        .order_by(Deployment.created_at, Deployment.id)
    )
    return (await session.execute(query)).scalars().all()


def _status(engines: Sequence[EngineSpec], base_model: str | None, rank: int | None) -> str:
    return "ready" if can_serve(engines, base_model, rank) else "no_engine"


async def to_dtos(
    session: AsyncSession, settings: LorrySettings, deployments: Sequence[Deployment]
) -> list[DeploymentDto]:
    """DTOs with `status` computed against the current engines, in three queries at most."""
    if not deployments:
        return []
    engines = await all_engines(session, settings)
    adapter_ids = {d.adapter_id for d in deployments if d.adapter_id is not None}
    serving: dict[str, tuple[str | None, int]] = {}
    if adapter_ids:
        rows = await session.execute(
            select(Adapter.id, Adapter.rank, Adapter.base_model, Job.model)
            .join(Job, Job.id == Adapter.job_id)
            .where(Adapter.id.in_(adapter_ids))
        )
        serving = {row.id: (row.model or row.base_model, row.rank) for row in rows}
    dtos = []
    for deployment in deployments:
        if deployment.target_kind == "adapter":
            base_model, rank = serving.get(deployment.adapter_id or "", (None, 0))
            status = _status(engines, base_model, rank)
        else:
            status = _status(engines, deployment.base_model, None)
        dtos.append(_dto(settings, deployment, status))
    return dtos


async def to_dto(session: AsyncSession, settings: LorrySettings, deployment: Deployment) -> DeploymentDto:
    return (await to_dtos(session, settings, [deployment]))[0]


def _dto(settings: LorrySettings, deployment: Deployment, status: str) -> DeploymentDto:
    return DeploymentDto.model_validate(
        {
            "id": deployment.id,
            "slug": deployment.slug,
            "org_id": deployment.org_id,
            "project_id": deployment.project_id,
            "target": deployment.target,
            "auth_mode": deployment.auth_mode,
            "url_format": "openai_compat",
            "enabled": deployment.enabled,
            "custom_domain": None,
            "run_retention_mode": deployment.run_retention_mode,
            "run_retention_days": deployment.run_retention_days,
            "created_at": deployment.created_at,
            "updated_at": deployment.updated_at,
            "base_url": settings.public_url(deployment.slug),
            "status": status,
        }
    )


# --- writes ------------------------------------------------------------------------------------


async def _slug_in_use(session: AsyncSession, slug: str) -> bool:
    """Any deployment ever created with the slug, in any org, deleted or not."""
    found = await session.execute(select(Deployment.id).where(Deployment.slug == slug).limit(1))
    return found.first() is not None


def _slug_taken(slug: str) -> Conflict:
    return Conflict(f"Deployment slug '{slug}' is already taken", code="slug_taken")


async def create_deployment(
    session: AsyncSession, settings: LorrySettings, scope: ProjectScope, body: CreateDeploymentRequest
) -> Deployment:
    check_slug(body.slug, settings.reserved_slugs)
    mode, days = _create_retention(body)
    target = body.target.model_dump()
    resolved = await resolve_target(session, scope.project.id, body.target)
    if await _slug_in_use(session, body.slug):
        raise _slug_taken(body.slug)
    now = utcnow()
    deployment = Deployment(
        org_id=scope.org.id,
        project_id=scope.project.id,
        slug=body.slug,
        auth_mode=body.auth_mode,
        enabled=True,
        run_retention_mode=mode,
        run_retention_days=days,
        created_at=now,
        updated_at=now,
    )
    _apply_target(deployment, target, resolved)
    session.add(deployment)
    try:
        await session.flush()
    except IntegrityError as exc:
        # Two creates raced past the check above; the unique index decided. The request's
        # session is rolled back by its dependency when this error leaves the handler.
        if "slug" in str(exc.orig):
            raise _slug_taken(body.slug) from None
        raise Conflict("A row this deployment refers to changed concurrently; retry") from None
    await append_change(session, ChangeKind.DEPLOYMENT, deployment.id)
    audit_log.record(
        session,
        scope.principal,
        "deployment.create",
        RESOURCE,
        deployment.id,
        org_id=deployment.org_id,
        details={"slug": deployment.slug, "targetKind": resolved.kind, "authMode": deployment.auth_mode},
    )
    return deployment


async def update_deployment(
    session: AsyncSession, scope: ProjectScope, deployment_id: str, body: UpdateDeploymentRequest
) -> Deployment:
    """A partial update; a body that changes nothing writes nothing (no change row, no audit event)."""
    deployment = await get_deployment(session, scope.project.id, deployment_id, for_update=True)
    if "slug" in body.model_fields_set:
        raise InvalidRequest("slug cannot be changed after a deployment is created", code="immutable_field")
    mode, days = _updated_retention(deployment, body)
    changed: list[str] = []
    if body.target is not None:
        target = body.target.model_dump()
        if target != deployment.target:
            _apply_target(deployment, target, await resolve_target(session, scope.project.id, body.target))
            changed.append("target")
    if body.auth_mode is not None and body.auth_mode != deployment.auth_mode:
        deployment.auth_mode = body.auth_mode
        changed.append("authMode")
    if body.enabled is not None and body.enabled != deployment.enabled:
        deployment.enabled = body.enabled
        changed.append("enabled")
    if mode != deployment.run_retention_mode:
        deployment.run_retention_mode = mode
        changed.append("runRetentionMode")
    if days != deployment.run_retention_days:
        deployment.run_retention_days = days
        changed.append("runRetentionDays")
    if not changed:
        return deployment
    deployment.updated_at = utcnow()
    await session.flush()
    await append_change(session, ChangeKind.DEPLOYMENT, deployment.id)
    audit_log.record(
        session,
        scope.principal,
        "deployment.update",
        RESOURCE,
        deployment.id,
        org_id=deployment.org_id,
        details={"slug": deployment.slug, "changed": changed},
    )
    return deployment


async def delete_deployment(session: AsyncSession, scope: ProjectScope, deployment_id: str) -> None:
    """Soft delete: the row keeps its slug forever; its keys are revoked; its job can then be deleted."""
    deployment = await get_deployment(session, scope.project.id, deployment_id, for_update=True)
    now = utcnow()
    deployment.deleted_at = now
    deployment.updated_at = now
    # The target stays on record, but the deleted row no longer pins its job and adapter rows.
    deployment.job_id = None
    deployment.adapter_id = None
    revoked = await revoke_all_keys(session, deployment.id, now)
    await session.flush()
    await append_change(session, ChangeKind.DEPLOYMENT, deployment.id)
    for key_id in revoked:
        await append_change(session, ChangeKind.DEPLOYMENT_KEY, key_id)
    audit_log.record(
        session,
        scope.principal,
        "deployment.delete",
        RESOURCE,
        deployment.id,
        org_id=deployment.org_id,
        details={"slug": deployment.slug, "revokedKeys": len(revoked)},
    )


async def revoke_all_keys(session: AsyncSession, deployment_id: str, now: datetime) -> list[str]:
    keys = (
        (
            await session.execute(
                select(DeploymentKey)
                .where(DeploymentKey.deployment_id == deployment_id, DeploymentKey.revoked_at.is_(None))
                .order_by(DeploymentKey.created_at, DeploymentKey.id)
                .with_for_update()
            )
        )
        .scalars()
        .all()
    )
    for key in keys:
        key.revoked_at = now
    return [key.id for key in keys]
