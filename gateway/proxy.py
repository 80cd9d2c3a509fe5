"""Forwarding one generation request: choose an engine, make sure the adapter is loaded, relay.

Until the first byte reached the client, a failure that another engine could avoid (connection
refused, engine unavailable, no first byte in time) is retried on the next candidate, up to
``max_attempts`` engines. A non-streaming answer is read whole before anything is sent, so all
of it is "before the first byte". Once a stream has started it is never retried.

A refused connection also ejects the engine (passive health check); any other transport failure
asks the health monitor to check that engine now.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from gateway import balancer
from gateway.adapter_loader import AdapterLoader
from gateway.balancer import LoadBound
from gateway.engines import EnginePool, EngineState, UpstreamTimeouts
from gateway.errors import (
    EngineUnreachable,
    GatewayError,
    NoEngine,
    UpstreamConnectionLost,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.health import HealthMonitor
from gateway.metrics import GatewayMetrics
from gateway.request_policy import Endpoint, PreparedRequest
from gateway.responses import StreamRewriter, engine_error, is_model_missing, rewrite_json_body
from gateway.snapshot import DeploymentView
from gateway.upstream import Deadline, OpenStream, read_body, send_request

logger = logging.getLogger("lorry.gateway.proxy")

ENGINE_PATHS = {Endpoint.CHAT: "/v1/chat/completions", Endpoint.COMPLETIONS: "/v1/completions"}
# Before the first byte reached the client (everything `forward` does), these may succeed elsewhere.
_RETRYABLE = (UpstreamUnavailable, UpstreamTimeout, UpstreamConnectionLost)


@dataclass(eq=False)
class Answer:
    """A complete non-streaming answer."""

    body: bytes
    state: EngineState


@dataclass(eq=False)
class Stream:
    stream: OpenStream
    adapter: str | None = None


Outcome = Answer | Stream


class Proxy:
    def __init__(
        self,
        pool: EnginePool,
        loader: AdapterLoader,
        metrics: GatewayMetrics,
        timeouts: UpstreamTimeouts,
        *,
        max_attempts: int,
        max_event_bytes: int,
        max_body_bytes: int,
        bound: LoadBound | None = None,
        monitor: HealthMonitor | None = None,
    ) -> None:
        self.pool = pool
        self.loader = loader
        self.metrics = metrics
        self.timeouts = timeouts
        self.max_attempts = max_attempts
        self.max_event_bytes = max_event_bytes
        self.max_body_bytes = max_body_bytes
        self.bound = bound or LoadBound()
        self.monitor = monitor

    def acquire(self, state: EngineState, adapter: str | None = None) -> None:
        state.acquire(adapter)
        self.metrics.in_flight.labels(state.name).inc()

    def release(self, state: EngineState, adapter: str | None = None) -> None:
        state.release(adapter)
        self.metrics.in_flight.labels(state.name).dec()
        self.pool.released(state)

    def failed(self, state: EngineState, error: GatewayError) -> None:
        """Passive health: a refused connection ejects the engine; a broken one gets checked now."""
        if self.monitor is None:
            return
        if isinstance(error, EngineUnreachable):
            self.monitor.eject(state, f"connection refused ({error.__cause__ or error})")
        elif isinstance(error, (UpstreamUnavailable, UpstreamConnectionLost)):
            self.monitor.suspect(state)

    async def forward(
        self, deployment: DeploymentView, prepared: PreparedRequest, request_id: str
    ) -> Outcome:
        """An answer or an open stream (the caller relays it, then calls ``release``)."""
        engines = balancer.candidates(deployment, self.pool.states(), self.bound)
        if not engines:
            raise NoEngine()
        error: GatewayError = UpstreamUnavailable()
        tried = engines[: max(1, self.max_attempts)]
        for state in tried:
            try:
                return await self._attempt(state, deployment, prepared, request_id)
            except _RETRYABLE as exc:
                self.failed(state, exc)
                logger.info(
                    "engine %s failed before the first byte (%s%s); %s",
                    state.name,
                    exc.code,
                    f": {type(exc.__cause__).__name__}" if exc.__cause__ is not None else "",
                    "trying the next" if state is not tried[-1] else "no engine left",
                )
                error = exc
        raise error

    async def _attempt(
        self, state: EngineState, deployment: DeploymentView, prepared: PreparedRequest, request_id: str
    ) -> Outcome:
        deadline = Deadline(self.timeouts)
        reregistered = False
        adapter = deployment.adapter.engine_name if deployment.adapter is not None else None
        while True:
            model = await self._model_name(state, deployment)
            body = orjson.dumps({**prepared.payload, "model": model})
            self.acquire(state, adapter)
            keep = False
            try:
                response = await send_request(
                    state, ENGINE_PATHS[prepared.endpoint], body, request_id, deadline
                )
                try:
                    if response.status_code != 200:
                        error_body = await read_body(response, deadline, limit=self.max_body_bytes)
                        if (
                            deployment.adapter is not None
                            and not reregistered
                            and is_model_missing(response.status_code, error_body)
                        ):
                            # The engine restarted and forgot the adapter: register again, retry once.
                            logger.info("engine %s lost adapter %s; registering again", state.name, model)
                            self.loader.forget(state, model)
                            reregistered = True
                            continue
                        raise engine_error(response.status_code, error_body, deployment.slug)
                    if prepared.stream:
                        rewriter = StreamRewriter(
                            deployment.slug,
                            include_usage=prepared.include_usage,
                            on_usage=self._usage_hook(deployment.id),
                        )
                        stream = await OpenStream.open(
                            state, response, rewriter, deadline, max_event_bytes=self.max_event_bytes
                        )
                        keep = True
                        return Stream(stream, adapter)
                    raw = await read_body(response, deadline, limit=self.max_body_bytes)
                    return Answer(
                        rewrite_json_body(raw, deployment.slug, self._usage_hook(deployment.id)), state
                    )
                finally:
                    if not keep:
                        await response.aclose()
            finally:
                if not keep:
                    self.release(state, adapter)

    async def _model_name(self, state: EngineState, deployment: DeploymentView) -> str:
        if deployment.adapter is None:
            return state.view.served_model_name
        return await self.loader.ensure(state, deployment.adapter, deployment.id)

    def _usage_hook(self, deployment_id: str) -> Callable[[int, int], None]:
        def record(prompt: int, completion: int) -> None:
            self.metrics.tokens.labels(deployment_id, "prompt").inc(prompt)
            self.metrics.tokens.labels(deployment_id, "completion").inc(completion)

        return record


async def relay_stream(
    proxy: Proxy,
    outcome: Stream,
    send_bytes: Callable[[bytes], Awaitable[None]],
    *,
    deployment_id: str,
    started: float,
) -> None:
    """Relays a committed stream and records its metrics; always releases the engine."""
    stream = outcome.stream
    try:
        await stream.relay(send_bytes)
    finally:
        await stream.aclose()
        proxy.release(stream.state, outcome.adapter)
        if stream.stats.error is not None:
            proxy.failed(stream.state, stream.stats.error)
        if stream.stats.first_content_at is not None:
            proxy.metrics.ttft.labels(deployment_id).observe(stream.stats.first_content_at - started)
        if stream.stats.error_code is not None:
            proxy.metrics.errors.labels(deployment_id, stream.stats.error_code).inc()
