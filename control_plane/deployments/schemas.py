"""Request and response models for `/v1/endpoints` and its keys (DESIGN §4)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from control_plane.deployments.slugs import MAX_LEN, MIN_LEN, PATTERN
from control_plane.schemas import RequestModel, ResponseModel, Timestamp, plain_text

AuthMode = Literal["fixed_api_key", "none"]
RetentionMode = Literal["unlimited", "disabled", "days"]
DeploymentStatus = Literal["ready", "no_engine"]

MAX_RETENTION_DAYS = 3650
MAX_STEP = 2**31 - 1  # the adapters.step column is a 32-bit integer
LABEL_MAX = 80
MAX_GRACE_S = 604_800
DEFAULT_GRACE_S = 86_400
DEFAULT_RETENTION_DAYS = 7

RetentionDays = Annotated[StrictInt, Field(ge=1, le=MAX_RETENTION_DAYS)]


# --- targets: one discriminated union, validated strictly and echoed exactly as posted ---------


class _TargetPart(RequestModel):
    """Read from requests and written back out (camelCase) exactly as posted."""

    model_config = ConfigDict(serialize_by_alias=True)


class FinalAdapterRef(_TargetPart):
    kind: Literal["final"]
    job_id: StrictStr


class CheckpointAdapterRef(_TargetPart):
    kind: Literal["checkpoint"]
    job_id: StrictStr
    step: Annotated[StrictInt, Field(ge=0, le=MAX_STEP)]


AdapterRef = Annotated[FinalAdapterRef | CheckpointAdapterRef, Field(discriminator="kind")]


class AdapterTarget(_TargetPart):
    kind: Literal["adapter"]
    adapter: AdapterRef


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "must not be blank")
    return value


class BaseModelTarget(_TargetPart):
    kind: Literal["base_model"]
    base_model: Annotated[
        StrictStr,
        Field(min_length=1, max_length=300),
        AfterValidator(plain_text),
        AfterValidator(_not_blank),
    ]


DeploymentTarget = Annotated[AdapterTarget | BaseModelTarget, Field(discriminator="kind")]


# --- deployments -------------------------------------------------------------------------------

_SLUG_SCHEMA = {"pattern": PATTERN, "minLength": MIN_LEN, "maxLength": MAX_LEN}


class _NoExplicitNulls(RequestModel):
    """Optional fields may be left out, but only the ones listed in `NULLABLE` may be null."""

    NULLABLE: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _reject_nulls(self) -> _NoExplicitNulls:
        for name in self.model_fields_set:
            if getattr(self, name) is None and name not in self.NULLABLE:
                alias = type(self).model_fields[name].alias or name
                raise PydanticCustomError("null", "{field} may not be null", {"field": alias})
        return self


class CreateDeploymentRequest(_NoExplicitNulls):
    NULLABLE = frozenset({"run_retention_days"})

    # Checked in the service, rule by rule, so a bad slug is 400 `invalid_slug` with a clear reason.
    slug: Annotated[StrictStr, Field(json_schema_extra=_SLUG_SCHEMA)]
    target: DeploymentTarget
    auth_mode: AuthMode = "fixed_api_key"
    run_retention_mode: RetentionMode | SkipJsonSchema[None] = None
    run_retention_days: RetentionDays | None = None


class UpdateDeploymentRequest(_NoExplicitNulls):
    """A partial update: fields left out are unchanged. `slug` is accepted only to say it is immutable."""

    NULLABLE = frozenset({"run_retention_days", "slug"})

    slug: SkipJsonSchema[Any] = None
    # Null is refused for these (see `_NoExplicitNulls`), so the schema does not offer it.
    target: DeploymentTarget | SkipJsonSchema[None] = None
    auth_mode: AuthMode | SkipJsonSchema[None] = None
    enabled: StrictBool | SkipJsonSchema[None] = None
    run_retention_mode: RetentionMode | SkipJsonSchema[None] = None
    run_retention_days: RetentionDays | None = None


class DeploymentDto(ResponseModel):
    id: str
    slug: str
    org_id: str
    project_id: str
    target: DeploymentTarget
    auth_mode: AuthMode
    url_format: Literal["openai_compat"]
    enabled: bool
    custom_domain: None
    run_retention_mode: RetentionMode
    run_retention_days: int | None
    created_at: Timestamp
    updated_at: Timestamp
    base_url: str
    status: DeploymentStatus


class DeploymentResponse(ResponseModel):
    deployment: DeploymentDto


class DeploymentListResponse(ResponseModel):
    deployments: list[DeploymentDto]


# --- deployment keys ---------------------------------------------------------------------------


def _label(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= LABEL_MAX:
        raise PydanticCustomError(
            "label_length", "label must be 1 to {max} characters after trimming", {"max": LABEL_MAX}
        )
    return value


def _iso_string(value: Any) -> Any:
    """Timestamps come as ISO 8601 strings with an offset; numbers are not read as epochs."""
    if value is not None and not isinstance(value, str):
        raise PydanticCustomError("iso_datetime", "must be an ISO 8601 datetime string with a timezone")
    return value


Label = Annotated[StrictStr, AfterValidator(plain_text), AfterValidator(_label)]
IsoDatetime = Annotated[AwareDatetime, BeforeValidator(_iso_string)]


class CreateKeyRequest(RequestModel):
    label: Label
    expires_at: IsoDatetime | None = None


class RollKeyRequest(RequestModel):
    grace_period_seconds: Annotated[StrictInt, Field(ge=0, le=MAX_GRACE_S)] = DEFAULT_GRACE_S


class KeyDto(ResponseModel):
    """A key as listed: never its plaintext or hash."""

    id: str
    label: str
    prefix: str
    enabled: bool
    created_at: Timestamp
    last_used_at: Timestamp | None
    expires_at: Timestamp | None


class CreatedKeyDto(ResponseModel):
    """Returned by create and roll only: the plaintext is shown exactly once."""

    id: str
    label: str
    plaintext: str = Field(repr=False)
    prefix: str
    created_at: Timestamp
    expires_at: Timestamp | None


class KeyListResponse(ResponseModel):
    keys: list[KeyDto]


class CreatedKeyResponse(ResponseModel):
    key: CreatedKeyDto


class PreviousKey(ResponseModel):
    id: str
    expires_at: Timestamp


class RolledKeyResponse(ResponseModel):
    key: CreatedKeyDto
    previous: PreviousKey
