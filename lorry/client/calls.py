"""Every admin route as a `Call`: what to send and how to read the answer.

The sync and async clients share these, so each of their methods is one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import TypeAdapter

from lorry.client.models import (
    AdminToken,
    AuditEvent,
    CreatedAdminToken,
    CreatedDeploymentKey,
    Deployment,
    DeploymentKey,
    DeploymentScope,
    DeploymentTarget,
    Engine,
    Job,
    Me,
    Org,
    OrgProjects,
    Project,
    RolledAdminToken,
    RolledDeploymentKey,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    params: dict[str, str] = field(default_factory=dict)
    json: Any = None
    upload: Path | None = None
    content_type: str | None = None


def _none(_body: Any) -> None:
    return None


def _field(name: str, model: type[T]) -> Callable[[Any], T]:
    adapter = TypeAdapter(model)
    return lambda body: adapter.validate_python(body[name])


def _list(name: str, model: type[T]) -> Callable[[Any], list[T]]:
    adapter = TypeAdapter(list[model])  # type: ignore[valid-type]
    return lambda body: adapter.validate_python(body[name])


def _whole(model: type[T]) -> Callable[[Any], T]:
    adapter = TypeAdapter(model)
    return adapter.validate_python


def _target(target: DeploymentTarget | dict[str, Any]) -> dict[str, Any]:
    if isinstance(target, dict):
        return target
    return target.model_dump(by_alias=True, exclude_none=True)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _body(**fields: Any) -> dict[str, Any]:
    """Only the fields the caller set: PATCH bodies are exactly what was passed."""
    return {key: value for key, value in fields.items() if value is not None}


# Tenancy


def me() -> Call[Me]:
    return Call("GET", "/v1/me", _whole(Me))


def list_projects(org_slug: str) -> Call[OrgProjects]:
    return Call("GET", "/v1/projects", _whole(OrgProjects), params={"orgSlug": org_slug})


def create_project(org_slug: str, slug: str, name: str) -> Call[Project]:
    return Call(
        "POST",
        "/v1/projects",
        _field("project", Project),
        {"orgSlug": org_slug},
        {"slug": slug, "name": name},
    )


def create_org(slug: str, name: str) -> Call[Org]:
    return Call("POST", "/v1/orgs", _field("org", Org), json={"slug": slug, "name": name})


# Admin tokens


def list_admin_tokens(org_slug: str | None = None) -> Call[list[AdminToken]]:
    return Call("GET", "/v1/admin-tokens", _list("tokens", AdminToken), _body(orgSlug=org_slug))


def create_admin_token(
    label: str, kind: str = "org", org_slug: str | None = None, expires_at: datetime | None = None
) -> Call[CreatedAdminToken]:
    body = _body(label=label, kind=kind, orgSlug=org_slug, expiresAt=_iso(expires_at))
    return Call("POST", "/v1/admin-tokens", _field("token", CreatedAdminToken), json=body)


def revoke_admin_token(token_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/admin-tokens/{token_id}", _none)


def roll_admin_token(token_id: str, grace_period_seconds: int | None = None) -> Call[RolledAdminToken]:
    body = _body(gracePeriodSeconds=grace_period_seconds)
    return Call("POST", f"/v1/admin-tokens/{token_id}/roll", _whole(RolledAdminToken), json=body)


# Deployments and their keys


def list_deployments(scope: DeploymentScope) -> Call[list[Deployment]]:
    return Call("GET", "/v1/endpoints", _list("deployments", Deployment), scope.params())


def get_deployment(deployment_id: str, scope: DeploymentScope) -> Call[Deployment]:
    return Call("GET", f"/v1/endpoints/{deployment_id}", _field("deployment", Deployment), scope.params())


def create_deployment(
    scope: DeploymentScope,
    *,
    slug: str,
    target: DeploymentTarget | dict[str, Any],
    auth_mode: str | None = None,
    run_retention_mode: str | None = None,
    run_retention_days: int | None = None,
) -> Call[Deployment]:
    body = _body(
        slug=slug,
        target=_target(target),
        authMode=auth_mode,
        runRetentionMode=run_retention_mode,
        runRetentionDays=run_retention_days,
    )
    return Call("POST", "/v1/endpoints", _field("deployment", Deployment), scope.params(), body)


def update_deployment(
    deployment_id: str,
    scope: DeploymentScope,
    *,
    target: DeploymentTarget | dict[str, Any] | None = None,
    auth_mode: str | None = None,
    enabled: bool | None = None,
    run_retention_mode: str | None = None,
    run_retention_days: int | None = None,
) -> Call[Deployment]:
    body = _body(
        target=None if target is None else _target(target),
        authMode=auth_mode,
        enabled=enabled,
        runRetentionMode=run_retention_mode,
        runRetentionDays=run_retention_days,
    )
    return Call(
        "PATCH", f"/v1/endpoints/{deployment_id}", _field("deployment", Deployment), scope.params(), body
    )


def delete_deployment(deployment_id: str, scope: DeploymentScope) -> Call[None]:
    return Call("DELETE", f"/v1/endpoints/{deployment_id}", _none, scope.params())


def list_deployment_keys(deployment_id: str, scope: DeploymentScope) -> Call[list[DeploymentKey]]:
    return Call("GET", f"/v1/endpoints/{deployment_id}/keys", _list("keys", DeploymentKey), scope.params())


def create_deployment_key(
    deployment_id: str, scope: DeploymentScope, *, label: str, expires_at: datetime | None = None
) -> Call[CreatedDeploymentKey]:
    body = _body(label=label, expiresAt=_iso(expires_at))
    path = f"/v1/endpoints/{deployment_id}/keys"
    return Call("POST", path, _field("key", CreatedDeploymentKey), scope.params(), body)


def revoke_deployment_key(deployment_id: str, key_id: str, scope: DeploymentScope) -> Call[None]:
    return Call("DELETE", f"/v1/endpoints/{deployment_id}/keys/{key_id}", _none, scope.params())


def roll_deployment_key(
    deployment_id: str, key_id: str, scope: DeploymentScope, *, grace_period_seconds: int | None = None
) -> Call[RolledDeploymentKey]:
    path = f"/v1/endpoints/{deployment_id}/keys/{key_id}/roll"
    body = _body(gracePeriodSeconds=grace_period_seconds)
    return Call("POST", path, _whole(RolledDeploymentKey), scope.params(), body)


# Jobs and adapters


def list_jobs(scope: DeploymentScope) -> Call[list[Job]]:
    return Call("GET", "/v1/jobs", _list("jobs", Job), scope.params())


def get_job(job_id: str, scope: DeploymentScope) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{job_id}", _field("job", Job), scope.params())


def create_job(scope: DeploymentScope, *, name: str, model: str | None = None) -> Call[Job]:
    body = {"name": name, "config": _body(model=model)}
    return Call("POST", "/v1/jobs", _field("job", Job), scope.params(), body)


def import_job(scope: DeploymentScope, *, name: str, path: str, model: str | None = None) -> Call[Job]:
    body = {"name": name, "config": _body(model=model), "source": {"kind": "directory", "path": path}}
    return Call("POST", "/v1/jobs", _field("job", Job), scope.params(), body)


def delete_job(job_id: str, scope: DeploymentScope) -> Call[None]:
    return Call("DELETE", f"/v1/jobs/{job_id}", _none, scope.params())


def upload_artifact(
    job_id: str, scope: DeploymentScope, archive: Path, *, kind: str = "final", step: int | None = None
) -> Call[Job]:
    params = scope.params() | {"kind": kind} | ({} if step is None else {"step": str(step)})
    content_type = "application/zip" if archive.suffix == ".zip" else "application/gzip"
    path = f"/v1/jobs/{job_id}/artifacts"
    return Call("POST", path, _field("job", Job), params, upload=archive, content_type=content_type)


# Engines


def list_engines() -> Call[list[Engine]]:
    return Call("GET", "/v1/engines", _list("engines", Engine))


def get_engine(engine_id: str) -> Call[Engine]:
    return Call("GET", f"/v1/engines/{engine_id}", _field("engine", Engine))


def _engine_fields(
    *,
    name: str | None,
    url: str | None,
    base_model: str | None,
    served_model_name: str | None,
    adapter_root: str | None,
    max_loras: int | None,
    max_cpu_loras: int | None,
    max_lora_rank: int | None,
    enabled: bool | None,
    api_key: str | None,
) -> dict[str, Any]:
    return _body(
        name=name,
        url=url,
        baseModel=base_model,
        servedModelName=served_model_name,
        adapterRoot=adapter_root,
        maxLoras=max_loras,
        maxCpuLoras=max_cpu_loras,
        maxLoraRank=max_lora_rank,
        enabled=enabled,
        apiKey=api_key,
    )


def create_engine(
    *,
    name: str,
    url: str,
    base_model: str,
    served_model_name: str | None = None,
    adapter_root: str | None = None,
    max_loras: int | None = None,
    max_cpu_loras: int | None = None,
    max_lora_rank: int | None = None,
    enabled: bool | None = None,
    api_key: str | None = None,
) -> Call[Engine]:
    body = _engine_fields(
        name=name,
        url=url,
        base_model=base_model,
        served_model_name=served_model_name,
        adapter_root=adapter_root,
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        max_lora_rank=max_lora_rank,
        enabled=enabled,
        api_key=api_key,
    )
    return Call("POST", "/v1/engines", _field("engine", Engine), json=body)


def update_engine(
    engine_id: str,
    *,
    url: str | None = None,
    base_model: str | None = None,
    served_model_name: str | None = None,
    adapter_root: str | None = None,
    max_loras: int | None = None,
    max_cpu_loras: int | None = None,
    max_lora_rank: int | None = None,
    enabled: bool | None = None,
    api_key: str | None = None,
) -> Call[Engine]:
    body = _engine_fields(
        name=None,
        url=url,
        base_model=base_model,
        served_model_name=served_model_name,
        adapter_root=adapter_root,
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        max_lora_rank=max_lora_rank,
        enabled=enabled,
        api_key=api_key,
    )
    return Call("PATCH", f"/v1/engines/{engine_id}", _field("engine", Engine), json=body)


def delete_engine(engine_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/engines/{engine_id}", _none)


# Audit


def list_audit_events(
    org_slug: str | None = None,
    *,
    action: str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
) -> Call[list[AuditEvent]]:
    params = _body(
        orgSlug=org_slug, action=action, since=_iso(since), limit=None if limit is None else str(limit)
    )
    return Call("GET", "/v1/audit-events", _list("events", AuditEvent), params)
