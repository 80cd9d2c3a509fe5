"""The engines a control plane knows: rows from the admin API plus static ones from LORRY_ENGINES."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from lorry.db.models import Engine
from lorry.engine_spec import EngineSpec, static_engines
from lorry.settings import LorrySettings


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
