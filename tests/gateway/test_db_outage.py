"""The database goes away under a running gateway, through a TCP proxy the test cuts (DESIGN §6).

Cached valid keys keep working until their hard TTL; a key not in the cache gets 503 with
``retry-after``; after the TTL both get 503; when the database returns, both work again without
any help, and changes made meanwhile are picked up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx
import pytest

from gateway.app import Gateway
from gateway.key_check import KeyCheckOptions
from lorry.settings import LorrySettings
from tests.gateway.conftest import FAST_OPTIONS, MakeGateway, client_for, ops_client
from tests.gateway.figures import report
from tests.gateway.seed import Seed
from tests.gateway.tcp_proxy import tcp_proxy_for

HARD_TTL_S = 2.0


@pytest.fixture
def backend() -> str:
    return "postgres"  # a server to cut; SQLite is a file in the gateway's own process


async def models(gw: Gateway, slug: str, key: str) -> httpx.Response:
    async with client_for(gw, slug, key=key) as client:
        return await client.get("/v1/models")


async def status(gw: Gateway, slug: str, key: str) -> int:
    return (await models(gw, slug, key)).status_code


async def until_status(gw: Gateway, slug: str, keys: list[str], expected: int, timeout: float) -> float:
    started = time.monotonic()
    while True:
        if all([await status(gw, slug, key) == expected for key in keys]):
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"not {expected} within {timeout} s"
        await asyncio.sleep(0.02)


async def test_database_cut_and_return(
    make_gateway: MakeGateway, seed: Seed, settings: LorrySettings
) -> None:
    options = dataclasses.replace(FAST_OPTIONS, keys=KeyCheckOptions(positive_ttl_s=HARD_TTL_S))
    async with tcp_proxy_for(settings.database_url) as (proxy, proxied):
        gw = await make_gateway(options=options, update={"database_url": proxied}, in_process=False)
        scope = await seed.default_scope()
        deployment_id = await seed.deployment(scope, "steady")
        cached, uncached = await seed.key(deployment_id), await seed.key(deployment_id)
        await gw.follower.sync_now()
        assert await status(gw, "steady", cached.plaintext) == 200
        cached_at = time.monotonic()
        lookups = gw.keys.lookups

        await proxy.cut()
        cut_at = time.monotonic()
        assert await status(gw, "steady", cached.plaintext) == 200
        started = time.monotonic()
        refused = await models(gw, "steady", uncached.plaintext)
        miss_ms = (time.monotonic() - started) * 1000
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "auth_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
        assert gw.keys.lookups == lookups + 1
        await asyncio.sleep(0.5)  # a poll or two fail meanwhile
        async with ops_client(gw) as ops:
            ready = await ops.get("/readyz")
        assert ready.status_code == 200 and ready.json()["database"] == "unreachable"

        # The cached grant lives until its hard TTL, not longer.
        remaining = HARD_TTL_S - (time.monotonic() - cached_at)
        if remaining > 0.2:
            assert await status(gw, "steady", cached.plaintext) == 200
        expired_after = await until_status(gw, "steady", [cached.plaintext], 503, timeout=HARD_TTL_S + 2)
        expired_at = time.monotonic() - cached_at
        assert expired_at >= HARD_TTL_S
        assert await status(gw, "steady", uncached.plaintext) == 503

        # Meanwhile the control plane (still connected) adds a deployment.
        other_id = await seed.deployment(scope, "added-while-cut")
        other_key = await seed.key(other_id)

        await proxy.restore()
        restored_at = time.monotonic()
        recovered = await until_status(gw, "steady", [cached.plaintext, uncached.plaintext], 200, timeout=10)
        caught_up = await until_status(gw, "added-while-cut", [other_key.plaintext], 200, timeout=10)
    report(
        "test_database_cut_and_return",
        f"\ndatabase cut: uncached key answered 503 in {miss_ms:.0f} ms; cached key worked until "
        f"{expired_at:.2f} s after caching (hard TTL {HARD_TTL_S} s, polled {expired_after * 1000:.0f} ms); "
        f"outage {restored_at - cut_at:.1f} s; recovered {recovered * 1000:.0f} ms after the database "
        f"returned, change made during the outage served {(recovered + caught_up) * 1000:.0f} ms after",
    )
    assert proxy.accepted >= 2  # the gateway's connections went through the proxy
