"""Routes for jobs and their adapters (DESIGN §4 "Jobs")."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from control_plane.auth import bearer_token
from control_plane.database import ContextDep, SessionDep
from control_plane.jobs import archives, service
from control_plane.jobs.imports import MAX_STEP
from control_plane.jobs.schemas import (
    AdapterKind,
    ArtifactEnvelope,
    CreateJobRequest,
    JobEnvelope,
    JobsEnvelope,
)
from control_plane.jobs.store import AdapterStore
from control_plane.schemas import ErrorBody
from control_plane.scope import (
    OrgSlugQuery,
    ProjectScope,
    ProjectScopeDep,
    ProjectSlugQuery,
    get_project_scope,
)

router = APIRouter(tags=["jobs"])


async def detached_project_scope(
    request: Request,
    ctx: ContextDep,
    org_slug: OrgSlugQuery = None,
    project_slug: ProjectSlugQuery = None,
) -> ProjectScope:
    """The caller and scope, resolved in a short read-only session of their own.

    Imports and uploads spend most of their time on file I/O; resolving the scope outside the
    request session means that session holds no database connection meanwhile (the embedded
    SQLite has exactly one) and only connects for the final writes.
    """
    token = bearer_token(request)
    async with ctx.sessionmaker() as session:
        principal = await ctx.verifier.authenticate(session, token)
        return await get_project_scope(session, principal, org_slug, project_slug)


DetachedScopeDep = Annotated[ProjectScope, Depends(detached_project_scope)]

_ARCHIVE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors), at the "
        "archive root or inside its single top-level directory.",
        "content": {
            "application/gzip": {"schema": {"type": "string", "format": "binary"}},
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.get("/v1/jobs", response_model=JobsEnvelope)
async def list_jobs(scope: ProjectScopeDep, session: SessionDep) -> JobsEnvelope:
    return JobsEnvelope(jobs=await service.list_jobs(session, scope.project.id))


@router.post("/v1/jobs", status_code=201, response_model=JobEnvelope)
async def create_job(
    body: CreateJobRequest, scope: DetachedScopeDep, session: SessionDep, ctx: ContextDep
) -> JobEnvelope:
    """Create an empty job (`config.model` required), or import a fine-tuning output directory
    (`source.kind: "directory"`) whose final adapter and `checkpoint-<step>/` adapters are
    validated and copied into the adapter store."""
    job = await service.create_job(
        session,
        principal=scope.principal,
        org_id=scope.org.id,
        project_id=scope.project.id,
        request=body,
        settings=ctx.settings,
    )
    return JobEnvelope(job=job)


@router.get("/v1/jobs/{job_id}", response_model=JobEnvelope)
async def get_job(job_id: str, scope: ProjectScopeDep, session: SessionDep) -> JobEnvelope:
    job = await service.get_job(session, scope.project.id, job_id)
    return JobEnvelope(job=await service.describe(session, job))


@router.delete("/v1/jobs/{job_id}", status_code=204, response_class=Response)
async def delete_job(job_id: str, scope: ProjectScopeDep, session: SessionDep) -> Response:
    """Delete the job and its adapter rows (409 `in_use` while a deployment targets it); the
    adapter store keeps the files."""
    await service.delete_job(session, principal=scope.principal, project_id=scope.project.id, job_id=job_id)
    return Response(status_code=204)


@router.post(
    "/v1/jobs/{job_id}/artifacts",
    status_code=201,
    response_model=ArtifactEnvelope,
    openapi_extra=_ARCHIVE_BODY,
    responses={
        415: {"model": ErrorBody, "description": "Body is neither application/gzip nor application/zip"}
    },
)
async def upload_artifact(
    job_id: str,
    request: Request,
    scope: DetachedScopeDep,
    session: SessionDep,
    ctx: ContextDep,
    kind: Annotated[AdapterKind, Query()],
    step: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
) -> ArtifactEnvelope:
    """Add the job's final adapter or a checkpoint from a raw tar.gz or zip body. A job becomes
    `completed` with its final adapter; a second final, or a repeated step, is 409."""
    async with ctx.sessionmaker() as check:
        job = await service.get_job(check, scope.project.id, job_id)
        target = service.artifact_target(kind, step)
        archive_kind = archives.archive_kind(request.headers.get("content-type"))
        await service.ensure_free(check, job.id, target)
        model = job.model
    store = AdapterStore(ctx.settings.adapter_store)
    async with service.work_area(store) as area:
        info, staged = await service.receive_and_stage(
            request.stream(), archive_kind, store, area, model, ctx.settings
        )
        job_dto, adapter = await service.add_artifact(
            session,
            principal=scope.principal,
            project_id=scope.project.id,
            job_id=job.id,
            target=target,
            info=info,
            staged=staged,
            store=store,
        )
    return ArtifactEnvelope(job=job_dto, adapter=adapter)
