"""Request and response models for `/v1/engines` (DESIGN §3, §4, §8)."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import SkipJsonSchema

from control_plane.schemas import RequestModel, ResponseModel, Timestamp
from lorry.engine_spec import (
    MAX_PATH_LENGTH,
    MAX_URL_LENGTH,
    NAME_PATTERN,
    check_engine_name,
    check_lora_capacity,
    normalise_adapter_root,
    normalise_engine_url,
)

# vLLM's --max-lora-rank tops out at 512; the bounds on counts keep values inside a 32-bit column.
MAX_LORA_RANK = 512
MAX_LORA_SLOTS = 100_000

EngineName = Annotated[
    StrictStr, Field(min_length=1, max_length=100, json_schema_extra={"pattern": f"^{NAME_PATTERN}$"})
]
EngineUrl = Annotated[StrictStr, Field(min_length=1, max_length=MAX_URL_LENGTH)]
ModelId = Annotated[StrictStr, Field(min_length=1, max_length=300)]
AdapterRoot = Annotated[StrictStr, Field(min_length=1, max_length=MAX_PATH_LENGTH)]
MaxLoras = Annotated[StrictInt, Field(ge=1, le=MAX_LORA_SLOTS)]
MaxLoraRank = Annotated[StrictInt, Field(ge=1, le=MAX_LORA_RANK)]
ApiKey = Annotated[StrictStr, Field(min_length=1, max_length=500)]

# Fields that PATCH may set to null: null restores the default (or clears the key / the CPU cache).
_NULLABLE = frozenset({"served_model_name", "adapter_root", "max_cpu_loras", "api_key"})


def _check_model_id(value: str | None) -> str | None:
    if value is not None and (value != value.strip() or any(ord(ch) < 32 or ord(ch) == 127 for ch in value)):
        raise ValueError("must not have surrounding whitespace or control characters")
    return value


def _check_api_key(value: str | None) -> str | None:
    # It travels in an Authorization header: no whitespace, no control characters.
    if value is not None and any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError("must not contain whitespace or control characters")
    return value


class _EngineFields(RequestModel):
    @field_validator("name", check_fields=False)
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else check_engine_name(value)

    @field_validator("url", check_fields=False)
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else normalise_engine_url(value)

    @field_validator("adapter_root", check_fields=False)
    @classmethod
    def _adapter_root(cls, value: str | None) -> str | None:
        return None if value is None else normalise_adapter_root(value)

    @field_validator("base_model", "served_model_name", check_fields=False)
    @classmethod
    def _model_id(cls, value: str | None) -> str | None:
        return _check_model_id(value)

    @field_validator("api_key", check_fields=False)
    @classmethod
    def _api_key(cls, value: str | None) -> str | None:
        return _check_api_key(value)


class EngineCreate(_EngineFields):
    """`servedModelName` defaults to `baseModel`; `adapterRoot` to the control plane's store."""

    name: EngineName
    url: EngineUrl
    base_model: ModelId
    served_model_name: ModelId | None = None
    adapter_root: AdapterRoot | None = None
    max_loras: MaxLoras = 4
    max_cpu_loras: MaxLoras | None = None
    max_lora_rank: MaxLoraRank = 16
    enabled: StrictBool = True
    api_key: ApiKey | None = Field(default=None, description="Write-only: never returned.")

    @model_validator(mode="after")
    def _capacity(self) -> Self:
        check_lora_capacity(self.max_loras, self.max_cpu_loras)
        return self


class EngineUpdate(_EngineFields):
    """Partial: only the fields present change. Null resets `servedModelName`/`adapterRoot` to
    their defaults, clears `maxCpuLoras`, and removes the `apiKey`; other fields may not be null
    (absent is `None` here, so the schema hides that `None`)."""

    name: EngineName | SkipJsonSchema[None] = None
    url: EngineUrl | SkipJsonSchema[None] = None
    base_model: ModelId | SkipJsonSchema[None] = None
    served_model_name: ModelId | None = None
    adapter_root: AdapterRoot | None = None
    max_loras: MaxLoras | SkipJsonSchema[None] = None
    max_cpu_loras: MaxLoras | None = None
    max_lora_rank: MaxLoraRank | SkipJsonSchema[None] = None
    enabled: StrictBool | SkipJsonSchema[None] = None
    api_key: ApiKey | None = Field(default=None, description="Write-only: never returned.")

    @model_validator(mode="after")
    def _no_null_for_required(self) -> Self:
        for field in sorted(self.model_fields_set - _NULLABLE):
            if getattr(self, field) is None:
                raise ValueError(f"{to_camel(field)} may not be null")
        return self


class EngineOut(ResponseModel):
    """The engine DTO: the api key is never returned, only whether one is set."""

    id: str
    name: str
    url: str
    base_model: str
    served_model_name: str
    adapter_root: str
    max_loras: int
    max_cpu_loras: int | None
    max_lora_rank: int
    enabled: bool
    has_api_key: bool
    source: Literal["api", "static"]
    created_at: Timestamp | None = Field(description="null for static engines")
    updated_at: Timestamp | None = Field(description="null for static engines")


class EngineEnvelope(ResponseModel):
    engine: EngineOut


class EngineList(ResponseModel):
    engines: list[EngineOut]
