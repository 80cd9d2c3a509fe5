"""Request and response models for orgs, projects and `/v1/me`."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StrictStr

from control_plane.schemas import PlainText, RequestModel, ResponseModel

SLUG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")
SLUG_MIN, SLUG_MAX = 2, 50
NAME_MAX = 200


def is_valid_slug(value: str) -> bool:
    """Org and project slugs: `^[a-z0-9][a-z0-9-]*[a-z0-9]$`, 2 to 50 chars, no `--`."""
    return (
        SLUG_MIN <= len(value) <= SLUG_MAX and SLUG_PATTERN.fullmatch(value) is not None and "--" not in value
    )


def _name(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= NAME_MAX:
        raise ValueError(f"name must be 1 to {NAME_MAX} characters")
    return value


# The slug's rules are checked by the service so that a bad slug is 400 `invalid_slug`, not the
# generic `invalid_request` (the body size limit bounds what is parsed).
SlugField = StrictStr
NameField = Annotated[PlainText, AfterValidator(_name)]


class CreateOrgRequest(RequestModel):
    slug: SlugField
    name: NameField


class CreateProjectRequest(RequestModel):
    slug: SlugField
    name: NameField


class OrgDto(ResponseModel):
    id: str
    slug: str
    name: str


class ProjectDto(ResponseModel):
    id: str
    slug: str
    name: str
    org_id: str


class OrgResponse(ResponseModel):
    org: OrgDto


class ProjectResponse(ResponseModel):
    project: ProjectDto


class ProjectListResponse(ResponseModel):
    org: OrgDto
    projects: list[ProjectDto]


class MeToken(ResponseModel):
    id: str
    label: str
    prefix: str
    kind: str


class MeResponse(ResponseModel):
    token: MeToken
    org_slug: str | None
    orgs: list[OrgDto]
