"""The gateway factory: ``create_app(settings)`` → a :class:`Gateway` with ``.app`` and ``.ops_app``.

``gateway.app`` is the data-plane ASGI app (its lifespan starts and stops the gateway);
``gateway.ops_app`` serves ``/healthz``, ``/readyz`` and ``/metrics`` on the operations port.
Under ``lorry serve all`` the control plane calls :meth:`Gateway.notify` after each commit that
changed configuration (``AppContext.change_listeners``), so the in-process gateway does not wait
for its 200 ms poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.adapter_loader import AdapterLoader
from gateway.change_follower import Change, ChangeFollower
from gateway.data_plane import DataPlane
from gateway.engines import EnginePool, UpstreamTimeouts
from gateway.key_check import KeyChecker
from gateway.last_used import LastUsedWriter
from gateway.metrics import GatewayMetrics
from gateway.ops import OpsApp
from gateway.options import GatewayOptions
from gateway.proxy import Proxy
from gateway.snapshot import (
    Snapshot,
    current_seq,
    load_deployment_ids_for_jobs,
    load_deployments,
    load_engines,
)
from lorry.changefeed import ChangeKind
from lorry.db.engine import create_engine
from lorry.db.models import DeploymentKey
from lorry.db.types import utcnow
from lorry.settings import LorrySettings

logger = logging.getLogger("lorry.gateway")


class Gateway:
    def __init__(
        self,
        settings: LorrySettings,
        options: GatewayOptions | None = None,
        *,
        db_engine: AsyncEngine | None = None,
    ) -> None:
        self.settings = settings
        self.options = opts = options or GatewayOptions()
        self._owns_db = db_engine is None
        self.db = db_engine if db_engine is not None else create_engine(settings.database_url)
        self.metrics = GatewayMetrics()
        self.snapshot = Snapshot()
        self.keys = KeyChecker(
            self.db,
            opts.keys,
            on_outcome=self.metrics.key_outcome,
            on_verification=self.metrics.key_verified,
        )
        self.timeouts = UpstreamTimeouts(
            connect_s=settings.upstream_connect_timeout_s,
            first_byte_s=settings.upstream_first_byte_timeout_s,
            idle_s=settings.upstream_idle_timeout_s,
            total_s=settings.upstream_total_timeout_s,
        )
        self.pool = EnginePool(self.timeouts, max_connections=opts.max_connections_per_engine)
        self.loader = AdapterLoader(
            load_timeout_s=settings.upstream_first_byte_timeout_s,
            negative_ttl_s=opts.adapter_negative_ttl_s,
            on_load=lambda deployment, engine, outcome: self.metrics.adapter_loads.labels(
                deployment, engine, outcome
            ).inc(),
        )
        self.proxy = Proxy(
            self.pool,
            self.loader,
            self.metrics,
            self.timeouts,
            max_attempts=opts.max_attempts,
            max_event_bytes=opts.max_upstream_event_bytes,
            max_body_bytes=opts.max_upstream_body_bytes,
        )
        self.last_used = LastUsedWriter(self.db, flush_interval_s=opts.last_used_flush_s)
        self.follower = ChangeFollower(
            self.db,
            settings.database_url,
            apply=self._apply_changes,
            resync=self._resync,
            poll_interval_s=opts.poll_interval_s,
            listen=opts.listen,
        )
        self.app = DataPlane(self)
        self.ops_app = OpsApp(self)
        self.started = False
        self.draining = False
        self.active_streams = 0
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.started:
            return
        await self.follower.start()
        if not self.follower.synced:
            logger.warning("database unreachable at start; serving 503 until the snapshot loads")
        self.last_used.start()
        self.started = True

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        await self.follower.stop()
        await self.last_used.stop()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.pool.aclose()
        if self._owns_db:
            await self.db.dispose()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    def begin_drain(self) -> None:
        """SIGTERM: readiness fails and new requests are refused; streams in flight continue."""
        self.draining = True

    def notify(self) -> None:
        """A configuration change was committed (in-process control plane): read the feed now."""
        self.follower.notify()

    @property
    def ready(self) -> bool:
        return self.started and self.snapshot.loaded and not self.draining

    # -- snapshot maintenance (called by the change follower) --------------------------------------

    async def _resync(self, conn: AsyncConnection) -> int:
        cursor = await current_seq(conn)
        deployments = await load_deployments(conn)
        engines = await load_engines(conn, self.settings)
        stale_keys = await self._stale_cached_keys(conn)
        self.snapshot.replace_all(deployments, engines)
        self._engines_changed()
        self.keys.forget_keys(stale_keys)
        self.keys.forget_unknown_kids()
        return cursor

    async def _stale_cached_keys(self, conn: AsyncConnection) -> set[str]:
        """Cached grants whose key was revoked, expired or deleted while we were not listening."""
        cached = self.keys.cached_key_ids()
        if not cached:
            return set()
        rows = await conn.execute(
            select(DeploymentKey.id, DeploymentKey.revoked_at, DeploymentKey.expires_at).where(
                DeploymentKey.id.in_(list(cached))
            )
        )
        now = utcnow()
        valid = {row.id for row in rows if row.revoked_at is None and not _expired(row.expires_at, now)}
        return cached - valid

    async def _apply_changes(self, conn: AsyncConnection, changes: Sequence[Change]) -> None:
        deployment_ids: set[str] = set()
        key_ids: set[str] = set()
        job_ids: set[str] = set()
        engines_changed = False
        reload_all_deployments = False
        for change in changes:
            if change.kind == ChangeKind.DEPLOYMENT:
                deployment_ids.add(change.resource_id)
            elif change.kind == ChangeKind.DEPLOYMENT_KEY:
                key_ids.add(change.resource_id)
            elif change.kind == ChangeKind.JOB:
                job_ids.add(change.resource_id)
            elif change.kind == ChangeKind.ENGINE:
                engines_changed = True
            elif change.kind in (ChangeKind.ORG, ChangeKind.PROJECT):
                reload_all_deployments = True  # cascaded deletes emit no per-deployment events
        if reload_all_deployments:
            deployments = await load_deployments(conn)
            self.snapshot.replace_all(deployments, self.snapshot.engines.values())
        else:
            deployment_ids |= set(await load_deployment_ids_for_jobs(conn, sorted(job_ids)))
            if deployment_ids:
                ids = sorted(deployment_ids)
                self.snapshot.apply_deployments(ids, await load_deployments(conn, ids))
        if engines_changed:
            self.snapshot.replace_engines(await load_engines(conn, self.settings))
            self._engines_changed()
        if key_ids:
            # A roll changes the previous key too; forget both sides whichever id the event names.
            rows = await conn.execute(
                select(DeploymentKey.id, DeploymentKey.rolled_from).where(
                    DeploymentKey.id.in_(sorted(key_ids))
                )
            )
            related = {row.rolled_from for row in rows if row.rolled_from}
            self.keys.forget_keys(key_ids | related)

    def _engines_changed(self) -> None:
        for state in self.pool.sync(self.snapshot.engines.values()):
            self.loader.forget_rejections(state.view.id)
            if self.options.reconcile_on_start and state.view.enabled:
                task = asyncio.create_task(self.loader.reconcile(state), name=f"reconcile-{state.view.name}")
                self._background.add(task)
                task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("background task %s failed: %s", task.get_name(), task.exception())


def _expired(expires_at: datetime | None, now: datetime) -> bool:
    return expires_at is not None and expires_at <= now


def create_app(
    settings: LorrySettings,
    options: GatewayOptions | None = None,
    *,
    db_engine: AsyncEngine | None = None,
) -> Gateway:
    """The gateway for ``settings``; serve ``.app`` and ``.ops_app`` (see :mod:`gateway.server`)."""
    return Gateway(settings, options, db_engine=db_engine)
