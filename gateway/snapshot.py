"""The gateway's in-memory view of deployments and engines, loaded from the database (DESIGN §1, §6).

A request reads only this snapshot (and the key cache): no SQL on a warm request. The change
follower keeps it fresh, reloading the rows a change names, or everything after a resync.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from lorry import engine_spec
from lorry.db.models import Adapter, ChangeCounter, Deployment, Engine, Job
from lorry.settings import LorrySettings

ADAPTER_NAME_PREFIX = "lora-"


def engine_adapter_name(digest: str) -> str:
    """The engine-side name of an adapter: a content id, so two deployments share one load."""
    return f"{ADAPTER_NAME_PREFIX}{digest[:16]}"


@dataclass(frozen=True, slots=True)
class AdapterRef:
    id: str
    digest: str
    rank: int

    @property
    def engine_name(self) -> str:
        return engine_adapter_name(self.digest)


@dataclass(frozen=True, slots=True)
class DeploymentView:
    id: str
    slug: str
    org_id: str
    project_id: str
    enabled: bool
    auth_mode: str
    target_kind: str
    base_model: str | None
    adapter: AdapterRef | None
    created_at: datetime

    @property
    def requires_key(self) -> bool:
        return self.auth_mode != "none"

    @property
    def rank(self) -> int | None:
        return self.adapter.rank if self.adapter is not None else None


@dataclass(frozen=True, slots=True)
class EngineView:
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
    api_key: str | None = field(default=None, repr=False)
    source: str = "api"

    def adapter_path(self, digest: str) -> str:
        return f"{self.adapter_root.rstrip('/')}/{digest}"

    def serves(self, base_model: str | None, rank: int | None) -> bool:
        return engine_spec.engine_serves(self, base_model, rank)


class Snapshot:
    """Deployments by slug and id, engines by id. Replaced piecewise by the change follower."""

    def __init__(self) -> None:
        self.by_slug: dict[str, DeploymentView] = {}
        self.by_id: dict[str, DeploymentView] = {}
        self.engines: dict[str, EngineView] = {}
        self.loaded = False
        self.version = 0

    def deployment_for_slug(self, slug: str) -> DeploymentView | None:
        """An enabled, not deleted deployment; anything else is ``deployment_not_found``."""
        view = self.by_slug.get(slug)
        return view if view is not None and view.enabled else None

    def replace_all(self, deployments: Iterable[DeploymentView], engines: Iterable[EngineView]) -> None:
        by_id = {view.id: view for view in deployments}
        self.by_id = by_id
        self.by_slug = {view.slug: view for view in by_id.values()}
        self.engines = {engine.id: engine for engine in engines}
        self.loaded = True
        self.version += 1

    def apply_deployments(self, requested_ids: Iterable[str], found: Iterable[DeploymentView]) -> None:
        """``found`` are the live rows among ``requested_ids``; the others were deleted."""
        fresh = {view.id: view for view in found}
        for deployment_id in requested_ids:
            old = self.by_id.pop(deployment_id, None)
            if old is not None and self.by_slug.get(old.slug) is old:
                del self.by_slug[old.slug]
            view = fresh.get(deployment_id)
            if view is not None:
                self.by_id[view.id] = view
                self.by_slug[view.slug] = view
        self.version += 1

    def replace_engines(self, engines: Iterable[EngineView]) -> None:
        self.engines = {engine.id: engine for engine in engines}
        self.version += 1


# -- loading ------------------------------------------------------------------------------------


def _deployment_query() -> Any:
    return (
        select(
            Deployment.id,
            Deployment.slug,
            Deployment.org_id,
            Deployment.project_id,
            Deployment.enabled,
            Deployment.auth_mode,
            Deployment.target_kind,
            Deployment.target,
            Deployment.job_id,
            Deployment.adapter_id,
            Deployment.base_model,
            Deployment.created_at,
            Job.model.label("job_model"),
            Adapter.id.label("a_id"),
            Adapter.digest.label("a_digest"),
            Adapter.rank.label("a_rank"),
            Adapter.base_model.label("a_base_model"),
        )
        .outerjoin(Job, Job.id == Deployment.job_id)
        .outerjoin(Adapter, Adapter.id == Deployment.adapter_id)
        .where(Deployment.deleted_at.is_(None))
    )


async def _adapter_for_target(
    conn: AsyncConnection, job_id: str, target: Mapping[str, Any]
) -> Row[Any] | None:
    """Resolves a target whose adapter id was not stored (defensive: the control plane stores it)."""
    spec = target.get("adapter") if isinstance(target, Mapping) else None
    kind = spec.get("kind", "final") if isinstance(spec, Mapping) else "final"
    query = select(Adapter.id, Adapter.digest, Adapter.rank, Adapter.base_model).where(
        Adapter.job_id == job_id
    )
    if kind == "checkpoint":
        step = spec.get("step") if isinstance(spec, Mapping) else None
        query = query.where(Adapter.kind == "checkpoint", Adapter.step == step)
    else:
        query = query.where(Adapter.kind == "final")
    result: Any = await conn.execute(query.limit(1))
    row: Row[Any] | None = result.first()
    return row


async def _views(conn: AsyncConnection, rows: Sequence[Row[Any]]) -> list[DeploymentView]:
    views = []
    for row in rows:
        adapter: AdapterRef | None = None
        base_model = row.base_model
        if row.target_kind == "adapter":
            a_id, digest, rank, a_base = row.a_id, row.a_digest, row.a_rank, row.a_base_model
            if a_id is None and row.job_id is not None:
                found = await _adapter_for_target(conn, row.job_id, row.target)
                if found is not None:
                    a_id, digest, rank, a_base = found.id, found.digest, found.rank, found.base_model
            if a_id is not None:
                adapter = AdapterRef(id=a_id, digest=digest, rank=rank)
            # The job's canonical model wins; the adapter's own declaration is the fallback.
            base_model = row.job_model or a_base or row.base_model
        views.append(
            DeploymentView(
                id=row.id,
                slug=row.slug,
                org_id=row.org_id,
                project_id=row.project_id,
                enabled=bool(row.enabled) and (row.target_kind != "adapter" or adapter is not None),
                auth_mode=row.auth_mode,
                target_kind=row.target_kind,
                base_model=base_model,
                adapter=adapter,
                created_at=row.created_at,
            )
        )
    return views


async def load_deployments(conn: AsyncConnection, ids: Sequence[str] | None = None) -> list[DeploymentView]:
    """Every live deployment, or the live ones among ``ids``."""
    query = _deployment_query()
    if ids is not None:
        if not ids:
            return []
        query = query.where(Deployment.id.in_(list(ids)))
    rows = (await conn.execute(query)).all()
    return await _views(conn, rows)


async def load_deployment_ids_for_jobs(conn: AsyncConnection, job_ids: Sequence[str]) -> list[str]:
    if not job_ids:
        return []
    rows = await conn.execute(select(Deployment.id).where(Deployment.job_id.in_(list(job_ids))))
    return [row.id for row in rows]


def static_engines(settings: LorrySettings) -> list[EngineView]:
    """Engines from ``LORRY_ENGINES``, read and checked as the control plane reads them."""
    # (the spec's dump leaves the API key out: it is never shown)
    return [
        EngineView(**spec.model_dump(), api_key=spec.api_key) for spec in engine_spec.static_engines(settings)
    ]


async def load_engines(conn: AsyncConnection, settings: LorrySettings) -> list[EngineView]:
    table = Engine.__table__
    rows = (await conn.execute(select(table).order_by(table.c.created_at, table.c.id))).all()
    default_root = settings.adapter_store.resolve().as_posix()
    return [
        *static_engines(settings),
        *(
            EngineView(
                id=row.id,
                name=row.name,
                url=row.url.rstrip("/"),
                base_model=row.base_model,
                served_model_name=row.served_model_name or row.base_model,
                adapter_root=row.adapter_root or default_root,
                max_loras=row.max_loras,
                max_cpu_loras=row.max_cpu_loras,
                max_lora_rank=row.max_lora_rank,
                enabled=row.enabled,
                api_key=row.api_key,
                source=row.source,
            )
            for row in rows
        ),
    ]


async def current_seq(conn: AsyncConnection) -> int:
    value = (
        await conn.execute(select(ChangeCounter.value).where(ChangeCounter.id == 1))
    ).scalar_one_or_none()
    return int(value or 0)
