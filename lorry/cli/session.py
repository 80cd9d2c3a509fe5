"""What most commands need: an authenticated client, a resolved scope, and errors as exit codes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, TypeVar

import httpx
import typer
from pydantic import ValidationError

from lorry.cli.output import note
from lorry.client import CloudApiClient, CloudApiError, DeploymentScope
from lorry.credentials import CredentialsNotFoundError

T = TypeVar("T")

OrgOption = Annotated[
    str | None, typer.Option("--org", help="Org slug (else LORRY_ORG, credentials, the token's only org).")
]
ProjectOption = Annotated[
    str | None,
    typer.Option("--project", help="Project slug (else LORRY_PROJECT, credentials, the only project)."),
]


class ScopeError(Exception):
    """The scope cannot be resolved without asking the user to choose."""


@contextmanager
def failures_as_exit() -> Iterator[None]:
    """Any failure: the server's message on stderr and a non-zero exit, never a traceback."""
    try:
        yield
    except CloudApiError as exc:
        note(f"error: {exc.message} ({exc.status}{', ' + exc.code if exc.code else ''})")
        raise typer.Exit(1) from exc
    except (CredentialsNotFoundError, ScopeError) as exc:
        note(f"error: {exc}")
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        note(f"error: cannot reach the control plane: {exc}")
        raise typer.Exit(1) from exc
    except ValidationError as exc:
        note(f"error: the control plane's answer is not what this client understands: {exc}")
        raise typer.Exit(1) from exc


def run(action: Callable[[CloudApiClient], T]) -> T:
    with failures_as_exit(), CloudApiClient() as client:
        return action(client)


def resolve_org(client: CloudApiClient, org: str | None) -> str:
    """--org, then LORRY_ORG, then the credentials, then the token's org (or the only one it sees)."""
    chosen = org or os.environ.get("LORRY_ORG") or client.credentials.org_slug
    if chosen:
        return chosen
    me = client.me()
    if me.org_slug:
        return me.org_slug
    if len(me.orgs) == 1:
        return me.orgs[0].slug
    if not me.orgs:
        raise ScopeError("this token sees no org: create one with `lorry orgs create`")
    slugs = ", ".join(o.slug for o in me.orgs)
    raise ScopeError(f"this token sees several orgs ({slugs}): pass --org or set LORRY_ORG")


def resolve_scope(client: CloudApiClient, org: str | None, project: str | None) -> DeploymentScope:
    """DESIGN §2: --org/--project, then LORRY_ORG/LORRY_PROJECT, then the credentials file,
    then the token's only org and that org's only project."""
    org_slug = resolve_org(client, org)
    chosen = project or os.environ.get("LORRY_PROJECT") or client.credentials.project_slug
    if not chosen:
        projects = client.list_projects(org_slug).projects
        if not projects:
            raise ScopeError(f"org '{org_slug}' has no projects: create one with `lorry projects create`")
        if len(projects) > 1:
            slugs = ", ".join(p.slug for p in projects)
            raise ScopeError(
                f"org '{org_slug}' has several projects ({slugs}): pass --project or set LORRY_PROJECT"
            )
        chosen = projects[0].slug
    return DeploymentScope(org_slug=org_slug, project_slug=chosen)


def is_id(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
