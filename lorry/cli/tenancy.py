"""`lorry login`, `lorry orgs …`, `lorry projects …`, `lorry admin tokens …`, `lorry audit list`."""

from __future__ import annotations

import asyncio
from datetime import datetime
from enum import StrEnum
from typing import Annotated

import typer

from lorry.cli.output import (
    TIME_FORMATS,
    ExpiresOption,
    JsonOption,
    as_utc,
    emit,
    emit_json,
    note,
    secret_line,
)
from lorry.cli.session import OrgOption, ScopeError, failures_as_exit, resolve_org, run
from lorry.client import CloudApiClient
from lorry.client.models import AdminTokenKind, CreatedAdminToken
from lorry.credentials import (
    Credentials,
    CredentialsNotFoundError,
    default_cloud_api_url,
    ensure_credentials,
    home_credentials_path,
    local_credentials_path,
    save_credentials,
)

orgs_app = typer.Typer(no_args_is_help=True, help="Organizations.")
projects_app = typer.Typer(no_args_is_help=True, help="Projects.")
admin_app = typer.Typer(no_args_is_help=True, help="Admin tokens.")
tokens_app = typer.Typer(no_args_is_help=True, help="List, revoke and roll admin tokens.")
audit_app = typer.Typer(no_args_is_help=True, help="The audit log.")
admin_app.add_typer(tokens_app, name="tokens")

Json = Annotated[bool, JsonOption]


class TokenKindChoice(StrEnum):
    install = "install"
    org = "org"


TOKEN_COLUMNS = ["id", "label", "prefix", "kind", "orgId", "enabled", "createdAt", "lastUsedAt", "expiresAt"]


def login(
    token: Annotated[str, typer.Option(prompt=True, hide_input=True, help="An admin token (lorry_admin_…).")],
    url: Annotated[
        str | None,
        typer.Option(
            help="The control plane's URL (default: LORRY_CLOUD_API_URL, else http://127.0.0.1:8081)."
        ),
    ] = None,
    org: Annotated[str | None, typer.Option(help="Default org slug for later commands.")] = None,
    project: Annotated[str | None, typer.Option(help="Default project slug for later commands.")] = None,
    local: Annotated[bool, typer.Option(help="Save in ./.lorry/ instead of ~/.lorry/.")] = False,
) -> None:
    """Check an admin token against the control plane and save it (atomically, mode 0600)."""
    api_url = url if url is not None else default_cloud_api_url(None)
    credentials = Credentials(token=token.strip(), apiUrl=api_url, orgSlug=org, projectSlug=project)
    with failures_as_exit(), CloudApiClient(api_url, credentials) as client:
        me = client.me()
        if org is not None or project is not None:
            # Fail now, not on every later command, if the saved defaults do not resolve.
            scope_org = org or me.org_slug or resolve_org(client, None)
            projects = client.list_projects(scope_org).projects
            if project is not None and project not in {p.slug for p in projects}:
                raise ScopeError(f"no project '{project}' in org '{scope_org}'")
    path = save_credentials(credentials, local_credentials_path() if local else home_credentials_path())
    note(f"logged in to {api_url} as {me.token.prefix} ({me.token.kind}); saved to {path}")


@orgs_app.command("list")
def list_orgs(as_json: Json = False) -> None:
    emit(run(lambda c: c.me().orgs), as_json=as_json, columns=["id", "slug", "name"])


@orgs_app.command("create")
def create_org(slug: str, name: Annotated[str | None, typer.Option()] = None, as_json: Json = False) -> None:
    emit(run(lambda c: c.create_org(slug, name or slug)), as_json=as_json, columns=["id", "slug", "name"])


@projects_app.command("list")
def list_projects(org: OrgOption = None, as_json: Json = False) -> None:
    rows = run(lambda c: c.list_projects(resolve_org(c, org)).projects)
    emit(rows, as_json=as_json, columns=["id", "slug", "name", "orgId"])


@projects_app.command("create")
def create_project(
    slug: str,
    name: Annotated[str | None, typer.Option()] = None,
    org: OrgOption = None,
    as_json: Json = False,
) -> None:
    row = run(lambda c: c.create_project(resolve_org(c, org), slug, name or slug))
    emit(row, as_json=as_json, columns=["id", "slug", "name", "orgId"])


