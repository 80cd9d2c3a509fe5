"""Deployments served by a real vLLM CPU engine with hot-loaded adapters (DESIGN §8, §9).

Adapters are the demo model's PEFT adapters imported through the admin API; engine-side loads
are counted in the engine's own log (``Loaded new LoRA adapter`` lines).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest

from gateway.app import Gateway
from tests.engines import RunningEngine
from tests.gateway.admin_api import AdminApi
from tests.gateway.conftest import DemoAdapters, MakeGateway, client_for, engine_entry, engine_name_of

pytestmark = pytest.mark.vllm

MESSAGES = [{"role": "user", "content": "Tell me about the river and the old stone house."}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12, "min_tokens": 12}


async def gateway_chat(gw: Gateway, slug: str, key: str | None, **extra: Any) -> httpx.Response:
    async with client_for(gw, slug, key=key) as client:
        return await client.post("/v1/chat/completions", json={"messages": MESSAGES, **GREEDY, **extra})


async def engine_chat(engine: RunningEngine, model: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=engine.url, timeout=60) as client:
        response = await client.post(
            "/v1/chat/completions", json={"model": model, "messages": MESSAGES, **GREEDY}
        )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def content(body: dict[str, Any]) -> str:
    text = body["choices"][0]["message"]["content"]
    assert isinstance(text, str)
    return text


async def deployment_with_key(
    api: AdminApi, slug: str, *, job: dict[str, Any] | None = None, base_model: str | None = None
) -> tuple[dict[str, Any], str]:
    deployment = await api.create_deployment(
        slug, job_id=job["id"] if job else None, base_model=None if job else base_model
    )
    key = await api.create_key(deployment["id"])
    return deployment, str(key["plaintext"])


async def test_deployments_answer_exactly_like_the_engine(
    engine_gateway: Gateway, admin_api: AdminApi, demo_adapters: DemoAdapters, vllm_engine: RunningEngine
) -> None:
    alpha = await demo_adapters.job("alpha")
    beta = await demo_adapters.job("beta")
    _, key_a = await deployment_with_key(admin_api, "alpha-bot", job=alpha)
    _, key_b = await deployment_with_key(admin_api, "beta-bot", job=beta)
    _, key_base = await deployment_with_key(admin_api, "base-bot", base_model=vllm_engine.served_model_name)
    await engine_gateway.follower.sync_now()

    answers: dict[str, str] = {}
    for slug, key, engine_model in (
        ("alpha-bot", key_a, engine_name_of(alpha)),
        ("beta-bot", key_b, engine_name_of(beta)),
        ("base-bot", key_base, vllm_engine.served_model_name),
    ):
        response = await gateway_chat(engine_gateway, slug, key)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == slug
        assert body["usage"]["completion_tokens"] == 12
        direct = await engine_chat(vllm_engine, engine_model)
        assert content(body) == content(direct) != ""
        assert engine_model not in response.text
        answers[slug] = content(body)
    assert len(set(answers.values())) == 3, answers  # each adapter changes the output
    print(f"\nanswers: {answers}")


async def test_retarget_changes_output_not_url_or_key(
    engine_gateway: Gateway, admin_api: AdminApi, demo_adapters: DemoAdapters, vllm_engine: RunningEngine
) -> None:
    alpha = await demo_adapters.job("alpha")
    beta = await demo_adapters.job("beta")
    deployment, key = await deployment_with_key(admin_api, "moving", job=alpha)
    await engine_gateway.follower.sync_now()
    first = await gateway_chat(engine_gateway, "moving", key)
    assert first.status_code == 200, first.text
    assert content(first.json()) == content(await engine_chat(vllm_engine, engine_name_of(alpha)))

    started = time.monotonic()
    await admin_api.retarget(deployment["id"], beta["id"])
    while True:
        response = await gateway_chat(engine_gateway, "moving", key)
        assert response.status_code == 200, response.text
        if content(response.json()) != content(first.json()):
            break
        assert time.monotonic() - started < 2.0, "re-targeting not visible"
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    expected = content(await engine_chat(vllm_engine, engine_name_of(beta)))
    assert content(response.json()) == expected
    assert response.json()["model"] == "moving"
    print(f"\nre-targeted output served after {elapsed * 1000:.0f} ms (same URL, same key)")


async def test_burst_of_first_requests_loads_the_adapter_once(
    engine_gateway: Gateway, admin_api: AdminApi, demo_adapters: DemoAdapters, vllm_engine: RunningEngine
) -> None:
    job = await demo_adapters.job("alpha", variant=uuid.uuid4().hex)  # content the engine has never seen
    name = engine_name_of(job)
    deployment, key = await deployment_with_key(admin_api, "burst", job=job)
    await engine_gateway.follower.sync_now()
    assert vllm_engine.load_count(name) == 0
    responses = await asyncio.gather(
        *(gateway_chat(engine_gateway, "burst", key, max_tokens=4, min_tokens=4) for _ in range(20))
    )
    assert [r.status_code for r in responses] == [200] * 20, [
        r.text for r in responses if r.status_code != 200
    ]
    assert vllm_engine.load_count(name) == 1
    assert engine_gateway.loader.load_calls == 1
    loads = engine_gateway.metrics.registry.get_sample_value(
        "lorry_gateway_adapter_loads_total",
        {"deployment": deployment["id"], "engine": "shared", "outcome": "loaded"},
    )
    assert loads == 1
    print(
        f"\n20 concurrent first requests: {vllm_engine.load_count(name)} "
        f"'Loaded new LoRA adapter' line for {name}"
    )


async def test_rejected_adapter_is_negative_cached(
    make_gateway: MakeGateway,
    shared_store: Any,
    admin_api: AdminApi,
    demo_adapters: DemoAdapters,
    vllm_engine: RunningEngine,
) -> None:
    # The engine runs with --max-lora-rank 16; declared as 32 here, so it is chosen and refuses.
    gw = await make_gateway(update={"engines": [engine_entry(vllm_engine, shared_store, maxLoraRank=32)]})
    oversize = await demo_adapters.job("oversize")
    alpha = await demo_adapters.job("alpha")
    _, key = await deployment_with_key(admin_api, "too-big", job=oversize)
    _, key_ok = await deployment_with_key(admin_api, "fine", job=alpha)
    await gw.follower.sync_now()
    for _ in range(3):
        response = await gateway_chat(gw, "too-big", key)
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] == "adapter_load_failed"
        assert response.headers["x-should-retry"] == "false"
        assert engine_name_of(oversize) not in response.text and "rank" not in response.text
    assert gw.loader.load_calls == 1  # the rejection is remembered
    assert (await gateway_chat(gw, "fine", key_ok)).status_code == 200  # the engine is unharmed


async def test_engine_that_forgot_the_adapter_gets_it_again(
    engine_gateway: Gateway, admin_api: AdminApi, demo_adapters: DemoAdapters, vllm_engine: RunningEngine
) -> None:
    job = await demo_adapters.job("beta", variant=uuid.uuid4().hex)
    name = engine_name_of(job)
    _, key = await deployment_with_key(admin_api, "forgetful", job=job)
    await engine_gateway.follower.sync_now()
    first = await gateway_chat(engine_gateway, "forgetful", key)
    assert first.status_code == 200, first.text
    # As after an engine restart: the engine no longer knows the name, the gateway still does.
    async with httpx.AsyncClient(base_url=vllm_engine.url) as engine:
        unloaded = await engine.post("/v1/unload_lora_adapter", json={"lora_name": name})
        assert unloaded.status_code == 200, unloaded.text
    again = await gateway_chat(engine_gateway, "forgetful", key)
    assert again.status_code == 200, again.text
    assert content(again.json()) == content(first.json())
    assert vllm_engine.load_count(name) == 2
    assert engine_gateway.loader.load_calls == 2


async def test_reconcile_registered_adapters_at_start(
    make_gateway: MakeGateway,
    shared_store: Any,
    admin_api: AdminApi,
    demo_adapters: DemoAdapters,
    vllm_engine: RunningEngine,
) -> None:
    engines = [engine_entry(vllm_engine, shared_store)]
    job = await demo_adapters.job("gamma", variant=uuid.uuid4().hex)
    name = engine_name_of(job)
    _, key = await deployment_with_key(admin_api, "reconciled", job=job)
    first = await make_gateway(update={"engines": engines})
    assert (await gateway_chat(first, "reconciled", key)).status_code == 200
    assert vllm_engine.load_count(name) == 1
    second = await make_gateway(update={"engines": engines})  # a new replica, or a restart
    state = second.pool.states()[0]
    deadline = time.monotonic() + 10
    while not state.reconciled:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert name in state.registered
    assert (await gateway_chat(second, "reconciled", key)).status_code == 200
    assert second.loader.load_calls == 0
    assert vllm_engine.load_count(name) == 1


async def test_client_model_field_is_ignored(
    engine_gateway: Gateway, admin_api: AdminApi, demo_adapters: DemoAdapters, vllm_engine: RunningEngine
) -> None:
    alpha = await demo_adapters.job("alpha")
    beta = await demo_adapters.job("beta")
    _, key_a = await deployment_with_key(admin_api, "mine", job=alpha)
    await deployment_with_key(admin_api, "theirs", job=beta)
    await engine_gateway.follower.sync_now()
    own = content(await engine_chat(vllm_engine, engine_name_of(alpha)))
    for model in (engine_name_of(beta), "theirs", vllm_engine.served_model_name, "gpt-4o", "../../etc"):
        response = await gateway_chat(engine_gateway, "mine", key_a, model=model)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "mine"
        assert content(response.json()) == own


async def test_stream_usage_chunks(
    engine_gateway: Gateway, admin_api: AdminApi, vllm_engine: RunningEngine
) -> None:
    _, key = await deployment_with_key(admin_api, "usage", base_model=vllm_engine.served_model_name)
    await engine_gateway.follower.sync_now()

    async def events(**extra: Any) -> list[Any]:
        response = await gateway_chat(engine_gateway, "usage", key, stream=True, **extra)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert "content-encoding" not in response.headers
        out: list[Any] = []
        for block in response.text.split("\n\n"):
            if block.startswith("data: "):
                data = block[len("data: ") :]
                out.append(data if data == "[DONE]" else orjson.loads(data))
        assert out[-1] == "[DONE]"
        return out[:-1]

    with_usage = await events(stream_options={"include_usage": True})
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 12
    assert all(chunk["model"] == "usage" for chunk in with_usage)
    without = await events()
    assert all("usage" not in chunk or chunk["usage"] is None for chunk in without)
    assert all(chunk["choices"] for chunk in without)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in without) == "".join(
        c["choices"][0]["delta"].get("content") or "" for c in with_usage if c["choices"]
    )
    continuous = await events(stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert sum(1 for chunk in continuous if chunk.get("usage")) == 1  # continuous stats never requested
    # Non-streaming: usage always present, stream options never a failure.
    for extra in ({}, {"stream_options": {"include_usage": True}}, {"stream": False, "stream_options": "x"}):
        plain = await gateway_chat(engine_gateway, "usage", key, **extra)
        assert plain.status_code == 200, (extra, plain.text)
        assert plain.json()["usage"]["completion_tokens"] == 12


async def test_completions_endpoint(
    engine_gateway: Gateway, admin_api: AdminApi, demo_adapters: DemoAdapters, vllm_engine: RunningEngine
) -> None:
    beta = await demo_adapters.job("beta")
    _, key = await deployment_with_key(admin_api, "completer", job=beta)
    await engine_gateway.follower.sync_now()
    body = {"prompt": "The river runs", "temperature": 0, "max_tokens": 8, "min_tokens": 8}
    async with client_for(engine_gateway, "completer", key=key) as client:
        response = await client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        streamed = await client.post("/v1/completions", json={**body, "stream": True})
        assert streamed.status_code == 200, streamed.text
    async with httpx.AsyncClient(base_url=vllm_engine.url, timeout=60) as engine:
        direct = await engine.post("/v1/completions", json={**body, "model": engine_name_of(beta)})
    assert response.json()["model"] == "completer"
    assert response.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"] != ""
    chunks = [
        orjson.loads(block[len("data: ") :])
        for block in streamed.text.split("\n\n")
        if block.startswith("data: {")
    ]
    assert all(chunk["model"] == "completer" for chunk in chunks)
    assert (
        "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"])
        == (direct.json()["choices"][0]["text"])
    )
    assert streamed.text.endswith("data: [DONE]\n\n")


async def test_engine_validation_errors_reach_the_client_rewritten(
    engine_gateway: Gateway, admin_api: AdminApi, demo_adapters: DemoAdapters
) -> None:
    alpha = await demo_adapters.job("alpha")
    _, key = await deployment_with_key(admin_api, "validated", job=alpha)
    await engine_gateway.follower.sync_now()
    # Under the gateway's cap (32768) but over the engine's context (4096): the engine refuses.
    response = await gateway_chat(engine_gateway, "validated", key, max_tokens=5000, min_tokens=0)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
    assert "4096" in error["message"]
    assert engine_name_of(alpha) not in response.text and "/" not in error["message"]
    # A failing stream request is refused before any byte: a plain JSON error, not an event.
    streamed = await gateway_chat(
        engine_gateway, "validated", key, max_tokens=5000, min_tokens=0, stream=True
    )
    assert streamed.status_code == 400 and streamed.json()["error"]["code"] == "invalid_request"
