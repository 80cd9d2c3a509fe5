"""Organizations, projects and who-am-I (DESIGN §2)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import audit_log
from control_plane.principal import Principal
from control_plane.tenancy.schemas import (
    CreateOrgRequest,
    CreateProjectRequest,
    MeResponse,
    MeToken,
    OrgDto,
    ProjectDto,
    is_valid_slug,
)
from lorry.changefeed import ChangeKind, append_change
from lorry.db.models import AdminToken, Organization, Project
from lorry.errors import Conflict, InvalidRequest, Unauthorized


def org_dto(org: Organization) -> OrgDto:
    return OrgDto(id=org.id, slug=org.slug, name=org.name)


def project_dto(project: Project) -> ProjectDto:
    return ProjectDto(id=project.id, slug=project.slug, name=project.name, org_id=project.org_id)


def check_slug(slug: str, what: str) -> None:
    if not is_valid_slug(slug):
        raise InvalidRequest(
            f"Invalid {what} slug: 2 to 50 lowercase letters, digits and single hyphens, "
            "starting and ending with a letter or digit",
            code="invalid_slug",
        )


async def me(session: AsyncSession, principal: Principal) -> MeResponse:
    token = await session.get(AdminToken, principal.token_id)
    if token is None:  # deleted between authentication and now
        raise Unauthorized()
    query = select(Organization).order_by(Organization.slug)
    if not principal.is_install:
        query = query.where(Organization.id == principal.org_id)
    orgs: Sequence[Organization] = (await session.execute(query)).scalars().all()
    own_slug = next((org.slug for org in orgs if org.id == principal.org_id), None)
    return MeResponse(
        token=MeToken(id=token.id, label=token.label, prefix=token.prefix, kind=token.kind),
        org_slug=own_slug,
        orgs=[org_dto(org) for org in orgs],
    )


async def create_org(session: AsyncSession, principal: Principal, body: CreateOrgRequest) -> Organization:
    principal.require_install()
    check_slug(body.slug, "organization")
    existing = await session.execute(select(Organization.id).where(Organization.slug == body.slug))
    if existing.first() is not None:
        raise Conflict(f"Organization '{body.slug}' already exists", code="org_exists")
    org = Organization(slug=body.slug, name=body.name)
    session.add(org)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent create won the race; the request rolls back
        raise Conflict(f"Organization '{body.slug}' already exists", code="org_exists") from exc
    await append_change(session, ChangeKind.ORG, org.id)
    audit_log.record(
        session,
        principal,
        "org.create",
        "org",
        org.id,
        org_id=org.id,
        details={"slug": org.slug, "name": org.name},
    )
    return org


async def list_projects(session: AsyncSession, org: Organization) -> Sequence[Project]:
    query = select(Project).where(Project.org_id == org.id).order_by(Project.slug)
    return (await session.execute(query)).scalars().all()


async def create_project(
    session: AsyncSession, principal: Principal, org: Organization, body: CreateProjectRequest
) -> Project:
    check_slug(body.slug, "project")
    existing = await session.execute(
        select(Project.id).where(Project.org_id == org.id, Project.slug == body.slug)
    )
    if existing.first() is not None:
        raise Conflict(f"Project '{body.slug}' already exists in '{org.slug}'", code="project_exists")
    project = Project(org_id=org.id, slug=body.slug, name=body.name)
    session.add(project)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict(
            f"Project '{body.slug}' already exists in '{org.slug}'", code="project_exists"
        ) from exc
    await append_change(session, ChangeKind.PROJECT, project.id)
    audit_log.record(
        session,
        principal,
        "project.create",
        "project",
        project.id,
        org_id=org.id,
        details={"slug": project.slug, "name": project.name, "orgSlug": org.slug},
    )
    return project
