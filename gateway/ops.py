"""The operations app (its own port, never on deployment hosts): ``/healthz``, ``/readyz``, ``/metrics``.

Readiness means: started, snapshot loaded, not draining. A database outage alone does not fail
readiness: cached keys keep working (DESIGN §6), and taking every replica out of a load balancer
at once would turn a partial outage into a total one. ``/readyz`` reports the database anyway.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from gateway.errors import GatewayError, MethodNotAllowed, RouteNotFound

if TYPE_CHECKING:
    from gateway.app import Gateway


class OpsApp:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        handler = {"/healthz": self._healthz, "/readyz": self._readyz, "/metrics": self._metrics}.get(path)
        if handler is None:
            await self._send_error(send, RouteNotFound())
            return
        if method not in ("GET", "HEAD"):
            await self._send_error(send, MethodNotAllowed(headers={"allow": "GET, HEAD"}))
            return
        status, body, content_type = handler()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    async def _send_error(self, send: Send, error: GatewayError) -> None:
        body = orjson.dumps(error.body())
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in error.response_headers().items()]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _healthz(self) -> tuple[int, bytes, str]:
        return 200, orjson.dumps({"status": "ok"}), "application/json"

    def _readyz(self) -> tuple[int, bytes, str]:
        gw = self.gw
        follower = gw.follower
        if gw.draining:
            state = "draining"
        elif not (gw.started and gw.snapshot.loaded):
            state = "starting"
        else:
            state = "ready"
        body = {
            "status": state,
            "database": "ok" if follower.database_ok else "unreachable",
            "changeFeedCursor": follower.cursor,
            "deployments": len(gw.snapshot.by_id),
            "engines": len(gw.snapshot.engines),
        }
        return (200 if state == "ready" else 503), orjson.dumps(body), "application/json"

    def _metrics(self) -> tuple[int, bytes, str]:
        follower = self.gw.follower
        if follower.last_success:
            self.gw.metrics.snapshot_age.set(time.monotonic() - follower.last_success)
        return 200, self.gw.metrics.render(), CONTENT_TYPE_LATEST
