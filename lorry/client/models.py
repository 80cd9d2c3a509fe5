"""Request and response models of the admin API.

Responses are read leniently: unknown fields are kept (``extra="allow"``) and open enums stay
strings, so a newer server never breaks an older client. Requests are typed for the caller but not
validated beyond their types here: the server is the one judge of a value, and its 400 arrives as
a `CloudApiError` with its own message.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer
from pydantic.alias_generators import to_camel

AuthMode = Literal["fixed_api_key", "none"]
RetentionMode = Literal["unlimited", "disabled", "days"]
AdapterKind = Literal["final", "checkpoint"]
AdminTokenKind = Literal["install", "org"]


def _iso(value: datetime) -> str:
    """The API's one time format, `YYYY-MM-DDTHH:MM:SS.sssZ`, so re-serialised values match the server's."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


Timestamp = Annotated[datetime, PlainSerializer(_iso, return_type=str, when_used="json")]


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class RequestModel(BaseModel):
    """A request body: camelCase on the wire, and only the fields the caller set are sent."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


class DeploymentScope(ApiModel):
    org_slug: str
    project_slug: str

    def params(self) -> dict[str, str]:
        return {"orgSlug": self.org_slug, "projectSlug": self.project_slug}


class _Tagged(ApiModel):
    """A union member whose `kind` counts as set even when left at its default, so a request
    body sent with only the fields set still carries its discriminator."""

    def model_post_init(self, context: Any, /) -> None:
        self.__pydantic_fields_set__.add("kind")


class FinalAdapterRef(_Tagged):
    kind: Literal["final"] = "final"
    job_id: str


class CheckpointAdapterRef(_Tagged):
    kind: Literal["checkpoint"] = "checkpoint"
    job_id: str
    step: int


class AdapterTarget(_Tagged):
    kind: Literal["adapter"] = "adapter"
    adapter: Annotated[FinalAdapterRef | CheckpointAdapterRef, Field(discriminator="kind")]


class BaseModelTarget(_Tagged):
    kind: Literal["base_model"] = "base_model"
    base_model: str


DeploymentTarget = Annotated[AdapterTarget | BaseModelTarget, Field(discriminator="kind")]


class Deployment(ApiModel):
    id: str
    slug: str
    org_id: str
    project_id: str
    # Reads keep unknown future target kinds as plain dicts rather than failing a whole list.
    target: DeploymentTarget | dict[str, Any]
    auth_mode: str
    url_format: str = "openai_compat"
    enabled: bool
    custom_domain: str | None = None
    run_retention_mode: str | None = None
    run_retention_days: int | None = None
    created_at: Timestamp
    updated_at: Timestamp
    base_url: str | None = None
    status: str | None = None


class DeploymentKey(ApiModel):
    id: str
    label: str
    prefix: str
    enabled: bool
    created_at: Timestamp
    last_used_at: Timestamp | None = None
    expires_at: Timestamp | None = None


class CreatedDeploymentKey(ApiModel):
    id: str
    label: str
    plaintext: str
    prefix: str
    created_at: Timestamp
    expires_at: Timestamp | None = None


class PreviousKey(ApiModel):
    """The rolled key or token: it keeps working until `expires_at` (now, with a zero grace period)."""

    id: str
    expires_at: Timestamp | None = None


class RolledDeploymentKey(ApiModel):
    key: CreatedDeploymentKey
    previous: PreviousKey


class JobAdapter(ApiModel):
    id: str
    kind: str
    step: int | None = None
    digest: str
    rank: int
    target_modules: list[str] = Field(default_factory=list)
    created_at: Timestamp


class JobConfig(ApiModel):
    model: str | None = None


class Job(ApiModel):
    id: str
    org_id: str
    project_id: str
    name: str
    status: str
    config: JobConfig
    created_at: Timestamp
    started_at: Timestamp | None = None
    completed_at: Timestamp | None = None
    adapters: list[JobAdapter] = Field(default_factory=list)


class Engine(ApiModel):
    id: str
    name: str
    url: str
    base_model: str
    served_model_name: str | None = None
    adapter_root: str | None = None
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    max_lora_rank: int | None = None
    enabled: bool = True
    source: str = "api"
    has_api_key: bool | None = None
    created_at: Timestamp | None = None
    updated_at: Timestamp | None = None


class Org(ApiModel):
    id: str
    slug: str
    name: str


class Project(ApiModel):
    id: str
    slug: str
    name: str
    org_id: str


class OrgProjects(ApiModel):
    org: Org
    projects: list[Project]


class TokenInfo(ApiModel):
    id: str
    label: str
    prefix: str
    kind: str


class Me(ApiModel):
    token: TokenInfo
    org_slug: str | None = None
    orgs: list[Org]


class AdminToken(ApiModel):
    id: str
    label: str
    prefix: str
    kind: str
    org_id: str | None = None
    org_slug: str | None = None
    enabled: bool = True
    created_at: Timestamp
    last_used_at: Timestamp | None = None
    expires_at: Timestamp | None = None


class CreatedAdminToken(AdminToken):
    plaintext: str


class RolledAdminToken(ApiModel):
    token: CreatedAdminToken
    previous: PreviousKey


class AuditEvent(ApiModel):
    id: str
    org_id: str | None = None
    actor_token_id: str | None = None
    action: str
    resource_type: str
    resource_id: str
    details: dict[str, Any] = Field(default_factory=dict)
    created_at: Timestamp


class Artifact(ApiModel):
    """What an upload answers: the job as it now stands, and the adapter just added."""

    job: Job
    adapter: JobAdapter


# Requests


class CreateProjectRequest(RequestModel):
    slug: str
    name: str


class CreateOrgRequest(RequestModel):
    slug: str
    name: str


class CreateAdminTokenRequest(RequestModel):
    label: str
    kind: AdminTokenKind
    org_slug: str | None = None
    expires_at: Timestamp | None = None


class RollRequest(RequestModel):
    """Rolling a deployment key or an admin token; without a grace period the server's default applies."""

    grace_period_seconds: int | None = None


