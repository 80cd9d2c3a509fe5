"""The engines a control plane knows: rows from the admin API plus static ones from LORRY_ENGINES."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from lorry.db.models import Engine
from lorry.settings import LorrySettings

STATIC_ID_PREFIX = "static:"


class EngineSpec(BaseModel):
    """One engine as the catalogue sees it; `id` of a static engine is `static:<name>`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    id: str = ""
    name: str = Field(min_length=1, max_length=100)
    url: str = Field(min_length=1, max_length=500)
    base_model: str = Field(min_length=1, max_length=300)
    served_model_name: str = ""
    adapter_root: str = ""
    max_loras: int = Field(default=4, ge=1)
    max_cpu_loras: int | None = Field(default=None, ge=1)
    max_lora_rank: int = Field(default=16, ge=1)
    enabled: bool = True
    api_key: str | None = Field(default=None, exclude=True, repr=False)
    source: str = "api"

    def serves(self, base_model: str | None, rank: int | None) -> bool:
        return (
            self.enabled
            and base_model is not None
            and self.base_model == base_model
            and (rank is None or self.max_lora_rank >= rank)
        )


def static_engines(settings: LorrySettings) -> list[EngineSpec]:
    """Engines from LORRY_ENGINES; a malformed entry is a startup error, not a silent skip."""
    engines = []
    for index, raw in enumerate(settings.engines):
        try:
            spec = EngineSpec.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"LORRY_ENGINES[{index}] is not a valid engine: {exc}") from exc
        engines.append(
            spec.model_copy(
                update={
                    "id": f"{STATIC_ID_PREFIX}{spec.name}",
                    "source": "static",
                    "served_model_name": spec.served_model_name or spec.base_model,
                }
            )
        )
    return engines


def from_row(row: Engine) -> EngineSpec:
    return EngineSpec(
        id=row.id,
        name=row.name,
        url=row.url,
        base_model=row.base_model,
        served_model_name=row.served_model_name,
        adapter_root=row.adapter_root,
        max_loras=row.max_loras,
        max_cpu_loras=row.max_cpu_loras,
        max_lora_rank=row.max_lora_rank,
        enabled=row.enabled,
        api_key=row.api_key,
        source=row.source,
    )


async def all_engines(session: AsyncSession, settings: LorrySettings) -> list[EngineSpec]:
    rows = (await session.execute(select(Engine).order_by(Engine.created_at, Engine.id))).scalars().all()
    return [*static_engines(settings), *(from_row(row) for row in rows)]


def can_serve(engines: Sequence[EngineSpec], base_model: str | None, rank: int | None) -> bool:
    return any(engine.serves(base_model, rank) for engine in engines)


def engine_fields(spec: EngineSpec) -> dict[str, Any]:
    """Column values for an Engine row (everything but id and timestamps)."""
    return spec.model_dump(by_alias=False, exclude={"id"}) | {"api_key": spec.api_key}
