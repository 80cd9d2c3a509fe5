"""Resolving `?orgSlug=&projectSlug=` against the caller's token (DESIGN §2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query
from sqlalchemy import select

from control_plane.auth import PrincipalDep
from control_plane.database import SessionDep
from control_plane.principal import Principal
from lorry.db.models import Organization, Project
from lorry.errors import Forbidden, InvalidRequest, NotFound

# A slug is plain ASCII: anything else (a NUL byte above all, which PostgreSQL refuses) is a 400.
SLUG_QUERY_PATTERN = r"^[a-z0-9-]{0,100}$"
OrgSlugQuery = Annotated[str | None, Query(alias="orgSlug", pattern=SLUG_QUERY_PATTERN)]
ProjectSlugQuery = Annotated[str | None, Query(alias="projectSlug", pattern=SLUG_QUERY_PATTERN)]


@dataclass(frozen=True, slots=True)
class OrgScope:
    principal: Principal
    org: Organization


@dataclass(frozen=True, slots=True)
class ProjectScope:
    principal: Principal
    org: Organization
    project: Project


async def resolve_org(session: SessionDep, principal: Principal, org_slug: str | None) -> Organization:
    if not org_slug:
        raise InvalidRequest("orgSlug is required", code="scope_required")
    org = (
        await session.execute(select(Organization).where(Organization.slug == org_slug))
    ).scalar_one_or_none()
    if org is not None:
        principal.require_org(org.id)
        return org
    # An org token learns nothing about other orgs: 403 whether or not the slug exists.
    if not principal.is_install:
        raise Forbidden()
    raise NotFound(f"Organization '{org_slug}' not found", code="org_not_found")


async def get_org_scope(
    session: SessionDep, principal: PrincipalDep, org_slug: OrgSlugQuery = None
) -> OrgScope:
    return OrgScope(principal=principal, org=await resolve_org(session, principal, org_slug))


async def get_project_scope(
    session: SessionDep,
    principal: PrincipalDep,
    org_slug: OrgSlugQuery = None,
    project_slug: ProjectSlugQuery = None,
) -> ProjectScope:
    if not org_slug or not project_slug:
        raise InvalidRequest("orgSlug and projectSlug are required", code="scope_required")
    org = await resolve_org(session, principal, org_slug)
    project = (
        await session.execute(select(Project).where(Project.org_id == org.id, Project.slug == project_slug))
    ).scalar_one_or_none()
    if project is None:
        raise NotFound(f"Project '{project_slug}' not found", code="project_not_found")
    return ProjectScope(principal=principal, org=org, project=project)


OrgScopeDep = Annotated[OrgScope, Depends(get_org_scope)]
ProjectScopeDep = Annotated[ProjectScope, Depends(get_project_scope)]
