"""The gateway factory: ``create_app(settings)`` → a :class:`Gateway` with ``.app`` and ``.ops_app``.

``gateway.app`` is the data-plane ASGI app (its lifespan starts and stops the gateway);
``gateway.ops_app`` serves ``/healthz``, ``/readyz`` and ``/metrics`` on the operations port.
Under ``lorry serve all`` the control plane calls :meth:`Gateway.notify` after each commit that
changed configuration (``AppContext.change_listeners``), so the in-process gateway does not wait
for its 200 ms poll.

Engines (DESIGN §8) follow the change feed like everything else: added, changed, disabled or
removed through the admin API, they take effect on every running gateway without a restart.
Engine DNS names are expanded to one engine per address and re-resolved every
``dns_refresh_s``; a health monitor checks every engine and reads its load.

Shutdown (DESIGN §7): :meth:`Gateway.begin_drain` fails readiness and refuses new requests; when
``LORRY_SHUTDOWN_DEADLINE_S`` has passed, streams still running end with an error event and
requests still waiting for their first byte are answered 503 ``shutting_down``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.adapter_loader import AdapterLoader
from gateway.balancer import LoadBound
from gateway.change_follower import Change, ChangeFollower
from gateway.data_plane import DataPlane
from gateway.dns import AddressBook
from gateway.engines import EnginePool, EngineState, UpstreamTimeouts, dns_name
from gateway.errors import ShuttingDown
from gateway.health import HealthMonitor, HealthPolicy
from gateway.key_check import KeyChecker
from gateway.last_used import LastUsedWriter
from gateway.loop_watchdog import LoopWatchdog
from gateway.metrics import GatewayMetrics
from gateway.ops import OpsApp
from gateway.options import GatewayOptions
from gateway.proxy import Proxy
from gateway.snapshot import (
    EngineView,
    Snapshot,
    current_seq,
    load_deployment_ids_for_jobs,
    load_deployments,
    load_engines,
)
from gateway.upstream import OpenStream
from lorry.changefeed import ChangeKind
from lorry.db.engine import create_engine
from lorry.db.models import DeploymentKey
from lorry.db.types import utcnow
from lorry.settings import LorrySettings

logger = logging.getLogger("lorry.gateway")


@dataclass(eq=False)
class RequestHandle:
    """A generation request in flight, so the shutdown deadline can end it."""

    task: asyncio.Task[Any] | None
    stream: OpenStream | None = None
    drained: bool = False


class Gateway:
    def __init__(
        self,
        settings: LorrySettings,
        options: GatewayOptions | None = None,
        *,
        db_engine: AsyncEngine | None = None,
    ) -> None:
        self.settings = settings
        self.options = opts = options if options is not None else GatewayOptions.from_env()
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
        self.addresses = AddressBook(opts.resolver, timeout_s=opts.dns_timeout_s)
        self.health = HealthMonitor(
            self.pool,
            HealthPolicy(
                interval_s=opts.health_interval_s,
                timeout_s=opts.health_timeout_s,
                unhealthy_after=opts.unhealthy_after,
                healthy_after=opts.healthy_after,
                load_interval_s=opts.load_interval_s,
                load_timeout_s=opts.load_timeout_s,
                load_max_age_s=max(10.0, 5 * opts.load_interval_s),
            ),
            on_eject=self._engine_ejected,
            on_readmit=self._engine_readmitted,
            on_load=self._engine_load,
        )
        self.loader = AdapterLoader(
            load_timeout_s=settings.upstream_first_byte_timeout_s,
            negative_ttl_s=opts.adapter_negative_ttl_s,
            on_load=lambda deployment, engine, outcome: self.metrics.adapter_loads.labels(
                deployment, engine, outcome
            ).inc(),
        )
        self.watchdog = LoopWatchdog(
            warn_after_s=opts.loop_stall_warn_s, observe_lag=self.metrics.loop_lag.observe
        )
        self.bound = LoadBound(max_requests=opts.engine_max_requests, max_waiting=opts.engine_max_waiting)
        self.proxy = Proxy(
            self.pool,
            self.loader,
            self.metrics,
            self.timeouts,
            max_attempts=opts.max_attempts,
            max_event_bytes=opts.max_upstream_event_bytes,
            max_body_bytes=opts.max_upstream_body_bytes,
            bound=self.bound,
            monitor=self.health,
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
        self._requests: set[RequestHandle] = set()
        self._drain_task: asyncio.Task[None] | None = None
        self._dns_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.started:
            return
        self.watchdog.start()
        self.health.start()
        await self.follower.start()
        if not self.follower.synced:
            logger.warning("database unreachable at start; serving 503 until the snapshot loads")
        self.last_used.start()
        self._dns_task = asyncio.create_task(self._refresh_dns_forever(), name="lorry-engine-dns")
        self.started = True

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        await self.follower.stop()
        await self.last_used.stop()
        await self.health.stop()
        extra = [task for task in (self._dns_task, self._drain_task) if task is not None]
        for task in [*self._background, *extra]:
            task.cancel()
        await asyncio.gather(*self._background, *extra, return_exceptions=True)
        await self.pool.aclose()
        await self.watchdog.stop()
        if self._owns_db:
            await self.db.dispose()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Gateway]:
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    def begin_drain(self, deadline_s: float | None = None) -> None:
        """SIGTERM: readiness fails and new requests are refused; streams in flight continue for
        up to ``deadline_s`` (``LORRY_SHUTDOWN_DEADLINE_S``), then end with an error event."""
        if self.draining:
            return
        self.draining = True
        deadline = self.settings.shutdown_deadline_s if deadline_s is None else deadline_s
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._drain_task = loop.create_task(self._end_requests_after(deadline), name="lorry-drain")

    async def _end_requests_after(self, deadline_s: float) -> None:
        await asyncio.sleep(deadline_s)
        if self._requests:
            logger.info("shutdown deadline reached: ending %d request(s)", len(self._requests))
        self.abort_requests()

    def abort_requests(self) -> None:
        """Streams end with a ``shutting_down`` error event; requests before their first byte get 503."""
        error = ShuttingDown("The gateway is shutting down and ended this stream at its shutdown deadline")
        for handle in list(self._requests):
            if handle.drained:
                continue
            handle.drained = True
            if handle.stream is not None:
                handle.stream.abort(error)
            elif handle.task is not None:
                handle.task.cancel()

    def track_request(self) -> RequestHandle:
        handle = RequestHandle(task=asyncio.current_task())
        self._requests.add(handle)
        return handle

    def untrack_request(self, handle: RequestHandle) -> None:
        self._requests.discard(handle)
        if self.draining and not self._requests:
            logger.info("drained: no request in flight")

    @property
    def requests_in_flight(self) -> int:
        return len(self._requests)

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
        await self._engines_changed()
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
            await self._engines_changed()
        if key_ids:
            # A roll changes the previous key too; forget both sides whichever id the event names.
            rows = await conn.execute(
                select(DeploymentKey.id, DeploymentKey.rolled_from).where(
                    DeploymentKey.id.in_(sorted(key_ids))
                )
            )
            related = {row.rolled_from for row in rows if row.rolled_from}
            self.keys.forget_keys(key_ids | related)

    # -- engines ---------------------------------------------------------------------------------

    async def _engines_changed(self) -> None:
        """The snapshot's engine list changed: resolve new DNS names, then follow it."""
        views = list(self.snapshot.engines.values())
        await self.addresses.update(self._dns_names(views), only_missing=True)
        self._sync_pool(views)

    @staticmethod
    def _dns_names(views: Sequence[EngineView]) -> set[tuple[str, int]]:
        return {name for name in (dns_name(view) for view in views) if name is not None}

    def _sync_pool(self, views: Sequence[EngineView]) -> None:
        for state in self.pool.sync(views, self.addresses.addresses):
            self.loader.forget_rejections(state.view.id)
            if self.options.reconcile_on_start and state.view.enabled:
                self._spawn(self.loader.reconcile(state), f"reconcile-{state.name}")
            self.health.probe(state)
        states = self.pool.states()
        for state in states:
            self.metrics.engine_state(state.name, up=state.routable)
        self.metrics.forget_engines({state.name for state in states})

    async def _refresh_dns_forever(self) -> None:
        while True:
            await asyncio.sleep(self.options.dns_refresh_s)
            await self.refresh_dns()

    async def refresh_dns(self) -> bool:
        """Re-resolve every engine DNS name; re-sync the pool if an answer changed."""
        views = list(self.snapshot.engines.values())
        changed = await self.addresses.update(self._dns_names(views), only_missing=False)
        # Engines the change feed brought in meanwhile (their names were not in `views`).
        views = list(self.snapshot.engines.values())
        changed |= await self.addresses.update(self._dns_names(views), only_missing=True)
        if changed:
            self._sync_pool(views)
        return changed

    def _engine_ejected(self, state: EngineState) -> None:
        self.metrics.engine_ejections.labels(state.name).inc()
        self.metrics.engine_state(state.name, up=False)

    def _engine_readmitted(self, state: EngineState) -> None:
        self.metrics.engine_state(state.name, up=state.routable)
        # It may have restarted: what it has registered is whatever it says now.
        self._spawn(self.loader.reconcile(state, replace=True), f"reconcile-{state.name}")

    def _engine_load(self, state: EngineState) -> None:
        load = state.load
        self.metrics.engine_state(
            state.name, up=state.routable, load=(load.running, load.waiting, load.deferred)
        )

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
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
