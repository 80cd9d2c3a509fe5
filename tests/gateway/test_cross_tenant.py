"""Cross-tenant matrix (DESIGN §5, §7): only a key on its own deployment gets tokens.

Three deployments in two organisations (one ``authMode: none``) plus a deleted one, every key
against every deployment, in host and path mode, with ``Authorization`` and ``x-api-key``.
"""

from __future__ import annotations

import itertools

import httpx
import pytest

from gateway.app import Gateway
from lorry.db.types import utcnow
from tests.engines import RunningEngine
from tests.gateway.conftest import client_for, host_for
from tests.gateway.seed import Seed

pytestmark = pytest.mark.vllm

BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}


async def test_cross_tenant_matrix(engine_gateway: Gateway, seed: Seed, vllm_engine: RunningEngine) -> None:
    default = await seed.default_scope()
    other_org = await seed.new_project("acme")
    deployments = {
        "tenant-a": await seed.deployment(default, "tenant-a"),
        "tenant-b": await seed.deployment(other_org, "tenant-b"),
        "tenant-open": await seed.deployment(other_org, "tenant-open", auth_mode="none"),
        "tenant-gone": await seed.deployment(default, "tenant-gone"),
    }
    keys = {slug: (await seed.key(deployment_id)).plaintext for slug, deployment_id in deployments.items()}
    await seed.update_deployment(deployments["tenant-gone"], deleted_at=utcnow())
    await engine_gateway.follower.sync_now()

    results: dict[tuple[str, str, str, str], int] = {}
    for slug, key_owner, mode, header in itertools.product(
        deployments, keys, ("host", "path"), ("authorization", "x-api-key")
    ):
        value = f"Bearer {keys[key_owner]}" if header == "authorization" else keys[key_owner]
        if mode == "host":
            client = client_for(engine_gateway, slug)
            path = "/v1/chat/completions"
        else:
            client = client_for(engine_gateway, base_url="http://127.0.0.1:8080")
            path = f"/d/{slug}/v1/chat/completions"
        async with client:
            response = await client.post(path, json=BODY, headers={header: value})
        results[(slug, key_owner, mode, header)] = response.status_code
        if slug == "tenant-gone":
            expected = 404
        elif slug == "tenant-open" or key_owner == slug:
            expected = 200
        else:
            expected = 401
        assert response.status_code == expected, (slug, key_owner, mode, header, response.text)
        if expected == 200:
            assert response.json()["model"] == slug
        else:
            code = "deployment_not_found" if expected == 404 else "invalid_api_key"
            assert response.json()["error"]["code"] == code

    # Without any credential: only the open deployment answers.
    for slug in deployments:
        async with client_for(engine_gateway, slug) as client:
            response = await client.post("/v1/chat/completions", json=BODY)
        assert response.status_code == {"tenant-open": 200, "tenant-gone": 404}.get(slug, 401)
    successes = sum(1 for status in results.values() if status == 200)
    print(f"\ncross-tenant matrix: {len(results)} requests, {successes} served, host {host_for('tenant-a')}")
    assert successes == 2 * 2 * 2 + 4 * 2 * 2  # tenant-a and tenant-b own keys; tenant-open any key


async def test_forwarded_headers_never_reroute_a_key(engine_gateway: Gateway, seed: Seed) -> None:
    scope = await seed.default_scope()
    a = await seed.deployment(scope, "fwd-a")
    await seed.deployment(scope, "fwd-b")
    key_a = (await seed.key(a)).plaintext
    await engine_gateway.follower.sync_now()
    # A request for fwd-b naming fwd-a in forwarded headers is still a request for fwd-b.
    async with client_for(engine_gateway, "fwd-b", key=key_a) as client:
        for headers in ({"x-forwarded-host": host_for("fwd-a")}, {"forwarded": f"host={host_for('fwd-a')}"}):
            response = await client.post("/v1/chat/completions", json=BODY, headers=headers)
            assert response.status_code == 401, response.text
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=engine_gateway.app), base_url=f"http://{host_for('fwd-a')}"
    ) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=BODY,
            headers={"authorization": f"Bearer {key_a}", "x-forwarded-host": host_for("fwd-b")},
        )
        assert response.status_code == 200 and response.json()["model"] == "fwd-a"