class CreateDeploymentRequest(RequestModel):
    slug: str
    # A plain dict is sent as given (e.g. a target kind this client does not know yet).
    target: DeploymentTarget | dict[str, Any]
    auth_mode: AuthMode | None = None
    run_retention_mode: RetentionMode | None = None
    run_retention_days: int | None = None


class UpdateDeploymentRequest(RequestModel):
    """Partial: only the fields set are sent; the slug cannot change."""

    target: DeploymentTarget | dict[str, Any] | None = None
    auth_mode: AuthMode | None = None
    enabled: bool | None = None
    run_retention_mode: RetentionMode | None = None
    run_retention_days: int | None = None


class CreateDeploymentKeyRequest(RequestModel):
    label: str
    expires_at: Timestamp | None = None


class JobSource(RequestModel):
    kind: Literal["directory"] = "directory"
    path: str


class JobConfigRequest(RequestModel):
    model: str | None = None


class CreateJobRequest(RequestModel):
    name: str
    config: JobConfigRequest = Field(default_factory=JobConfigRequest)
    source: JobSource | None = None


class CreateEngineRequest(RequestModel):
    name: str
    url: str
    base_model: str
    served_model_name: str | None = None
    adapter_root: str | None = None
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    max_lora_rank: int | None = None
    enabled: bool | None = None
    api_key: str | None = None


class UpdateEngineRequest(RequestModel):
    """Partial. An explicit null for `servedModelName`/`adapterRoot` restores the default, for
    `maxCpuLoras` clears it, for `apiKey` removes the key."""

    name: str | None = None
    url: str | None = None
    base_model: str | None = None
    served_model_name: str | None = None
    adapter_root: str | None = None
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    max_lora_rank: int | None = None
    enabled: bool | None = None
    api_key: str | None = None
