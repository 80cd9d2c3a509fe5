"""Bad input on the data plane: the documented 4xx in the OpenAI envelope, nothing sent to the
engine, no row or store file changed, and the gateway still serving afterwards.

What reached the engine is counted in the engine's own access log.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import Gateway
from tests.conftest import RowCounter
from tests.engines import RunningEngine
from tests.gateway.conftest import client_for, host_for, http_server
from tests.gateway.seed import Seed

pytestmark = pytest.mark.vllm

MESSAGES = [{"role": "user", "content": "hello there"}]
GOOD: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 6, "min_tokens": 6, "temperature": 0}
ENGINE_CHAT_LINE = '"POST /v1/chat/completions HTTP/1.1"'


def engine_chat_requests(engine: RunningEngine) -> int:
    return sum(1 for line in engine.log_text().splitlines() if ENGINE_CHAT_LINE in line)


async def wait_engine_count(engine: RunningEngine, expected: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while engine_chat_requests(engine) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # anything more would have been logged by now
    return engine_chat_requests(engine)


def store_listing(store: Path) -> list[str]:
    return sorted(str(path.relative_to(store)) for path in store.rglob("*"))


def envelope(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code


async def test_bad_input(
    engine_gateway: Gateway, seed: Seed, vllm_engine: RunningEngine, rows: RowCounter, shared_store: Path
) -> None:
    scope = await seed.default_scope()
    deployment_id = await seed.deployment(scope, "strict")
    await seed.deployment(scope, "neighbour")
    key = (await seed.key(deployment_id)).plaintext
    await engine_gateway.follower.sync_now()
    auth = {"authorization": f"Bearer {key}"}
    async with client_for(engine_gateway, "strict", key=key) as client:
        plain = await client.post("/v1/chat/completions", json=GOOD)
        assert plain.status_code == 200, plain.text
    engine_before = await wait_engine_count(vllm_engine, 1)
    rows_before = await rows.snapshot()
    store_before = store_listing(shared_store)

    Case = tuple[str, Callable[[httpx.AsyncClient], Awaitable[httpx.Response]], int, str]
    ten_mb = b'{"messages":[{"role":"user","content":"' + b"x" * (10 * 1024 * 1024) + b'"}]}'
    cases: list[Case] = [
        (
            "non-JSON body",
            lambda c: c.post("/v1/chat/completions", content=b"not json{"),
            400,
            "invalid_request",
        ),
        ("JSON array", lambda c: c.post("/v1/chat/completions", json=[GOOD]), 400, "invalid_request"),
        ("JSON string", lambda c: c.post("/v1/chat/completions", json="hello"), 400, "invalid_request"),
        (
            "missing messages",
            lambda c: c.post("/v1/chat/completions", json={"max_tokens": 3}),
            400,
            "invalid_request",
        ),
        (
            "empty messages",
            lambda c: c.post("/v1/chat/completions", json={"messages": []}),
            400,
            "invalid_request",
        ),
        (
            "missing prompt",
            lambda c: c.post("/v1/completions", json={"messages": MESSAGES}),
            400,
            "invalid_request",
        ),
        ("10 MB body", lambda c: c.post("/v1/chat/completions", content=ten_mb), 413, "payload_too_large"),
        (
            "n over cap",
            lambda c: c.post("/v1/chat/completions", json={**GOOD, "n": 1000}),
            400,
            "invalid_request",
        ),
        (
            "max_tokens over cap",
            lambda c: c.post("/v1/chat/completions", json={**GOOD, "max_tokens": 10**9}),
            400,
            "invalid_request",
        ),
        (
            "max_completion_tokens over cap",
            lambda c: c.post("/v1/chat/completions", json={**GOOD, "max_completion_tokens": 10**9}),
            400,
            "invalid_request",
        ),
        (
            "stream not a boolean",
            lambda c: c.post("/v1/chat/completions", json={**GOOD, "stream": "yes"}),
            400,
            "invalid_request",
        ),
        ("GET chat completions", lambda c: c.get("/v1/chat/completions"), 405, "method_not_allowed"),
        ("unknown route", lambda c: c.post("/v1/embeddings", json={"input": "x"}), 404, "not_found"),
        (
            "path mode on a deployment host",
            lambda c: c.post("/d/strict/v1/chat/completions", json=GOOD),
            404,
            "not_found",
        ),
        (
            "unknown host",
            lambda c: c.post("http://unknown.lorry.test/v1/chat/completions", json=GOOD),
            404,
            "deployment_not_found",
        ),
        (
            "not a deployment host",
            lambda c: c.post("http://example.org/v1/chat/completions", json=GOOD),
            404,
            "deployment_not_found",
        ),
        (
            "X-Forwarded-Host naming this deployment on an unknown host",
            lambda c: c.post(
                "http://unknown.lorry.test/v1/chat/completions",
                json=GOOD,
                headers={"x-forwarded-host": host_for("strict")},
            ),
            404,
            "deployment_not_found",
        ),
        (
            "X-Forwarded-Host naming another deployment",
            lambda c: c.post(
                f"http://{host_for('neighbour')}/v1/chat/completions",
                json=GOOD,
                headers={"x-forwarded-host": host_for("strict")},
            ),
            401,
            "invalid_api_key",
        ),
        (
            "two Host headers",
            lambda c: c.post(
                "/v1/chat/completions",
                json=GOOD,
                headers=[("host", host_for("strict")), ("host", host_for("neighbour")), *auth.items()],
            ),
            400,
            "invalid_request",
        ),
        (
            "no key",
            lambda c: c.post("/v1/chat/completions", json=GOOD, headers={"authorization": ""}),
            401,
            "invalid_api_key",
        ),
    ]
    async with client_for(engine_gateway, "strict", key=key) as client:
        for name, call, status, code in cases:
            response = await call(client)
            assert response.status_code == status, (name, response.text)
            envelope(response, status, code)

        # Dropped fields never reach the engine: each of these would make vLLM fail or change the answer.
        probes = {
            "cache_salt": "not/allowed",  # vLLM: 400 (no '/')
            "chat_template": "{{ 'x' }}",  # vLLM: 400 (untrusted template)
            "mm_processor_kwargs": {"a": 1},  # vLLM: 400
            "request_id": "client-chosen",  # vLLM: would become the completion id
            "kv_transfer_params": {"x": 1},
            "vllm_xargs": {"a": 1},
            "logits_processors": ["x"],
            "chat_template_kwargs": {"add_generation_prompt": False},
            "priority": 5,
            "model": "lora-0000000000000000",
        }
        probed = await client.post("/v1/chat/completions", json={**GOOD, **probes})
        assert probed.status_code == 200, probed.text
        assert probed.json()["id"] != "chatcmpl-client-chosen"
        assert (
            probed.json()["choices"][0]["message"]["content"]
            == plain.json()["choices"][0]["message"]["content"]
        )
        still = await client.post("/v1/chat/completions", json=GOOD)
        assert still.status_code == 200, still.text

    engine_after = await wait_engine_count(vllm_engine, engine_before + 2)
    assert engine_after == engine_before + 2, "a bad request reached the engine"
    assert await rows.snapshot() == rows_before
    assert store_listing(shared_store) == store_before
    print(
        f"\n{len(cases)} bad inputs answered; engine requests +{engine_after - engine_before} "
        "(the 2 good ones)"
    )


async def test_bad_input_over_real_http(
    engine_gateway: Gateway, seed: Seed, vllm_engine: RunningEngine
) -> None:
    """The same refusals through uvicorn/httptools: oversize bodies and duplicate Host headers."""
    scope = await seed.default_scope()
    deployment_id = await seed.deployment(scope, "wire")
    key = (await seed.key(deployment_id)).plaintext
    await engine_gateway.follower.sync_now()
    engine_before = engine_chat_requests(vllm_engine)
    async with http_server(engine_gateway.app) as url:
        port = int(url.rsplit(":", 1)[1])
        async with httpx.AsyncClient(base_url=url, headers={"host": host_for("wire")}, timeout=30) as client:
            big = await client.post(
                "/v1/chat/completions",
                content=b"x" * (10 * 1024 * 1024),
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
            )
            envelope(big, 413, "payload_too_large")

        def two_hosts() -> bytes:
            request = (
                f"GET /v1/models HTTP/1.1\r\nHost: {host_for('wire')}\r\nHost: {host_for('other')}\r\n"
                f"Authorization: Bearer {key}\r\nConnection: close\r\n\r\n"
            ).encode()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(request)
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
            return data

        raw = await asyncio.to_thread(two_hosts)
        assert raw.startswith(b"HTTP/1.1 400"), raw[:200]
        assert b'"code":"invalid_request"' in raw
        async with httpx.AsyncClient(base_url=url, headers={"host": host_for("wire")}, timeout=30) as client:
            ok = await client.post(
                "/v1/chat/completions", json=GOOD, headers={"authorization": f"Bearer {key}"}
            )
            assert ok.status_code == 200, ok.text
    assert await wait_engine_count(vllm_engine, engine_before + 1) == engine_before + 1
