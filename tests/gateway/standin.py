"""A fault-injecting engine stand-in (DESIGN §13: only for faults a real engine cannot produce on
demand): stalls before the answer or its first event, stalls or breaks mid-stream, a health
endpoint that can be switched to 503. It records what it was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from lorry.serving import QuietServer

MODEL = "lorry/tiny-llama"
STALL_LIMIT_S = 30.0

MODES = ("ok", "stall_headers", "stall_first_event", "stall_mid", "malformed", "long")


class StandInEngine:
    def __init__(self, name: str, *, long_chunks: int = 200, chunk_interval_s: float = 0.05) -> None:
        self.name = name
        self.mode = "ok"
        self.health_status = 200
        self.health_stalls = False  # /health answers only when released (a busy engine's loop)
        self.long_chunks = long_chunks
        self.chunk_interval_s = chunk_interval_s
        self.requests: list[dict[str, Any]] = []
        self.hosts: list[str] = []
        self.health_checks = 0
        self.model_listings = 0
        self.cancelled = 0
        self.release = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
            ]
        )

    async def _stall(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STALL_LIMIT_S):
                await self.release.wait()

    async def health(self, _request: Request) -> Response:
        self.health_checks += 1
        if self.health_stalls:
            await self._stall()
        return Response(status_code=self.health_status)

    async def metrics(self, _request: Request) -> Response:
        return Response("", media_type="text/plain")

    async def models(self, _request: Request) -> JSONResponse:
        self.model_listings += 1
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def _chunk(self, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {
            "id": f"chatcmpl-{self.name}",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.hosts.append(request.headers.get("host", ""))
        mode = self.mode
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content")
        if isinstance(content, str) and content.startswith("mode:"):
            mode = content[len("mode:") :]  # one request's own fault
        model = str(body.get("model"))
        if mode == "stall_headers":
            await self._stall()
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": f"chatcmpl-{self.name}",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": f"from {self.name}"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                }
            )

        async def stream() -> AsyncIterator[bytes]:
            try:
                if mode == "stall_first_event":
                    await self._stall()
                yield self._chunk(model, {"role": "assistant", "content": ""})
                yield self._chunk(model, {"content": f"from {self.name}"})
                if mode == "stall_mid":
                    await self._stall()
                if mode == "malformed":
                    yield b"data: {this is not json\n\n"
                    await self._stall()
                if mode == "long":
                    for _ in range(self.long_chunks):
                        await asyncio.sleep(self.chunk_interval_s)
                        yield self._chunk(model, {"content": "."})
                yield self._chunk(model, {"content": "!"}, "stop")
                yield b"data: [DONE]\n\n"
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

        return StreamingResponse(stream(), media_type="text/event-stream")


@contextlib.asynccontextmanager
async def serve_app(
    app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, graceful_s: int | None = 1
) -> AsyncIterator[int]:
    """Serves ``app`` on ``host:port`` (0: a free port) with uvicorn (httptools); yields the port.
    At the end, connections still open get ``graceful_s`` (None: as long as they take)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http="httptools",
        lifespan="off",
        log_level="warning",
        loop="none",
        timeout_graceful_shutdown=graceful_s,
    )
    server = QuietServer(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server stopped during start")
        await asyncio.sleep(0.01)
    bound = int(server.servers[0].sockets[0].getsockname()[1])
    try:
        yield bound
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def running_standin(
    engine: StandInEngine, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serves a stand-in; yields its URL. Anything it still holds is released at the end."""
    async with serve_app(engine.app, host, port) as bound:
        try:
            yield f"http://{host}:{bound}"
        finally:
            engine.release.set()
