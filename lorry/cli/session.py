"""What most commands need: an authenticated client, a resolved scope, and errors as exit codes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, TypeVar

import httpx
import typer

from lorry.cli.output import note
from lorry.client import CloudApiClient, CloudApiError, DeploymentScope
from lorry.credentials import CredentialsNotFoundError, ensure_credentials

T = TypeVar("T")

OrgOption = Annotated[
    str | None, typer.Option("--org", help="Org slug (else LORRY_ORG, credentials, the token's only org).")
]
ProjectOption = Annotated[
    str | None,
    typer.Option("--project", help="Project slug (else LORRY_PROJECT, credentials, the only project)."),
]


@contextmanager
def failures_as_exit() -> Iterator[None]:
    """Any failure: the server's message on stderr and a non-zero exit, never a traceback."""
    try:
        yield
    except CloudApiError as exc:
        note(f"error: {exc.message} ({exc.status}{', ' + exc.code if exc.code else ''})")
        raise typer.Exit(1) from exc
    except CredentialsNotFoundError as exc:
        note(f"error: {exc}")
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        note(f"error: cannot reach the control plane: {exc}")
        raise typer.Exit(1) from exc


def run(action: Callable[[CloudApiClient], T]) -> T:
    with failures_as_exit(), CloudApiClient() as client:
        return action(client)


def resolve_scope(client: CloudApiClient, org: str | None, project: str | None) -> DeploymentScope:
    """--org/--project, then LORRY_ORG/LORRY_PROJECT, then the credentials, then the only choice."""
    credentials = client.credentials
    org = org or os.environ.get("LORRY_ORG") or credentials.org_slug
    project = project or os.environ.get("LORRY_PROJECT") or credentials.project_slug
    if org is None:
        orgs = client.me().orgs
        if len(orgs) != 1:
            raise CloudApiError(
                400, "Several orgs are visible: pass --org or set LORRY_ORG", "scope_required"
            )
        org = orgs[0].slug
    if project is None:
        projects = client.list_projects(org).projects
        if len(projects) != 1:
            raise CloudApiError(
                400, "Several projects: pass --project or set LORRY_PROJECT", "scope_required"
            )
        project = projects[0].slug
    return DeploymentScope(org_slug=org, project_slug=project)


def ensure_logged_in() -> None:
    with failures_as_exit():
        ensure_credentials()