@admin_app.command("create-token")
def create_token(
    kind: Annotated[TokenKindChoice, typer.Option(help="Every org (install), or one org's.")] = (
        TokenKindChoice.install
    ),
    org: Annotated[str | None, typer.Option(help="Org slug, for --kind org.")] = None,
    label: Annotated[str, typer.Option(help="A name to recognise the token by.")] = "cli",
    expires_at: Annotated[datetime | None, ExpiresOption] = None,
    database: Annotated[
        bool,
        typer.Option(
            "--database", help="Mint directly in LORRY_DATABASE_URL (the first token of an install)."
        ),
    ] = False,
    as_json: Json = False,
) -> None:
    """Mint an admin token, printed once. Without credentials (or with --database) it is written
    straight into the database; otherwise it is created through the admin API."""
    use_database = database
    if not use_database:
        try:
            ensure_credentials()
        except CredentialsNotFoundError:
            use_database = True
            note("no credentials: minting the token directly in the database (LORRY_DATABASE_URL)")
    if use_database:
        if expires_at is not None:
            raise typer.BadParameter("--expires-at needs the admin API (log in first)")
        from lorry.admin_bootstrap import mint_admin_token
        from lorry.settings import LorrySettings

        try:
            minted = asyncio.run(
                mint_admin_token(LorrySettings(), kind=kind.value, org_slug=org, label=label)
            )
        except ValueError as exc:
            note(f"error: {exc}")
            raise typer.Exit(1) from exc
        plaintext, token_id, prefix = minted.plaintext, minted.id, minted.prefix
    else:
        token_kind: AdminTokenKind = kind.value

        def action(client: CloudApiClient) -> CreatedAdminToken:
            org_slug = resolve_org(client, org) if token_kind == "org" else org
            return client.create_admin_token(
                label, kind=token_kind, org_slug=org_slug, expires_at=as_utc(expires_at)
            )

        created = run(action)
        plaintext, token_id, prefix = created.plaintext, created.id, created.prefix
    if as_json:
        emit_json({"token": plaintext, "id": token_id, "prefix": prefix, "kind": kind.value})
    else:
        secret_line("Admin token", plaintext)
        note(f"id {token_id}. The plaintext is shown this once.")


@tokens_app.command("list")
def list_tokens(
    org: Annotated[str | None, typer.Option(help="Only this org's tokens.")] = None, as_json: Json = False
) -> None:
    emit(run(lambda c: c.list_admin_tokens(org)), as_json=as_json, columns=TOKEN_COLUMNS)


@tokens_app.command("revoke")
def revoke_token(token_id: str, as_json: Json = False) -> None:
    run(lambda c: c.revoke_admin_token(token_id))
    if as_json:
        emit_json({"revoked": token_id})
    else:
        note(f"revoked admin token {token_id}")


@tokens_app.command("roll")
def roll_token(
    token_id: str,
    grace: Annotated[
        int | None, typer.Option(help="Seconds the old token keeps working (0 = revoke now).")
    ] = None,
    as_json: Json = False,
) -> None:
    rolled = run(lambda c: c.roll_admin_token(token_id, grace))
    if as_json:
        emit_json(rolled)
        return
    secret_line("Admin token", rolled.token.plaintext)
    note(f"previous token {rolled.previous.id} stops working at {rolled.previous.expires_at}")


@audit_app.command("list")
def list_audit(
    org: OrgOption = None,
    action: Annotated[str | None, typer.Option(help="e.g. deployment.create")] = None,
    since: Annotated[
        datetime | None,
        typer.Option(formats=TIME_FORMATS, help="Only events from then on (UTC unless an offset is given)."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 100,
    as_json: Json = False,
) -> None:
    rows = run(lambda c: c.list_audit_events(org, action=action, since=as_utc(since), limit=limit))
    columns = ["createdAt", "action", "resourceType", "resourceId", "actorTokenId", "details"]
    emit(rows, as_json=as_json, columns=columns)
