"""Routes for tenancy: `/v1/me`, `/v1/orgs`, `/v1/projects` (DESIGN §2)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from control_plane.auth import PrincipalDep
from control_plane.database import SessionDep
from control_plane.principal import Principal
from control_plane.scope import OrgScopeDep
from control_plane.tenancy import service
from control_plane.tenancy.schemas import (
    CreateOrgRequest,
    CreateProjectRequest,
    MeResponse,
    OrgResponse,
    ProjectListResponse,
    ProjectResponse,
)

router = APIRouter(tags=["tenancy"])


async def install_principal(principal: PrincipalDep) -> Principal:
    """403 before the body is read: an org token learns nothing from validation errors here."""
    principal.require_install()
    return principal


InstallPrincipalDep = Annotated[Principal, Depends(install_principal)]


@router.get("/v1/me", response_model=MeResponse)
async def get_me(session: SessionDep, principal: PrincipalDep) -> MeResponse:
    """The calling token and the organizations it may act in."""
    return await service.me(session, principal)


@router.post("/v1/orgs", response_model=OrgResponse, status_code=201)
async def create_org(
    session: SessionDep, principal: InstallPrincipalDep, body: CreateOrgRequest
) -> OrgResponse:
    """Create an organization (install tokens only)."""
    org = await service.create_org(session, principal, body)
    return OrgResponse(org=service.org_dto(org))


@router.get("/v1/projects", response_model=ProjectListResponse)
async def list_projects(session: SessionDep, scope: OrgScopeDep) -> ProjectListResponse:
    """The projects of `?orgSlug=`."""
    projects = await service.list_projects(session, scope.org)
    return ProjectListResponse(
        org=service.org_dto(scope.org), projects=[service.project_dto(p) for p in projects]
    )


@router.post("/v1/projects", response_model=ProjectResponse, status_code=201)
async def create_project(
    session: SessionDep, scope: OrgScopeDep, body: CreateProjectRequest
) -> ProjectResponse:
    """Create a project in `?orgSlug=`; 409 `project_exists` when the slug is taken there."""
    project = await service.create_project(session, scope.principal, scope.org, body)
    return ProjectResponse(project=service.project_dto(project))
