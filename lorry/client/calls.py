"""Every admin route as a `Call`: what to send and how to read the answer.

The sync and async clients are generated from these builders (one method each, same name and
signature), so the two cannot drift apart. A builder does no I/O.

Optional arguments left at `None` are not sent. In `update_engine`, the fields the server lets a
PATCH set to null default to `UNSET` instead, so passing `None` there sends an explicit null.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Generic, Literal, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, TypeAdapter

from lorry.client.models import (
    AdapterKind,
    AdminToken,
    AdminTokenKind,
    Artifact,
    AuditEvent,
    AuthMode,
    CreateAdminTokenRequest,
    CreatedAdminToken,
    CreatedDeploymentKey,
    CreateDeploymentKeyRequest,
    CreateDeploymentRequest,
    CreateEngineRequest,
    CreateJobRequest,
    CreateOrgRequest,
    CreateProjectRequest,
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
    RequestModel,
    RetentionMode,
    RolledAdminToken,
    RolledDeploymentKey,
    RollRequest,
    UpdateDeploymentRequest,
    UpdateEngineRequest,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class Unset(enum.Enum):
    """The type of `UNSET`: "leave this field out", where `None` would send a null."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET
Nullable = Literal[Unset.UNSET]


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    params: dict[str, str] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    upload: Path | None = None
    content_type: str | None = None


def _none(_body: Any) -> None:
    return None


def _field(name: str, model: type[M]) -> Callable[[Any], M]:
    return lambda body: model.model_validate(body[name])


def _list(name: str, model: type[M]) -> Callable[[Any], list[M]]:
    adapter = TypeAdapter(list[model])  # type: ignore[valid-type]
    return lambda body: adapter.validate_python(body[name])


def _whole(model: type[M]) -> Callable[[Any], M]:
    return model.model_validate


def _set(**fields: Any) -> dict[str, Any]:
    """The arguments the caller gave: `None` means "not given"."""
    return {key: value for key, value in fields.items() if value is not None}


def _given(**fields: Any) -> dict[str, Any]:
    """The arguments the caller gave where `None` is a value (an explicit null)."""
    return {key: value for key, value in fields.items() if value is not UNSET}


def _request(model: type[RequestModel], **fields: Any) -> dict[str, Any]:
    return model.model_validate(fields).wire()


def _id(value: str) -> str:
    """Ids go in paths: keep a stray `/` or `?` from reaching another route."""
    return quote(value, safe="")


# Tenancy


def me() -> Call[Me]:
    """The calling token and the organizations it may act in."""
    return Call("GET", "/v1/me", _whole(Me))


def list_projects(org_slug: str) -> Call[OrgProjects]:
    """The org and its projects."""
    return Call("GET", "/v1/projects", _whole(OrgProjects), params={"orgSlug": org_slug})


def create_project(org_slug: str, slug: str, name: str) -> Call[Project]:
    """409 `project_exists` when the slug is taken in the org."""
    body = _request(CreateProjectRequest, slug=slug, name=name)
    return Call("POST", "/v1/projects", _field("project", Project), {"orgSlug": org_slug}, body)


def create_org(slug: str, name: str) -> Call[Org]:
    """Install tokens only."""
    body = _request(CreateOrgRequest, slug=slug, name=name)
    return Call("POST", "/v1/orgs", _field("org", Org), json=body)


# Admin tokens


def list_admin_tokens(org_slug: str | None = None) -> Call[list[AdminToken]]:
    """Every token the caller may see (install tokens: all; `org_slug` filters)."""
    return Call("GET", "/v1/admin-tokens", _list("tokens", AdminToken), _set(orgSlug=org_slug))


def create_admin_token(
    label: str,
    *,
    kind: AdminTokenKind = "org",
    org_slug: str | None = None,
    expires_at: datetime | None = None,
) -> Call[CreatedAdminToken]:
    """An `install` token (every org, engines, admin tokens) or an `org` token for `org_slug`.
    The plaintext is in this answer only."""
    body = _request(
        CreateAdminTokenRequest, **_set(label=label, kind=kind, org_slug=org_slug, expires_at=expires_at)
    )
    return Call("POST", "/v1/admin-tokens", _field("token", CreatedAdminToken), json=body)


