"""Routes for deployments: `/v1/endpoints` (DESIGN §4). Keys live in `keys_router`."""

from __future__ import annotations

from fastapi import APIRouter, Response

from control_plane.database import ContextDep, SessionDep
from control_plane.deployments import service
from control_plane.deployments.keys_router import router as keys_router
from control_plane.deployments.schemas import (
    CreateDeploymentRequest,
    DeploymentListResponse,
    DeploymentResponse,
    UpdateDeploymentRequest,
)
from control_plane.scope import ProjectScopeDep

router = APIRouter(tags=["deployments"])


@router.get("/v1/endpoints")
async def list_deployments(
    scope: ProjectScopeDep, session: SessionDep, ctx: ContextDep
) -> DeploymentListResponse:
    deployments = await service.list_deployments(session, scope.project.id)
    return DeploymentListResponse(deployments=await service.to_dtos(session, ctx.settings, deployments))


@router.post("/v1/endpoints", status_code=201)
async def create_deployment(
    body: CreateDeploymentRequest, scope: ProjectScopeDep, session: SessionDep, ctx: ContextDep
) -> DeploymentResponse:
    deployment = await service.create_deployment(session, ctx.settings, scope, body)
    return DeploymentResponse(deployment=await service.to_dto(session, ctx.settings, deployment))


@router.get("/v1/endpoints/{deployment_id}")
async def get_deployment(
    deployment_id: str, scope: ProjectScopeDep, session: SessionDep, ctx: ContextDep
) -> DeploymentResponse:
    deployment = await service.get_deployment(session, scope.project.id, deployment_id)
    return DeploymentResponse(deployment=await service.to_dto(session, ctx.settings, deployment))


@router.patch("/v1/endpoints/{deployment_id}")
async def update_deployment(
    deployment_id: str,
    body: UpdateDeploymentRequest,
    scope: ProjectScopeDep,
    session: SessionDep,
    ctx: ContextDep,
) -> DeploymentResponse:
    deployment = await service.update_deployment(session, scope, deployment_id, body)
    return DeploymentResponse(deployment=await service.to_dto(session, ctx.settings, deployment))


@router.delete("/v1/endpoints/{deployment_id}", status_code=204, response_class=Response)
async def delete_deployment(deployment_id: str, scope: ProjectScopeDep, session: SessionDep) -> Response:
    await service.delete_deployment(session, scope, deployment_id)
    return Response(status_code=204)


router.include_router(keys_router)
