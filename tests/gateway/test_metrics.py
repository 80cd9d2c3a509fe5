"""Gateway metrics on the operations port: exact counter deltas, no key or kid in any label."""

from __future__ import annotations

import uuid
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from tests.engines import RunningEngine
from tests.gateway.admin_api import AdminApi
from tests.gateway.conftest import DemoAdapters, client_for, engine_name_of, ops_client

pytestmark = pytest.mark.vllm

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
ALLOWED_LABELS = {"deployment", "route", "status", "kind", "code", "engine", "outcome", "le"}
BODY = {"messages": [{"role": "user", "content": "count the stones"}], "max_tokens": 6, "min_tokens": 6}


async def scrape(gw: Gateway) -> tuple[Samples, str]:
    async with ops_client(gw) as ops:
        response = await ops.get("/metrics")
    assert response.status_code == 200
    samples: Samples = defaultdict(float)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, response.text


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_metric_deltas_and_labels(
    engine_gateway: Gateway, admin_api: AdminApi, demo_adapters: DemoAdapters, vllm_engine: RunningEngine
) -> None:
    job = await demo_adapters.job("alpha", variant=uuid.uuid4().hex)
    deployment = await admin_api.create_deployment("metered", job_id=job["id"])
    key = await admin_api.create_key(deployment["id"])
    plaintext = str(key["plaintext"])
    kid = plaintext.split("_")[1]
    dep = str(deployment["id"])
    await engine_gateway.follower.sync_now()
    before, _ = await scrape(engine_gateway)

    prompt_tokens = 0
    async with client_for(engine_gateway, "metered", key=plaintext) as client:
        for _ in range(3):
            response = await client.post("/v1/chat/completions", json=BODY)
            assert response.status_code == 200, response.text
            prompt_tokens = response.json()["usage"]["prompt_tokens"]
        streamed = await client.post(
            "/v1/chat/completions", json={**BODY, "stream": True, "stream_options": {"include_usage": True}}
        )
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        quiet = await client.post("/v1/chat/completions", json={**BODY, "stream": True})
        assert quiet.status_code == 200 and '"usage"' not in quiet.text
        over = await client.post("/v1/chat/completions", json={**BODY, "n": 10_000})
        assert over.status_code == 400
        for wrong in ("sk-wrong", f"{plaintext[:-1]}0", "lorry_nope"):
            denied = await client.post(
                "/v1/chat/completions", json=BODY, headers={"authorization": f"Bearer {wrong}"}
            )
            assert denied.status_code == 401
    for slug in ("nobody", "nothing"):
        async with client_for(engine_gateway, slug, key=plaintext) as client:
            assert (await client.post("/v1/chat/completions", json=BODY)).status_code == 404

    after, text = await scrape(engine_gateway)
    requests = "lorry_gateway_requests_total"
    assert delta(before, after, requests, deployment=dep, route="chat", status="200") == 5
    assert delta(before, after, requests, deployment=dep, route="chat", status="400") == 1
    assert delta(before, after, requests, deployment=dep, route="chat", status="401") == 3
    assert delta(before, after, requests, deployment="-", route="unknown", status="404") == 2
    errors = "lorry_gateway_errors_total"
    assert delta(before, after, errors, deployment=dep, code="invalid_request") == 1
    assert delta(before, after, errors, deployment=dep, code="invalid_api_key") == 3
    assert delta(before, after, errors, deployment="-", code="deployment_not_found") == 2
    tokens = "lorry_gateway_tokens_total"
    assert delta(before, after, tokens, deployment=dep, kind="completion") == 5 * 6
    assert delta(before, after, tokens, deployment=dep, kind="prompt") == 5 * prompt_tokens
    assert delta(before, after, "lorry_gateway_time_to_first_token_seconds_count", deployment=dep) == 2
    assert (
        delta(before, after, "lorry_gateway_request_duration_seconds_count", deployment=dep, route="chat")
        == 9
    )
    checks = "lorry_gateway_key_checks_total"
    assert delta(before, after, checks, deployment=dep, outcome="verified") == 1
    assert delta(before, after, checks, deployment=dep, outcome="cache_hit") == 5
    assert delta(before, after, checks, deployment=dep, outcome="rejected") == 3
    assert delta(before, after, "lorry_gateway_key_verifications_total") == 1
    loads = "lorry_gateway_adapter_loads_total"
    assert delta(before, after, loads, deployment=dep, engine="shared", outcome="loaded") == 1
    assert vllm_engine.load_count(engine_name_of(job)) == 1
    # The loop's watchdog ticks every 100 ms while the gateway runs.
    assert delta(before, after, "lorry_gateway_event_loop_lag_seconds_count") >= 1

    for (name, labels), _value in after.items():
        assert {label for label, _ in labels} <= ALLOWED_LABELS, name
        for label, value in labels:
            assert kid not in value and "lorry_" not in value, (name, label, value)
            if label == "deployment":
                assert value in {"-", *engine_gateway.snapshot.by_id}, value
    assert kid not in text and plaintext not in text
