"""`lorry deployments …` and `lorry keys …`."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import typer

from lorry.cli.output import ExpiresOption, JsonOption, as_utc, emit, emit_json, note, secret_line
from lorry.cli.session import OrgOption, ProjectOption, ScopeError, is_id, resolve_scope, run
from lorry.client import CloudApiClient, DeploymentScope
from lorry.client.models import (
    AuthMode,
    CreatedDeploymentKey,
    Deployment,
    RetentionMode,
    RolledDeploymentKey,
)

deployments_app = typer.Typer(
    no_args_is_help=True, help="Deployments: an adapter or base model at its own URL."
)
keys_app = typer.Typer(no_args_is_help=True, help="Deployment API keys.")

DEPLOYMENT_COLUMNS = ["id", "slug", "status", "enabled", "authMode", "baseUrl", "target", "createdAt"]
KEY_COLUMNS = ["id", "label", "prefix", "enabled", "createdAt", "lastUsedAt", "expiresAt"]

Json = Annotated[bool, JsonOption]
DeploymentArg = Annotated[str, typer.Argument(help="Deployment id or slug.")]
DeploymentOption = Annotated[str, typer.Option("--deployment", "-d", help="Deployment id or slug.")]


class AuthModeChoice(StrEnum):
    fixed_api_key = "fixed_api_key"
    none = "none"


class RetentionChoice(StrEnum):
    unlimited = "unlimited"
    disabled = "disabled"
    days = "days"


def _auth_mode(choice: AuthModeChoice | None) -> AuthMode | None:
    return None if choice is None else choice.value


def _retention(choice: RetentionChoice | None) -> RetentionMode | None:
    return None if choice is None else choice.value


def find_deployment(client: CloudApiClient, scope: DeploymentScope, ref: str) -> Deployment:
    """By id (the server answers), or by slug within the scope."""
    if is_id(ref):
        return client.get_deployment(ref, scope)
    for deployment in client.list_deployments(scope):
        if deployment.slug == ref:
            return deployment
    raise ScopeError(f"no deployment '{ref}' in {scope.org_slug}/{scope.project_slug}")


def build_target(job: str | None, step: int | None, base_model: str | None) -> dict[str, Any] | None:
    if job and base_model:
        raise typer.BadParameter("--job and --base-model are exclusive")
    if base_model:
        return {"kind": "base_model", "baseModel": base_model}
    if job:
        adapter: dict[str, Any] = {"kind": "final", "jobId": job}
        if step is not None:
            adapter = {"kind": "checkpoint", "jobId": job, "step": step}
        return {"kind": "adapter", "adapter": adapter}
    if step is not None:
        raise typer.BadParameter("--step needs --job")
    return None


@deployments_app.command("list")
def list_deployments(org: OrgOption = None, project: ProjectOption = None, as_json: Json = False) -> None:
    rows = run(lambda c: c.list_deployments(resolve_scope(c, org, project)))
    emit(rows, as_json=as_json, columns=DEPLOYMENT_COLUMNS)


@deployments_app.command("get")
def get_deployment(
    deployment: DeploymentArg, org: OrgOption = None, project: ProjectOption = None, as_json: Json = False
) -> None:
    row = run(lambda c: find_deployment(c, resolve_scope(c, org, project), deployment))
    emit(row, as_json=as_json, columns=DEPLOYMENT_COLUMNS)


@deployments_app.command("create")
def create_deployment(
    slug: Annotated[str, typer.Argument(help="Subdomain label: <slug>.<domain>.")],
    job: Annotated[
        str | None, typer.Option(help="Serve this job's final adapter (or --step checkpoint).")
    ] = None,
    step: Annotated[int | None, typer.Option(help="Checkpoint step of --job.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Serve a base model instead of an adapter.")] = None,
    auth_mode: Annotated[
        AuthModeChoice, typer.Option(help="Who may call it.")
    ] = AuthModeChoice.fixed_api_key,
    retention: Annotated[RetentionChoice | None, typer.Option(help="Run retention.")] = None,
    retention_days: Annotated[int | None, typer.Option(help="With --retention days.")] = None,
    org: OrgOption = None,
    project: ProjectOption = None,
    as_json: Json = False,
) -> None:
    target = build_target(job, step, base_model)
    if target is None:
        raise typer.BadParameter("give --job (adapter) or --base-model")
    row = run(
        lambda c: c.create_deployment(
            resolve_scope(c, org, project),
            slug=slug,
            target=target,
            auth_mode=_auth_mode(auth_mode),
            run_retention_mode=_retention(retention),
            run_retention_days=retention_days,
        )
    )
    emit(row, as_json=as_json, columns=DEPLOYMENT_COLUMNS)


def _update(ref: str, org: str | None, project: str | None, as_json: bool, **changes: Any) -> None:
    def action(client: CloudApiClient) -> Deployment:
        scope = resolve_scope(client, org, project)
        return client.update_deployment(find_deployment(client, scope, ref).id, scope, **changes)

    emit(run(action), as_json=as_json, columns=DEPLOYMENT_COLUMNS)


@deployments_app.command("update")
def update_deployment(
    deployment: DeploymentArg,
    job: Annotated[str | None, typer.Option(help="Re-target to this job's final adapter.")] = None,
    step: Annotated[int | None, typer.Option(help="Checkpoint step of --job.")] = None,
    base_model: Annotated[str | None, typer.Option(help="Re-target to a base model.")] = None,
    auth_mode: Annotated[AuthModeChoice | None, typer.Option(help="Who may call it.")] = None,
    retention: Annotated[RetentionChoice | None, typer.Option(help="Run retention.")] = None,
    retention_days: Annotated[int | None, typer.Option(help="With --retention days.")] = None,
    org: OrgOption = None,
    project: ProjectOption = None,
    as_json: Json = False,
) -> None:
    _update(
        deployment,
        org,
        project,
        as_json,
        target=build_target(job, step, base_model),
        auth_mode=_auth_mode(auth_mode),
        run_retention_mode=_retention(retention),
        run_retention_days=retention_days,
    )


@deployments_app.command("enable")
def enable(
    deployment: DeploymentArg, org: OrgOption = None, project: ProjectOption = None, as_json: Json = False
) -> None:
    _update(deployment, org, project, as_json, enabled=True)


@deployments_app.command("disable")
def disable(
    deployment: DeploymentArg, org: OrgOption = None, project: ProjectOption = None, as_json: Json = False
) -> None:
    """Disabled deployments answer 404; the slug, keys and target are kept."""
    _update(deployment, org, project, as_json, enabled=False)


@deployments_app.command("delete")
def delete(
    deployment: DeploymentArg, org: OrgOption = None, project: ProjectOption = None, as_json: Json = False
) -> None:
    """Delete for good: keys are revoked and the slug is never reused."""

    def action(client: CloudApiClient) -> Deployment:
        scope = resolve_scope(client, org, project)
        found = find_deployment(client, scope, deployment)
        client.delete_deployment(found.id, scope)
        return found

    found = run(action)
    if as_json:
        emit_json({"deleted": found.id})
    else:
        note(f"deleted deployment {found.slug} ({found.id})")


@keys_app.command("list")
def list_keys(
    deployment: DeploymentOption, org: OrgOption = None, project: ProjectOption = None, as_json: Json = False
) -> None:
    def action(client: CloudApiClient) -> list[Any]:
        scope = resolve_scope(client, org, project)
        return list(client.list_deployment_keys(find_deployment(client, scope, deployment).id, scope))

    emit(run(action), as_json=as_json, columns=KEY_COLUMNS)


def _show_new_key(key: CreatedDeploymentKey, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    if as_json:
        emit_json(key.model_dump(mode="json", by_alias=True) | (extra or {}))
        return
    secret_line("Key", key.plaintext)
    note(f"id {key.id}, label {key.label!r}, prefix {key.prefix}. The plaintext is shown this once.")


@keys_app.command("create")
def create_key(
    deployment: DeploymentOption,
    label: Annotated[str, typer.Option(help="1-80 characters.")] = "default",
    expires_at: Annotated[datetime | None, ExpiresOption] = None,
    org: OrgOption = None,
    project: ProjectOption = None,
    as_json: Json = False,
) -> None:
    """Issue a key; its plaintext is printed this once."""
    expires = as_utc(expires_at)

    def action(client: CloudApiClient) -> CreatedDeploymentKey:
        scope = resolve_scope(client, org, project)
        target = find_deployment(client, scope, deployment)
        return client.create_deployment_key(target.id, scope, label=label, expires_at=expires)

    _show_new_key(run(action), as_json)


@keys_app.command("revoke")
def revoke_key(
    key_id: Annotated[str, typer.Argument(help="Key id.")],
    deployment: DeploymentOption,
    org: OrgOption = None,
    project: ProjectOption = None,
    as_json: Json = False,
) -> None:
    def action(client: CloudApiClient) -> None:
        scope = resolve_scope(client, org, project)
        client.revoke_deployment_key(find_deployment(client, scope, deployment).id, key_id, scope)

    run(action)
    if as_json:
        emit_json({"revoked": key_id})
    else:
        note(f"revoked key {key_id}")


@keys_app.command("roll")
def roll_key(
    deployment: DeploymentOption,
    key_id: Annotated[str | None, typer.Argument(help="Key id (or --all).")] = None,
    all_keys: Annotated[
        bool, typer.Option("--all", help="Roll every active key (after an incident).")
    ] = False,
    grace: Annotated[
        int | None, typer.Option(help="Seconds the old key keeps working (0 = revoke now).")
    ] = None,
    org: OrgOption = None,
    project: ProjectOption = None,
    as_json: Json = False,
) -> None:
    if (key_id is None) == (not all_keys):
        raise typer.BadParameter("give a key id or --all")

    def action(client: CloudApiClient) -> list[RolledDeploymentKey]:
        scope = resolve_scope(client, org, project)
        target = find_deployment(client, scope, deployment)
        ids = (
            [key_id] if key_id else [k.id for k in client.list_deployment_keys(target.id, scope) if k.enabled]
        )
        return [client.roll_deployment_key(target.id, kid, scope, grace_period_seconds=grace) for kid in ids]

    rolled = run(action)
    if as_json:
        # One key: its roll result; --all: the list (empty when no key was active).
        emit_json(rolled if all_keys else rolled[0])
        return
    if not rolled:
        note("no active keys to roll")
    for result in rolled:
        _show_new_key(result.key, False)
        note(f"previous key {result.previous.id} stops working at {result.previous.expires_at}")
