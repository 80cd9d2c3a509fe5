"""Streams are relayed as they arrive, a client that leaves closes the engine request, and a
stream that fails after its first byte ends with an error event (DESIGN §7).

A real engine cannot be made to pause or break mid-stream on demand, so these use a
fault-injecting stand-in: a tiny Starlette app served by uvicorn that sends one chunk, then waits
3 s (or, when the user message is ``malformed``, sends a broken event).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.app import Gateway
from tests.gateway.conftest import MakeGateway, http_server
from tests.gateway.seed import Seed

PAUSE_S = 3.0


class StandIn:
    """An engine that streams one chunk, pauses, then finishes; it records cancellations."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.cancelled = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ]
        )

    async def health(self, _request: Request) -> Response:
        return Response(status_code=200)

    async def models(self, _request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "lorry/tiny-llama", "object": "model"}]})

    async def chat(self, request: Request) -> StreamingResponse:
        body = await request.json()
        self.requests.append(body)

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            chunk = {
                "id": "chatcmpl-standin",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": body["model"],
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        malformed = body["messages"][-1]["content"] == "malformed"

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield event({"role": "assistant", "content": "Hello"})
                if malformed:
                    yield b"data: {this is not json\n\n"
                    await asyncio.sleep(PAUSE_S)
                await asyncio.sleep(PAUSE_S)
                yield event({"content": " world"}, "stop")
                yield b"data: [DONE]\n\n"
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

        return StreamingResponse(stream(), media_type="text/event-stream")


@pytest.fixture
def gateway_update() -> dict[str, Any]:
    return {}


@pytest.fixture
async def stand_in_gateway(
    make_gateway: MakeGateway, seed: Seed, gateway_update: dict[str, Any]
) -> AsyncIterator[tuple[Gateway, StandIn]]:
    stand_in = StandIn()
    async with http_server(stand_in.app) as engine_url:
        gw = await make_gateway(
            update={
                "path_routing": True,
                "engines": [{"name": "stand-in", "url": engine_url, "baseModel": "lorry/tiny-llama"}],
                **gateway_update,
            }
        )
        scope = await seed.default_scope()
        await seed.deployment(scope, "slow", auth_mode="none")
        await gw.follower.sync_now()
        yield gw, stand_in


async def test_first_chunk_arrives_before_the_pause(stand_in_gateway: tuple[Gateway, StandIn]) -> None:
    gw, stand_in = stand_in_gateway
    async with http_server(gw.app) as url, httpx.AsyncClient(timeout=30) as client:
        started = time.monotonic()
        received: list[tuple[float, bytes]] = []
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with client.stream("POST", f"{url}/d/slow/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            assert "content-encoding" not in response.headers
            async for chunk in response.aiter_raw():
                received.append((time.monotonic() - started, chunk))
    first_at, first = received[0]
    total = received[-1][0]
    text = b"".join(chunk for _, chunk in received)
    print(f"\nfirst chunk after {first_at * 1000:.0f} ms; stream ended after {total:.2f} s")
    assert b'"content":"Hello"' in first and b'"model":"slow"' in first
    assert first_at < 0.5
    assert total >= PAUSE_S
    assert text.endswith(b"data: [DONE]\n\n") and b"world" in text
    assert stand_in.requests[0]["model"] == "lorry/tiny-llama"  # the engine's served name, not the slug


async def test_client_disconnect_closes_the_engine_request(stand_in_gateway: tuple[Gateway, StandIn]) -> None:
    gw, stand_in = stand_in_gateway
    async with http_server(gw.app) as url:
        client = httpx.AsyncClient(timeout=30)
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with client.stream("POST", f"{url}/d/slow/v1/chat/completions", json=body) as response:
            async for _chunk in response.aiter_raw():
                break  # the first chunk arrived; now leave
        left = time.monotonic()
        await client.aclose()
        await asyncio.wait_for(stand_in.cancelled.wait(), timeout=2.0)
        print(f"\nengine request cancelled {(time.monotonic() - left) * 1000:.0f} ms after the client left")
        deadline = time.monotonic() + 2
        while gw.pool.states()[0].in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert gw.pool.states()[0].in_flight == 0


async def _events(url: str, content: str) -> tuple[list[bytes], float]:
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as client:
        body = {"messages": [{"role": "user", "content": content}], "stream": True}
        response = await client.post(f"{url}/d/slow/v1/chat/completions", json=body)
    assert response.status_code == 200
    return [event for event in response.content.split(b"\n\n") if event], time.monotonic() - started


async def test_malformed_event_after_first_byte_ends_with_error_event(
    stand_in_gateway: tuple[Gateway, StandIn],
) -> None:
    gw, stand_in = stand_in_gateway
    async with http_server(gw.app) as url:
        events, elapsed = await _events(url, "malformed")
        assert b'"content":"Hello"' in events[0]
        assert events[-1].startswith(b'data: {"error"')
        error = orjson.loads(events[-1][len(b"data: ") :])["error"]
        assert error["code"] == "upstream_error" and error["type"] == "server_error"
        assert b"[DONE]" not in b"".join(events)
        assert elapsed < PAUSE_S  # closed at once, not after the engine's pause
        await asyncio.wait_for(stand_in.cancelled.wait(), timeout=2.0)  # and the engine request closed

        client = openai.AsyncOpenAI(base_url=f"{url}/d/slow/v1", api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "malformed"}], stream=True
        )
        received = []
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                received.append(chunk)
        assert received and received[0].choices[0].delta.content == "Hello"
        await client.close()


@pytest.mark.parametrize("gateway_update", [{"upstream_idle_timeout_s": 1.0}])
async def test_idle_engine_mid_stream_times_out_with_error_event(
    stand_in_gateway: tuple[Gateway, StandIn],
) -> None:
    gw, _ = stand_in_gateway
    async with http_server(gw.app) as url:
        events, elapsed = await _events(url, "pause")
    assert b'"content":"Hello"' in events[0]
    error = orjson.loads(events[-1][len(b"data: ") :])["error"]
    assert error["code"] == "upstream_timeout"
    assert 1.0 <= elapsed < PAUSE_S
