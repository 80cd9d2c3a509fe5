"""Response and request models of the admin API. Unknown response fields never break parsing."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class DeploymentScope(ApiModel):
    org_slug: str
    project_slug: str

    def params(self) -> dict[str, str]:
        return {"orgSlug": self.org_slug, "projectSlug": self.project_slug}


class FinalAdapterRef(ApiModel):
    kind: Literal["final"] = "final"
    job_id: str


class CheckpointAdapterRef(ApiModel):
    kind: Literal["checkpoint"] = "checkpoint"
    job_id: str
    step: int


class AdapterTarget(ApiModel):
    kind: Literal["adapter"] = "adapter"
    adapter: Annotated[FinalAdapterRef | CheckpointAdapterRef, Field(discriminator="kind")]


class BaseModelTarget(ApiModel):
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
    created_at: datetime
    updated_at: datetime
    base_url: str | None = None
    status: str | None = None


class DeploymentKey(ApiModel):
    id: str
    label: str
    prefix: str
    enabled: bool
    created_at: datetime
    last_used_at: datetime | None = None
    expires_at: datetime | None = None


class CreatedDeploymentKey(ApiModel):
    id: str
    label: str
    plaintext: str
    prefix: str
    created_at: datetime
    expires_at: datetime | None = None


class PreviousKey(ApiModel):
    id: str
    expires_at: datetime | None = None


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
    created_at: datetime


class JobConfig(ApiModel):
    model: str | None = None


class Job(ApiModel):
    id: str
    org_id: str
    project_id: str
    name: str
    status: str
    config: JobConfig
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
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
    created_at: datetime | None = None
    updated_at: datetime | None = None


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
    enabled: bool = True
    created_at: datetime
    last_used_at: datetime | None = None
    expires_at: datetime | None = None


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
    created_at: datetime
