"""Jobs and their adapters: the logic behind the routes (DESIGN §4 "Jobs").

Order of every adapter write: receive/copy into a work area → validate and hash the copy (all
of it, in a worker thread) → insert the rows and flush (a conflict stops here, before the store
is touched) → rename into the store → change-feed entry and audit record in the same
transaction. A rejection at any step leaves no row and no file: the work area is removed in
``finally`` (shielded from cancellation) and nothing reached the store.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import audit_log
from control_plane.jobs import archives
from control_plane.jobs.imports import ImportPlan, SourceAdapter, copy_source, plan_import
from control_plane.jobs.schemas import AdapterKind, AdapterOut, CreateJobRequest, JobConfigOut, JobOut
from control_plane.jobs.store import AdapterStore, StagedAdapter
from control_plane.jobs.validation import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterInfo,
    AdapterRejected,
    BaseModelConfigs,
    declared_base_model,
    validate_adapter,
)
from control_plane.principal import Principal
from lorry.changefeed import ChangeKind, append_change
from lorry.db.models import Adapter, Deployment, Job
from lorry.db.types import is_id, utcnow
from lorry.errors import Conflict, InvalidRequest, NotFound
from lorry.settings import LorrySettings

logger = logging.getLogger("lorry.control_plane")

QUEUED = "queued"
COMPLETED = "completed"
FINAL = "final"
CHECKPOINT = "checkpoint"

T = TypeVar("T")


async def in_thread(function: Callable[..., T], *args: Any) -> T:
    """Blocking file work off the event loop; a cancelled request waits for it to finish."""
    return await anyio.to_thread.run_sync(function, *args)


@asynccontextmanager
async def work_area(store: AdapterStore) -> AsyncIterator[Path]:
    area = await in_thread(store.open_work_area)
    try:
        yield area
    finally:
        with anyio.CancelScope(shield=True):
            await in_thread(store.close_work_area, area)


# --------------------------------------------------------------------------- reading


def job_not_found(job_id: str) -> NotFound:
    return NotFound("Job not found", code="job_not_found")


async def get_job(session: AsyncSession, project_id: str, job_id: str) -> Job:
    """The job in this project; a malformed id is 404 like an unknown one."""
    if not is_id(job_id):
        raise job_not_found(job_id)
    job = (
        await session.execute(select(Job).where(Job.id == job_id.lower(), Job.project_id == project_id))
    ).scalar_one_or_none()
    if job is None:
        raise job_not_found(job_id)
    return job


def adapter_out(adapter: Adapter) -> AdapterOut:
    return AdapterOut(
        id=adapter.id,
        kind=FINAL if adapter.kind == FINAL else CHECKPOINT,
        step=adapter.step,
        digest=adapter.digest,
        rank=adapter.rank,
        target_modules=list(adapter.target_modules),
        created_at=adapter.created_at,
    )


def _adapter_order(adapter: Adapter) -> tuple[int, int]:
    return (0, 0) if adapter.kind == FINAL else (1, adapter.step or 0)


def job_out(job: Job, adapters: list[Adapter]) -> JobOut:
    return JobOut(
        id=job.id,
        org_id=job.org_id,
        project_id=job.project_id,
        name=job.name,
        status=COMPLETED if job.status == COMPLETED else QUEUED,
        config=JobConfigOut(model=job.model),
        created_at=job.created_at,
        started_at=job.started_at,
        completed_at=job.completed_at,
        adapters=[adapter_out(a) for a in sorted(adapters, key=_adapter_order)],
    )


async def _adapters_of(session: AsyncSession, job_ids: list[str]) -> dict[str, list[Adapter]]:
    by_job: dict[str, list[Adapter]] = {job_id: [] for job_id in job_ids}
    if job_ids:
        rows = (await session.execute(select(Adapter).where(Adapter.job_id.in_(job_ids)))).scalars()
        for adapter in rows:
            by_job[adapter.job_id].append(adapter)
    return by_job


async def describe(session: AsyncSession, job: Job) -> JobOut:
    return job_out(job, (await _adapters_of(session, [job.id]))[job.id])


async def list_jobs(session: AsyncSession, project_id: str) -> list[JobOut]:
    jobs = list(
        (
            await session.execute(
                select(Job).where(Job.project_id == project_id).order_by(Job.created_at.desc(), Job.id)
            )
        ).scalars()
    )
    adapters = await _adapters_of(session, [job.id for job in jobs])
    return [job_out(job, adapters[job.id]) for job in jobs]


# --------------------------------------------------------------------------- staging


@dataclass(frozen=True, slots=True)
class ReadyAdapter:
    """A validated, sealed adapter in a work area, waiting for its row and its rename."""

    kind: str
    step: int | None
    info: AdapterInfo
    staged: StagedAdapter


def _labelled(label: str, error: AdapterRejected) -> AdapterRejected:
    return AdapterRejected(f"{label}: {error.message}", code=error.code)


def _stage_import(
    plan: ImportPlan,
    store: AdapterStore,
    area: Path,
    model: str | None,
    settings: LorrySettings,
) -> list[ReadyAdapter]:
    base_config = BaseModelConfigs(settings.cache_dir).get(model)
    ready = []
    for source in plan.adapters:
        stage = store.new_stage(area)
        try:
            copy_source(source, stage, max_weights_bytes=settings.max_upload_bytes)
            info = validate_adapter(stage, max_rank=settings.max_lora_rank, base_config=base_config)
        except AdapterRejected as error:
            raise _labelled(source.label, error) from error
        ready.append(
            ReadyAdapter(
                kind=FINAL if source.step is None else CHECKPOINT,
                step=source.step,
                info=info,
                staged=store.seal(stage),
            )
        )
    return ready


def _import_model(plan: ImportPlan, requested: str | None) -> str:
    if requested:
        return requested
    sources: tuple[SourceAdapter, ...] = plan.adapters
    for source in sources:
        declared = declared_base_model(source.config)
        if declared:
            return declared
    raise InvalidRequest(
        "config.model is required: the adapter does not name its base model (base_model_name_or_path)"
    )


def _stage_archive(
    archive: Path,
    kind: archives.ArchiveKind,
    store: AdapterStore,
    area: Path,
    model: str | None,
    settings: LorrySettings,
) -> tuple[AdapterInfo, StagedAdapter]:
    extracted = archives.extract_adapter(archive, kind, area, limit=settings.max_upload_bytes)
    archive.unlink()  # the disk it used is needed no more
    stage = store.new_stage(area)
    extracted.config.rename(stage / CONFIG_FILE)
    extracted.weights.rename(stage / WEIGHTS_FILE)
    base_config = BaseModelConfigs(settings.cache_dir).get(model)
    info = validate_adapter(stage, max_rank=settings.max_lora_rank, base_config=base_config)
    return info, store.seal(stage)


# --------------------------------------------------------------------------- writing


def _new_adapter_row(job: Job, ready: ReadyAdapter) -> Adapter:
    return Adapter(
        job_id=job.id,
        kind=ready.kind,
        step=ready.step,
        digest=ready.staged.digest,
        rank=ready.info.rank,
        target_modules=list(ready.info.target_modules),
        base_model=ready.info.base_model,
    )


async def _flush_or_conflict(session: AsyncSession, message: str, code: str) -> None:
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict(message, code=code) from exc


async def _commit_to_store(store: AdapterStore, ready: list[ReadyAdapter]) -> None:
    for item in ready:
        await in_thread(store.commit, item.staged)


def _mark_progress(job: Job, kind: str) -> None:
    now = utcnow()
    if job.started_at is None:
        job.started_at = now
    if kind == FINAL:
        job.status = COMPLETED
        job.completed_at = now


async def create_job(
    session: AsyncSession,
    *,
    principal: Principal,
    org_id: str,
    project_id: str,
    request: CreateJobRequest,
    settings: LorrySettings,
) -> JobOut:
    if request.source is None:
        if not request.config.model:
            raise InvalidRequest("config.model is required when no source is given")
        job = Job(org_id=org_id, project_id=project_id, name=request.name, model=request.config.model)
        session.add(job)
        await session.flush()
        await append_change(session, ChangeKind.JOB, job.id)
        audit_log.record(
            session, principal, "job.create", "job", job.id, org_id=org_id, details={"name": job.name}
        )
        return job_out(job, [])

    store = AdapterStore(settings.adapter_store)
    plan = await in_thread(plan_import, request.source.path, list(settings.import_roots))
    model = await in_thread(_import_model, plan, request.config.model)
    async with work_area(store) as area:
        ready = await in_thread(_stage_import, plan, store, area, model, settings)
        job = Job(org_id=org_id, project_id=project_id, name=request.name, model=model)
        session.add(job)
        await session.flush()
        rows = [_new_adapter_row(job, item) for item in ready]
        session.add_all(rows)
        for item in ready:
            _mark_progress(job, item.kind)
        await session.flush()
        await _commit_to_store(store, ready)
    await append_change(session, ChangeKind.JOB, job.id)
    audit_log.record(
        session,
        principal,
        "job.create",
        "job",
        job.id,
        org_id=org_id,
        details={
            "name": job.name,
            "source": "directory",
            "path": request.source.path,
            "adapters": [{"kind": r.kind, "step": r.step, "digest": r.digest} for r in rows],
        },
    )
    return job_out(job, rows)


@dataclass(frozen=True, slots=True)
class ArtifactTarget:
    kind: AdapterKind
    step: int | None


def artifact_target(kind: AdapterKind, step: int | None) -> ArtifactTarget:
    if kind == CHECKPOINT and step is None:
        raise InvalidRequest("kind=checkpoint needs a step (a non-negative integer)")
    if kind == FINAL and step is not None:
        raise InvalidRequest("step is only for kind=checkpoint")
    return ArtifactTarget(kind=kind, step=step)


async def ensure_free(session: AsyncSession, job_id: str, target: ArtifactTarget) -> None:
    """409 ``adapter_exists`` if the job already has this adapter (final, or that step)."""
    query = select(Adapter.id).where(Adapter.job_id == job_id, Adapter.kind == target.kind)
    if target.kind == CHECKPOINT:
        query = query.where(Adapter.step == target.step)
    if (await session.execute(query.limit(1))).first() is not None:
        raise _exists(target)


def _exists(target: ArtifactTarget) -> Conflict:
    what = "a final adapter" if target.kind == FINAL else f"a checkpoint at step {target.step}"
    return Conflict(f"This job already has {what}", code="adapter_exists")


async def receive_and_stage(
    chunks: AsyncIterable[bytes],
    kind: archives.ArchiveKind,
    store: AdapterStore,
    area: Path,
    model: str | None,
    settings: LorrySettings,
) -> tuple[AdapterInfo, StagedAdapter]:
    archive = area / "upload"
    await archives.receive(chunks, archive, limit=settings.max_upload_bytes)
    return await in_thread(_stage_archive, archive, kind, store, area, model, settings)


async def add_artifact(
    session: AsyncSession,
    *,
    principal: Principal,
    project_id: str,
    job_id: str,
    target: ArtifactTarget,
    info: AdapterInfo,
    staged: StagedAdapter,
    store: AdapterStore,
) -> tuple[JobOut, AdapterOut]:
    """Record an adapter staged by :func:`receive_and_stage`, then move it into the store."""
    job = await get_job(session, project_id, job_id)
    await ensure_free(session, job.id, target)
    ready = ReadyAdapter(kind=target.kind, step=target.step, info=info, staged=staged)
    row = _new_adapter_row(job, ready)
    session.add(row)
    _mark_progress(job, target.kind)
    await _flush_or_conflict(session, _exists(target).message, "adapter_exists")
    await _commit_to_store(store, [ready])
    await append_change(session, ChangeKind.JOB, job.id)
    audit_log.record(
        session,
        principal,
        "adapter.create",
        "adapter",
        row.id,
        org_id=job.org_id,
        details={"jobId": job.id, "kind": row.kind, "step": row.step, "digest": row.digest},
    )
    return await describe(session, job), adapter_out(row)


async def delete_job(session: AsyncSession, *, principal: Principal, project_id: str, job_id: str) -> None:
    job = await get_job(session, project_id, job_id)
    in_use = (
        await session.execute(
            select(Deployment.slug)
            .where(Deployment.job_id == job.id, Deployment.deleted_at.is_(None))
            .order_by(Deployment.slug)
            .limit(1)
        )
    ).scalar_one_or_none()
    if in_use is not None:
        raise Conflict(
            f"Job is the target of deployment '{in_use}'; re-target or delete it first", code="in_use"
        )
    try:
        # Deleted deployments keep their row (their slug stays reserved) but let go of the job.
        await session.execute(
            update(Deployment)
            .where(Deployment.job_id == job.id, Deployment.deleted_at.is_not(None))
            .values(job_id=None, adapter_id=None)
        )
        await session.execute(delete(Adapter).where(Adapter.job_id == job.id))
        await session.execute(delete(Job).where(Job.id == job.id))
    except IntegrityError as exc:  # a deployment created concurrently now targets it
        raise Conflict("Job is the target of a deployment", code="in_use") from exc
    await append_change(session, ChangeKind.JOB, job.id)
    audit_log.record(
        session, principal, "job.delete", "job", job.id, org_id=job.org_id, details={"name": job.name}
    )
