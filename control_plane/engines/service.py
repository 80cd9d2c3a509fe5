"""Engine administration: rows created through the API plus read-only static ones (LORRY_ENGINES)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane import audit_log
from control_plane.engines.schemas import EngineCreate, EngineOut, EngineUpdate
from control_plane.principal import Principal
from lorry.changefeed import ChangeKind, append_change
from lorry.db.models import Engine
from lorry.db.types import is_id, utcnow
from lorry.engine_spec import (
    STATIC_ID_PREFIX,
    EngineSpec,
    check_lora_capacity,
    default_adapter_root,
    static_engines,
)
from lorry.errors import Conflict, InvalidRequest, NotFound
from lorry.settings import LorrySettings

RESOURCE_TYPE = "engine"
# The columns a PATCH may change, in DTO order; `api_key` is audited by name only, never by value.
_UPDATABLE = (
    "name",
    "url",
    "base_model",
    "served_model_name",
    "adapter_root",
    "max_loras",
    "max_cpu_loras",
    "max_lora_rank",
    "enabled",
    "api_key",
)
_CAMEL = {
    "name": "name",
    "url": "url",
    "base_model": "baseModel",
    "served_model_name": "servedModelName",
    "adapter_root": "adapterRoot",
    "max_loras": "maxLoras",
    "max_cpu_loras": "maxCpuLoras",
    "max_lora_rank": "maxLoraRank",
    "enabled": "enabled",
    "api_key": "apiKey",
}


def _not_found(engine_id: str) -> NotFound:
    return NotFound("Engine not found", code="engine_not_found")


def _name_taken(name: str) -> Conflict:
    return Conflict(f"An engine named '{name}' already exists", code="engine_exists")


def _read_only(spec: EngineSpec) -> Conflict:
    return Conflict(
        f"Engine '{spec.name}' is static (configured by LORRY_ENGINES) and read-only; "
        "change it in the control plane's settings",
        code="engine_read_only",
    )


def row_out(row: Engine) -> EngineOut:
    return EngineOut(
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
        has_api_key=row.api_key is not None,
        source="api",
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def static_out(spec: EngineSpec) -> EngineOut:
    return EngineOut(
        id=spec.id,
        name=spec.name,
        url=spec.url,
        base_model=spec.base_model,
        served_model_name=spec.served_model_name,
        adapter_root=spec.adapter_root,
        max_loras=spec.max_loras,
        max_cpu_loras=spec.max_cpu_loras,
        max_lora_rank=spec.max_lora_rank,
        enabled=spec.enabled,
        has_api_key=spec.api_key is not None,
        source="static",
        created_at=None,
        updated_at=None,
    )


def _find_static(settings: LorrySettings, engine_id: str) -> EngineSpec | None:
    if not engine_id.startswith(STATIC_ID_PREFIX):
        return None
    return next((spec for spec in static_engines(settings) if spec.id == engine_id), None)


async def _find_row(session: AsyncSession, engine_id: str) -> Engine | None:
    if not is_id(engine_id):  # a malformed id (a NUL byte included) never reaches SQL
        return None
    return (await session.execute(select(Engine).where(Engine.id == engine_id))).scalar_one_or_none()


async def _writable_row(session: AsyncSession, settings: LorrySettings, engine_id: str) -> Engine:
    spec = _find_static(settings, engine_id)
    if spec is not None:
        raise _read_only(spec)
    row = await _find_row(session, engine_id)
    if row is None:
        raise _not_found(engine_id)
    return row


async def _ensure_name_free(
    session: AsyncSession, settings: LorrySettings, name: str, *, except_id: str | None = None
) -> None:
    """Names are unique across the whole catalogue, static engines included."""
    if any(spec.name == name for spec in static_engines(settings)):
        raise _name_taken(name)
    query = select(Engine.id).where(Engine.name == name)
    if except_id is not None:
        query = query.where(Engine.id != except_id)
    if (await session.execute(query)).first() is not None:
        raise _name_taken(name)


async def _flush(session: AsyncSession, name: str) -> None:
    # Two concurrent creates can both pass the check above; the unique index decides.
    try:
        await session.flush()
    except IntegrityError as exc:
        raise _name_taken(name) from exc


async def list_engines(session: AsyncSession, settings: LorrySettings) -> list[EngineOut]:
    rows = (await session.execute(select(Engine).order_by(Engine.created_at, Engine.id))).scalars().all()
    return [*(static_out(spec) for spec in static_engines(settings)), *(row_out(row) for row in rows)]


async def get_engine(session: AsyncSession, settings: LorrySettings, engine_id: str) -> EngineOut:
    spec = _find_static(settings, engine_id)
    if spec is not None:
        return static_out(spec)
    row = await _find_row(session, engine_id)
    if row is None:
        raise _not_found(engine_id)
    return row_out(row)


async def create_engine(
    session: AsyncSession, settings: LorrySettings, principal: Principal, body: EngineCreate
) -> EngineOut:
    await _ensure_name_free(session, settings, body.name)
    row = Engine(
        name=body.name,
        url=body.url,
        base_model=body.base_model,
        served_model_name=body.served_model_name or body.base_model,
        adapter_root=body.adapter_root or default_adapter_root(settings),
        max_loras=body.max_loras,
        max_cpu_loras=body.max_cpu_loras,
        max_lora_rank=body.max_lora_rank,
        enabled=body.enabled,
        api_key=body.api_key,
        source="api",
    )
    session.add(row)
    await _flush(session, body.name)
    await append_change(session, ChangeKind.ENGINE, row.id)
    audit_log.record(
        session,
        principal,
        "engine.create",
        RESOURCE_TYPE,
        row.id,
        org_id=None,
        details={"name": row.name, "url": row.url, "baseModel": row.base_model},
    )
    return row_out(row)


def _new_values(row: Engine, body: EngineUpdate, settings: LorrySettings) -> dict[str, Any]:
    """The values the PATCH asks for, with null meaning "the default" where that is allowed."""
    given = body.model_fields_set
    values: dict[str, Any] = {field: getattr(body, field) for field in _UPDATABLE if field in given}
    if values.get("adapter_root", "") is None:
        values["adapter_root"] = default_adapter_root(settings)
    base_model = values.get("base_model", row.base_model)
    if "served_model_name" in values:
        values["served_model_name"] = values["served_model_name"] or base_model
    elif "base_model" in values and row.served_model_name == row.base_model:
        # The served name was the default; it follows the base model, as vLLM's would.
        values["served_model_name"] = base_model
    return values


async def update_engine(
    session: AsyncSession,
    settings: LorrySettings,
    principal: Principal,
    engine_id: str,
    body: EngineUpdate,
) -> EngineOut:
    row = await _writable_row(session, settings, engine_id)
    values = _new_values(row, body, settings)
    try:
        check_lora_capacity(
            values.get("max_loras", row.max_loras), values.get("max_cpu_loras", row.max_cpu_loras)
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    changed = {field: value for field, value in values.items() if getattr(row, field) != value}
    if not changed:
        return row_out(row)  # nothing to write: no change-feed entry, no audit event
    if "name" in changed:
        await _ensure_name_free(session, settings, changed["name"], except_id=row.id)
    for field, value in changed.items():
        setattr(row, field, value)
    row.updated_at = utcnow()
    await _flush(session, row.name)
    await append_change(session, ChangeKind.ENGINE, row.id)
    audit_log.record(
        session,
        principal,
        "engine.update",
        RESOURCE_TYPE,
        row.id,
        org_id=None,
        details={"name": row.name, "fields": [_CAMEL[field] for field in _UPDATABLE if field in changed]},
    )
    return row_out(row)


async def delete_engine(
    session: AsyncSession, settings: LorrySettings, principal: Principal, engine_id: str
) -> None:
    """Allowed even when deployments lose their only engine: their status becomes `no_engine`."""
    row = await _writable_row(session, settings, engine_id)
    name = row.name
    await session.delete(row)
    await session.flush()
    await append_change(session, ChangeKind.ENGINE, engine_id)
    audit_log.record(
        session, principal, "engine.delete", RESOURCE_TYPE, engine_id, org_id=None, details={"name": name}
    )
