"""The data-plane ASGI app: routing, authentication, the request policy and the relay (DESIGN §7).

Order of checks for every request: Host (one header; 400 for more) → deployment (404
``deployment_not_found`` before anything else) → route and method (404/405) → CORS preflight →
key → body (413, 400) → engine. Every answer carries ``x-request-id``; every error is the OpenAI
envelope. A warm request (deployment in the snapshot, key in the cache, adapter registered)
touches no database.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Message, Receive, Scope, Send

from gateway import hosts, request_policy
from gateway.client_address import client_address, trusted_networks
from gateway.errors import (
    DeploymentNotFound,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    RouteNotFound,
    ServiceUnavailable,
    ShuttingDown,
)
from gateway.key_check import extract_token
from gateway.metrics import NO_DEPLOYMENT
from gateway.proxy import Answer, Stream, relay_stream
from gateway.request_policy import Endpoint
from gateway.snapshot import DeploymentView
from gateway.upstream import SSE_HEADERS

if TYPE_CHECKING:
    from gateway.app import Gateway

logger = logging.getLogger("lorry.gateway")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MODELS_PREFIX = "/v1/models/"
_ROUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "/v1/chat/completions": ("chat", ("POST",)),
    "/v1/completions": ("completions", ("POST",)),
    "/v1/models": ("models", ("GET",)),
}
_ENDPOINTS = {"chat": Endpoint.CHAT, "completions": Endpoint.COMPLETIONS}
_CORS_DEFAULT_HEADERS = "authorization, content-type, x-api-key, x-request-id"
CLIENT_CLOSED = 499


class ClientGone(Exception):
    """The client disconnected before the response was sent."""


@dataclass
class _Context:
    request_id: str
    deployment_id: str = NO_DEPLOYMENT
    route: str = "unknown"
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    status: int = 0
    error_code: str | None = None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _request_id(scope: Scope) -> str:
    value = _header(scope, b"x-request-id")
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def _match(path: str) -> tuple[str, tuple[str, ...]] | None:
    route = _ROUTES.get(path)
    if route is not None:
        return route
    if path.startswith(_MODELS_PREFIX) and len(path) > len(_MODELS_PREFIX):
        return ("model", ("GET",))
    return None


class DataPlane:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        settings = gateway.settings
        self.base_domain = settings.base_domain.lower().rstrip(".")
        self.path_routing = settings.path_routing
        self.max_body_bytes = settings.max_body_bytes
        self.cors_origins = frozenset(settings.cors_origins)
        self.passthrough = frozenset(settings.passthrough_fields)
        self.trusted_proxies = trusted_networks(settings.trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.gw.start()
                except Exception as exc:
                    logger.exception("gateway failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                # What start-up built lives as long as the process: keep it out of the cyclic
                # collector's full passes (a long gen-2 pause would stall every stream at once).
                gc.collect()
                gc.freeze()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.gw.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- one request -------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        ctx = _Context(request_id=_request_id(scope))

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                ctx.status = int(message["status"])
            await send(message)

        try:
            await self._dispatch(scope, receive, tracked_send, ctx, started)
        except ClientGone:
            ctx.status = ctx.status or CLIENT_CLOSED
        except GatewayError as exc:
            await self._send_error(exc, ctx, tracked_send)
        except Exception:
            logger.exception("unhandled error (request %s)", ctx.request_id)
            if not ctx.status:
                await self._send_error(GatewayError(), ctx, tracked_send)
        finally:
            metrics = self.gw.metrics
            status = str(ctx.status or CLIENT_CLOSED)
            metrics.requests.labels(ctx.deployment_id, ctx.route, status).inc()
            metrics.latency.labels(ctx.deployment_id, ctx.route).observe(time.monotonic() - started)
            if ctx.error_code is not None:
                metrics.errors.labels(ctx.deployment_id, ctx.error_code).inc()

    def _headers(self, ctx: _Context, extra: dict[str, str] | None = None) -> list[tuple[bytes, bytes]]:
        headers = [(b"x-request-id", ctx.request_id.encode())]
        headers.extend(ctx.extra_headers)
        for name, value in (extra or {}).items():
            headers.append((name.encode("latin-1"), value.encode("latin-1")))
        return headers

    async def _send_json(
        self, send: Send, ctx: _Context, status: int, body: bytes, extra: dict[str, str] | None = None
    ) -> None:
        headers = self._headers(ctx, {"content-type": "application/json", **(extra or {})})
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _send_error(self, error: GatewayError, ctx: _Context, send: Send) -> None:
        ctx.error_code = error.code
        if ctx.status:  # the response already started: nothing more can be said
            return
        await self._send_json(
            send, ctx, error.status_code, orjson.dumps(error.body()), error.response_headers()
        )

    async def _dispatch(
        self, scope: Scope, receive: Receive, send: Send, ctx: _Context, started: float
    ) -> None:
        target = hosts.resolve(
            scope["headers"], scope["path"], base_domain=self.base_domain, path_routing=self.path_routing
        )
        if self.gw.draining:
            raise ShuttingDown()
        if target.slug is None:
            raise DeploymentNotFound()
        snapshot = self.gw.snapshot
        if not snapshot.loaded:
            raise ServiceUnavailable("The gateway is starting", retry_after_s=1)
        deployment = snapshot.deployment_for_slug(target.slug)
        if deployment is None:
            raise DeploymentNotFound()
        ctx.deployment_id = deployment.id
        ctx.extra_headers = self._cors_headers(scope)
        matched = _match(target.path)
        if matched is None:
            raise RouteNotFound()
        route, methods = matched
        ctx.route = route
        method = scope["method"]
        if method == "OPTIONS":
            await self._preflight(scope, send, ctx, methods)
            return
        if method not in methods:
            raise MethodNotAllowed(headers={"allow": ", ".join(methods)})

        if deployment.requires_key:
            token = extract_token(scope["headers"])
            address = client_address(scope, self.trusted_proxies)
            grant = await self.gw.keys.check(token, deployment.id, address)
            self.gw.last_used.touch(grant.key_id)

        if route == "models":
            body = orjson.dumps({"object": "list", "data": [self._model_object(deployment)]})
            await self._send_json(send, ctx, 200, body)
            return
        if route == "model":
            if target.path[len(_MODELS_PREFIX) :] != deployment.slug:
                raise GatewayError(
                    "This deployment serves one model, named after its slug",
                    status_code=404,
                    code="model_not_found",
                    param="model",
                )
            await self._send_json(send, ctx, 200, orjson.dumps(self._model_object(deployment)))
            return

        raw = await self._read_body(scope, receive)
        try:
            body_json = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidRequest("Request body is not valid JSON") from None
        prepared = request_policy.prepare(
            _ENDPOINTS[route],
            body_json,
            cache_salt=deployment.id,
            limits=self.gw.options.limits,
            passthrough=self.passthrough,
        )
        await self._until_disconnect(
            receive, lambda: self._generate(deployment, prepared, ctx, send, started)
        )

    @staticmethod
    def _model_object(deployment: DeploymentView) -> dict[str, Any]:
        return {
            "id": deployment.slug,
            "object": "model",
            "created": int(deployment.created_at.timestamp()),
            "owned_by": "lorry",
        }

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise PayloadTooLarge(f"Request body exceeds {limit} bytes")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            body += message.get("body", b"")
            if len(body) > limit:
                raise PayloadTooLarge(f"Request body exceeds {limit} bytes")
            if not message.get("more_body", False):
                return bytes(body)

    async def _until_disconnect(self, receive: Receive, work: Callable[[], Awaitable[None]]) -> None:
        """Runs ``work``; a client disconnect cancels it (which closes the engine request)."""

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        worker = asyncio.ensure_future(work())
        watcher = asyncio.ensure_future(watch())
        try:
            done, _ = await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this request itself was cancelled (server shutdown)
            worker.cancel()
            watcher.cancel()
            await asyncio.gather(worker, watcher, return_exceptions=True)
            raise
        if worker in done:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            worker.result()
            return
        left = time.monotonic()
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
        logger.debug("client left; its engine request closed %.1f ms later", (time.monotonic() - left) * 1000)
        raise ClientGone()

    async def _generate(
        self,
        deployment: DeploymentView,
        prepared: request_policy.PreparedRequest,
        ctx: _Context,
        send: Send,
        started: float,
    ) -> None:
        proxy = self.gw.proxy
        handle = self.gw.track_request()
        try:
            try:
                outcome = await proxy.forward(deployment, prepared, ctx.request_id)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if handle.drained and task is not None:
                    task.uncancel()  # the shutdown deadline, not the client: answer it
                    raise ShuttingDown() from None
                raise
            if isinstance(outcome, Answer):
                await self._send_json(send, ctx, 200, outcome.body)
                return
            assert isinstance(outcome, Stream)
            handle.stream = outcome.stream
            if handle.drained:  # the deadline passed while the first event was being read
                outcome.stream.abort(ShuttingDown())

            async def send_bytes(data: bytes) -> None:
                await send({"type": "http.response.body", "body": data, "more_body": True})

            self.gw.active_streams += 1
            relaying = False
            try:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self._headers(ctx, SSE_HEADERS)}
                )
                relaying = True
                await relay_stream(proxy, outcome, send_bytes, deployment_id=deployment.id, started=started)
            finally:
                self.gw.active_streams -= 1
                if not relaying:  # cancelled before the relay owned the stream: release it here
                    await outcome.stream.aclose()
                    proxy.release(outcome.stream.state, outcome.adapter)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.gw.untrack_request(handle)

    # -- CORS ----------------------------------------------------------------------------------------

    def _origin_allowed(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin in self.cors_origins

    def _cors_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        origin = _header(scope, b"origin")
        if origin is None or not self._origin_allowed(origin):
            return []
        return [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-expose-headers", b"x-request-id"),
            (b"vary", b"origin"),
        ]

    async def _preflight(self, scope: Scope, send: Send, ctx: _Context, methods: tuple[str, ...]) -> None:
        origin = _header(scope, b"origin")
        if origin is None or not self._origin_allowed(origin):
            raise GatewayError(
                "Cross-origin requests are not allowed from this origin",
                status_code=403,
                code="cors_not_allowed",
            )
        requested = _header(scope, b"access-control-request-headers")
        headers = self._headers(
            ctx,
            {
                "access-control-allow-methods": ", ".join((*methods, "OPTIONS")),
                "access-control-allow-headers": requested or _CORS_DEFAULT_HEADERS,
                "access-control-max-age": "600",
            },
        )
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