def revoke_admin_token(token_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/admin-tokens/{_id(token_id)}", _none)


def roll_admin_token(token_id: str, grace_period_seconds: int | None = None) -> Call[RolledAdminToken]:
    """A new token with the same label; the old one works for the grace period (0: stops now)."""
    body = _request(RollRequest, **_set(grace_period_seconds=grace_period_seconds))
    return Call("POST", f"/v1/admin-tokens/{_id(token_id)}/roll", _whole(RolledAdminToken), json=body)


# Deployments and their keys


def list_deployments(scope: DeploymentScope) -> Call[list[Deployment]]:
    return Call("GET", "/v1/endpoints", _list("deployments", Deployment), scope.params())


def get_deployment(deployment_id: str, scope: DeploymentScope) -> Call[Deployment]:
    path = f"/v1/endpoints/{_id(deployment_id)}"
    return Call("GET", path, _field("deployment", Deployment), scope.params())


def create_deployment(
    scope: DeploymentScope,
    *,
    slug: str,
    target: DeploymentTarget | dict[str, Any],
    auth_mode: AuthMode | None = None,
    run_retention_mode: RetentionMode | None = None,
    run_retention_days: int | None = None,
) -> Call[Deployment]:
    """Publish an adapter or a base model at `<slug>.<domain>`; the slug is never reused."""
    body = _request(
        CreateDeploymentRequest,
        **_set(
            slug=slug,
            target=target,
            auth_mode=auth_mode,
            run_retention_mode=run_retention_mode,
            run_retention_days=run_retention_days,
        ),
    )
    return Call("POST", "/v1/endpoints", _field("deployment", Deployment), scope.params(), body)


def update_deployment(
    deployment_id: str,
    scope: DeploymentScope,
    *,
    target: DeploymentTarget | dict[str, Any] | None = None,
    auth_mode: AuthMode | None = None,
    enabled: bool | None = None,
    run_retention_mode: RetentionMode | None = None,
    run_retention_days: int | None = None,
) -> Call[Deployment]:
    """A partial update: only the arguments given are sent."""
    body = _request(
        UpdateDeploymentRequest,
        **_set(
            target=target,
            auth_mode=auth_mode,
            enabled=enabled,
            run_retention_mode=run_retention_mode,
            run_retention_days=run_retention_days,
        ),
    )
    path = f"/v1/endpoints/{_id(deployment_id)}"
    return Call("PATCH", path, _field("deployment", Deployment), scope.params(), body)


def delete_deployment(deployment_id: str, scope: DeploymentScope) -> Call[None]:
    """Its keys stop working and its slug stays reserved."""
    return Call("DELETE", f"/v1/endpoints/{_id(deployment_id)}", _none, scope.params())


def list_deployment_keys(deployment_id: str, scope: DeploymentScope) -> Call[list[DeploymentKey]]:
    """Revoked and expired keys are listed with `enabled=False`; never a plaintext."""
    path = f"/v1/endpoints/{_id(deployment_id)}/keys"
    return Call("GET", path, _list("keys", DeploymentKey), scope.params())


def create_deployment_key(
    deployment_id: str, scope: DeploymentScope, *, label: str, expires_at: datetime | None = None
) -> Call[CreatedDeploymentKey]:
    """The plaintext is in this answer only."""
    body = _request(CreateDeploymentKeyRequest, **_set(label=label, expires_at=expires_at))
    path = f"/v1/endpoints/{_id(deployment_id)}/keys"
    return Call("POST", path, _field("key", CreatedDeploymentKey), scope.params(), body)


def revoke_deployment_key(deployment_id: str, key_id: str, scope: DeploymentScope) -> Call[None]:
    path = f"/v1/endpoints/{_id(deployment_id)}/keys/{_id(key_id)}"
    return Call("DELETE", path, _none, scope.params())


def roll_deployment_key(
    deployment_id: str, key_id: str, scope: DeploymentScope, *, grace_period_seconds: int | None = None
) -> Call[RolledDeploymentKey]:
    """A new key with the same label; the old one works for the grace period (0: stops now)."""
    path = f"/v1/endpoints/{_id(deployment_id)}/keys/{_id(key_id)}/roll"
    body = _request(RollRequest, **_set(grace_period_seconds=grace_period_seconds))
    return Call("POST", path, _whole(RolledDeploymentKey), scope.params(), body)


# Jobs and adapters


def list_jobs(scope: DeploymentScope) -> Call[list[Job]]:
    return Call("GET", "/v1/jobs", _list("jobs", Job), scope.params())


def get_job(job_id: str, scope: DeploymentScope) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{_id(job_id)}", _field("job", Job), scope.params())


def create_job(scope: DeploymentScope, *, name: str, model: str) -> Call[Job]:
    """An empty job for `model` (a canonical base model id); add adapters with `upload_artifact`."""
    body = _request(CreateJobRequest, name=name, config={"model": model})
    return Call("POST", "/v1/jobs", _field("job", Job), scope.params(), body)


def import_job(scope: DeploymentScope, *, name: str, path: str, model: str | None = None) -> Call[Job]:
    """Import a fine-tuning output directory on the server (under `LORRY_IMPORT_ROOTS`): the final
    adapter at its root, checkpoints in `checkpoint-<step>/`. `model` defaults to the adapter's
    `base_model_name_or_path`."""
    body = _request(
        CreateJobRequest,
        name=name,
        config=_set(model=model),
        source={"kind": "directory", "path": path},
    )
    return Call("POST", "/v1/jobs", _field("job", Job), scope.params(), body)


def delete_job(job_id: str, scope: DeploymentScope) -> Call[None]:
    """409 `in_use` while a deployment targets it."""
    return Call("DELETE", f"/v1/jobs/{_id(job_id)}", _none, scope.params())


def upload_artifact(
    job_id: str,
    scope: DeploymentScope,
    archive: Path,
    *,
    kind: AdapterKind = "final",
    step: int | None = None,
) -> Call[Artifact]:
    """A `.tar.gz` or `.zip` of one PEFT LoRA adapter, as the job's final adapter or checkpoint `step`."""
    params = scope.params() | {"kind": kind} | ({} if step is None else {"step": str(step)})
    content_type = "application/zip" if archive.suffix.lower() == ".zip" else "application/gzip"
    path = f"/v1/jobs/{_id(job_id)}/artifacts"
    return Call("POST", path, _whole(Artifact), params, upload=archive, content_type=content_type)


# Engines (install tokens)


def list_engines() -> Call[list[Engine]]:
    """Static engines (`LORRY_ENGINES`, read-only) first, then registered ones."""
    return Call("GET", "/v1/engines", _list("engines", Engine))


def get_engine(engine_id: str) -> Call[Engine]:
    return Call("GET", f"/v1/engines/{_id(engine_id)}", _field("engine", Engine))


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
    """Register a vLLM server; `api_key` is write-only (the answer only says `hasApiKey`)."""
    body = _request(
        CreateEngineRequest,
        **_set(
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
        ),
    )
    return Call("POST", "/v1/engines", _field("engine", Engine), json=body)


def update_engine(
    engine_id: str,
    *,
    name: str | None = None,
    url: str | None = None,
    base_model: str | None = None,
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
    enabled: bool | None = None,
    served_model_name: str | Nullable | None = UNSET,
    adapter_root: str | Nullable | None = UNSET,
    max_cpu_loras: int | Nullable | None = UNSET,
    api_key: str | Nullable | None = UNSET,
) -> Call[Engine]:
    """A partial update. `None` for `served_model_name`/`adapter_root` restores the default, for
    `max_cpu_loras` clears it, for `api_key` removes the key; leave them `UNSET` to keep them."""
    fields = _set(
        name=name,
        url=url,
        base_model=base_model,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        enabled=enabled,
    ) | _given(
        served_model_name=served_model_name,
        adapter_root=adapter_root,
        max_cpu_loras=max_cpu_loras,
        api_key=api_key,
    )
    body = _request(UpdateEngineRequest, **fields)
    return Call("PATCH", f"/v1/engines/{_id(engine_id)}", _field("engine", Engine), json=body)


def delete_engine(engine_id: str) -> Call[None]:
    return Call("DELETE", f"/v1/engines/{_id(engine_id)}", _none)


# Audit


def list_audit_events(
    org_slug: str | None = None,
    *,
    action: str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
) -> Call[list[AuditEvent]]:
    """Newest first. Install tokens see every org unless `org_slug` is given; org tokens their own."""
    params = _set(
        orgSlug=org_slug,
        action=action,
        since=None if since is None else since.isoformat(),
        limit=None if limit is None else str(limit),
    )
    return Call("GET", "/v1/audit-events", _list("events", AuditEvent), params)
