"""Real OpenAI-compatible clients against the gateway over real HTTP (uvicorn + httptools).

The ``openai`` SDK (sync, async, streaming, ``with_raw_response``) and LangChain's
``ChatOpenAI`` (invoke and stream; it sends ``max_completion_tokens``) call a deployment by base
URL and key, and get exactly what the engine answers for the same greedy request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI

from gateway.app import Gateway
from tests.engines import RunningEngine
from tests.gateway.admin_api import AdminApi
from tests.gateway.conftest import DemoAdapters, engine_name_of, host_for, http_server

pytestmark = pytest.mark.vllm

MESSAGES: list[Any] = [{"role": "user", "content": "Write about the quick fox and the garden."}]
MAX_TOKENS = 10
# min_tokens (a vLLM extra the gateway passes) keeps the tiny random model from stopping at once.
EXTRA = {"min_tokens": MAX_TOKENS}


@pytest.fixture
async def served(engine_gateway: Gateway) -> AsyncIterator[str]:
    async with http_server(engine_gateway.app) as url:
        yield url


@pytest.fixture
async def deployment(
    engine_gateway: Gateway, admin_api: AdminApi, demo_adapters: DemoAdapters
) -> tuple[str, str, str]:
    """(slug, key, engine-side adapter name) of an adapter deployment."""
    job = await demo_adapters.job("gamma")
    created = await admin_api.create_deployment("sdk-bot", job_id=job["id"])
    key = await admin_api.create_key(created["id"])
    await engine_gateway.follower.sync_now()
    return "sdk-bot", str(key["plaintext"]), engine_name_of(job)


async def engine_answer(engine: RunningEngine, model: str, **extra: Any) -> str:
    async with httpx.AsyncClient(base_url=engine.url, timeout=60) as client:
        body = {
            "model": model,
            "messages": MESSAGES,
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            **EXTRA,
            **extra,
        }
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


async def test_openai_sdk_async_sync_stream_and_raw(
    served: str, deployment: tuple[str, str, str], vllm_engine: RunningEngine
) -> None:
    slug, key, engine_model = deployment
    base_url = f"{served}/d/{slug}/v1"

    aclient = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    completion = await aclient.chat.completions.create(
        model="whatever", messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, extra_body=EXTRA
    )
    assert completion.model == slug
    expected = await engine_answer(vllm_engine, engine_model)
    assert completion.choices[0].message.content == expected != ""
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    models = await aclient.models.list()
    assert [m.id for m in models.data] == [slug]
    assert (await aclient.models.retrieve(slug)).id == slug

    stream = await aclient.chat.completions.create(
        model="x",
        messages=MESSAGES,
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body=EXTRA,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    async for chunk in stream:
        assert chunk.model == slug
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == expected
    assert usage is not None and usage.completion_tokens == completion.usage.completion_tokens

    raw = await aclient.chat.completions.with_raw_response.create(
        model="x",
        messages=MESSAGES,
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body=EXTRA,
        extra_headers={"x-request-id": "sdk-request-42"},
    )
    assert raw.headers["x-request-id"] == "sdk-request-42"
    parsed = raw.parse()
    assert parsed.id == "chatcmpl-sdk-request-42"  # the request id reached the engine
    assert parsed.choices[0].message.content == expected

    with pytest.raises(openai.AuthenticationError) as denied:
        await openai.AsyncOpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0).models.list()
    assert denied.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as missing:
        await openai.AsyncOpenAI(base_url=f"{served}/d/nope/v1", api_key=key, max_retries=0).models.list()
    assert missing.value.code == "deployment_not_found"
    await aclient.close()

    def sync_calls() -> tuple[str | None, list[str]]:
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
        try:
            done = client.chat.completions.create(
                model="x", messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, extra_body=EXTRA
            )
            streamed = [
                chunk.choices[0].delta.content or ""
                for chunk in client.chat.completions.create(
                    model="x",
                    messages=MESSAGES,
                    temperature=0,
                    max_tokens=MAX_TOKENS,
                    stream=True,
                    extra_body=EXTRA,
                )
                if chunk.choices
            ]
            return done.choices[0].message.content, streamed
        finally:
            client.close()

    sync_text, sync_stream = await asyncio.to_thread(sync_calls)
    assert sync_text == expected
    assert "".join(sync_stream) == expected


async def test_openai_sdk_in_host_mode(served: str, deployment: tuple[str, str, str]) -> None:
    slug, key, _ = deployment
    client = openai.AsyncOpenAI(
        base_url=f"{served}/v1", api_key=key, max_retries=0, default_headers={"Host": host_for(slug)}
    )
    try:
        completion = await client.chat.completions.create(
            model="x", messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS, extra_body=EXTRA
        )
        assert completion.model == slug
        assert [m.id for m in (await client.models.list()).data] == [slug]
    finally:
        await client.close()


async def test_langchain_chat_openai_invoke_and_stream(
    served: str, deployment: tuple[str, str, str], vllm_engine: RunningEngine
) -> None:
    slug, key, engine_model = deployment
    sent: list[dict[str, Any]] = []

    async def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.content))

    llm = ChatOpenAI(
        base_url=f"{served}/d/{slug}/v1",
        api_key=key,
        model="anything",
        temperature=0,
        max_tokens=MAX_TOKENS,  # sent as max_completion_tokens
        extra_body=EXTRA,
        max_retries=0,
        http_async_client=httpx.AsyncClient(event_hooks={"request": [record]}),
    )
    expected = await engine_answer(vllm_engine, engine_model)
    message = await llm.ainvoke("Write about the quick fox and the garden.")
    assert message.content == expected != ""
    assert message.response_metadata["model_name"] == slug
    assert sent[0]["max_completion_tokens"] == MAX_TOKENS and "max_tokens" not in sent[0]
    streamed = [chunk.content async for chunk in llm.astream("Write about the quick fox and the garden.")]
    assert "".join(str(part) for part in streamed) == expected
    sync_message = await asyncio.to_thread(llm.invoke, "Write about the quick fox and the garden.")
    assert sync_message.content == expected
