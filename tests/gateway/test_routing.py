"""Host and path routing, routes, methods and the error envelope (DESIGN §7) — no engine needed."""

from __future__ import annotations

import httpx
import pytest

from gateway import hosts
from gateway.app import Gateway
from gateway.errors import InvalidRequest
from lorry.db.types import utcnow
from tests.conftest import BASE_DOMAIN
from tests.gateway.conftest import MakeGateway, client_for, host_for, ops_client
from tests.gateway.seed import Seed


def assert_envelope(
    response: httpx.Response, status: int, code: str, *, request_id: bool = True
) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    if request_id:
        assert response.headers.get("x-request-id")
    return dict(error)


# -- host parsing (no I/O) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "slug"),
    [
        (b"demo.lorry.test", "demo"),
        (b"DEMO.Lorry.Test", "demo"),
        (b"demo.lorry.test:8443", "demo"),
        (b"demo.lorry.test.", "demo"),
        (b"demo.lorry.test.:80", "demo"),
        (b"a.b.lorry.test", None),
        (b"lorry.test", None),
        (b".lorry.test", None),
        (b"demo.lorry.test.evil.com", None),
        (b"demolorry.test", None),
        (b"127.0.0.1:8080", None),
        (b"[::1]:8080", None),
    ],
)
def test_host_slug(host: bytes, slug: str | None) -> None:
    target = hosts.resolve([(b"host", host)], "/v1/models", base_domain=BASE_DOMAIN, path_routing=False)
    assert target.slug == slug


def test_two_host_headers_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        hosts.resolve(
            [(b"host", b"a.lorry.test"), (b"host", b"b.lorry.test")],
            "/",
            base_domain=BASE_DOMAIN,
            path_routing=True,
        )


def test_path_mode_only_on_non_deployment_hosts() -> None:
    path = "/d/demo/v1/chat/completions"
    other = hosts.resolve([(b"host", b"127.0.0.1:8080")], path, base_domain=BASE_DOMAIN, path_routing=True)
    assert (other.slug, other.path, other.mode) == ("demo", "/v1/chat/completions", hosts.RoutingMode.PATH)
    off = hosts.resolve([(b"host", b"127.0.0.1:8080")], path, base_domain=BASE_DOMAIN, path_routing=False)
    assert off.slug is None
    on_deployment_host = hosts.resolve(
        [(b"host", b"other.lorry.test")], path, base_domain=BASE_DOMAIN, path_routing=True
    )
    assert (on_deployment_host.slug, on_deployment_host.path) == ("other", path)


# -- requests ------------------------------------------------------------------------------------


async def _deployment(seed: Seed, gw: Gateway, slug: str = "support-bot") -> tuple[str, str]:
    scope = await seed.default_scope()
    deployment_id = await seed.deployment(scope, slug)
    key = await seed.key(deployment_id)
    await gw.follower.sync_now()
    return deployment_id, key.plaintext


async def test_models_lists_exactly_the_slug(gateway: Gateway, seed: Seed) -> None:
    _, key = await _deployment(seed, gateway)
    async with client_for(gateway, "support-bot", key=key) as client:
        listed = await client.get("/v1/models")
        assert listed.status_code == 200, listed.text
        body = listed.json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["support-bot"]
        model = body["data"][0]
        assert (
            model["object"] == "model" and model["owned_by"] == "lorry" and isinstance(model["created"], int)
        )
        one = await client.get("/v1/models/support-bot")
        assert one.status_code == 200 and one.json() == model
        assert_envelope(await client.get("/v1/models/lorry/tiny-llama"), 404, "model_not_found")
        assert_envelope(await client.get("/v1/models/other"), 404, "model_not_found")


async def test_unknown_deployment_before_key_check(gateway: Gateway, seed: Seed) -> None:
    _, key = await _deployment(seed, gateway)
    for slug in ("nope", "support-bot-2"):
        async with client_for(gateway, slug, key=key) as client:
            assert_envelope(await client.get("/v1/models"), 404, "deployment_not_found")
            assert_envelope(await client.post("/v1/chat/completions", json={}), 404, "deployment_not_found")
    async with client_for(gateway, base_url="http://unrelated.example") as client:
        assert_envelope(await client.get("/v1/models"), 404, "deployment_not_found")
    assert gateway.keys.lookups == 0 and gateway.keys.rejections == 0


async def test_routes_methods_and_envelope(gateway: Gateway, seed: Seed) -> None:
    _, key = await _deployment(seed, gateway)
    async with client_for(gateway, "support-bot", key=key) as client:
        not_allowed = await client.get("/v1/chat/completions")
        assert_envelope(not_allowed, 405, "method_not_allowed")
        assert not_allowed.headers["allow"] == "POST"
        assert_envelope(await client.delete("/v1/models"), 405, "method_not_allowed")
        assert_envelope(await client.get("/v1/embeddings"), 404, "not_found")
        assert_envelope(await client.get("/"), 404, "not_found")
        for ops_path in ("/healthz", "/readyz", "/metrics"):
            assert_envelope(await client.get(ops_path), 404, "not_found")
        # Path mode on a deployment host is just an unknown route.
        assert_envelope(await client.get("/d/support-bot/v1/models"), 404, "not_found")


async def test_path_mode(make_gateway: MakeGateway, seed: Seed) -> None:
    gw = await make_gateway(update={"path_routing": True})
    _, key = await _deployment(seed, gw)
    async with client_for(gw, key=key, base_url="http://127.0.0.1:8080") as client:
        listed = await client.get("/d/support-bot/v1/models")
        assert listed.status_code == 200, listed.text
        assert [m["id"] for m in listed.json()["data"]] == ["support-bot"]
        assert_envelope(await client.get("/d/unknown/v1/models"), 404, "deployment_not_found")
        assert_envelope(await client.get("/v1/models"), 404, "deployment_not_found")
    # Off by default: the same path is not served.
    gw_off = await make_gateway()
    async with client_for(gw_off, key=key, base_url="http://127.0.0.1:8080") as client:
        assert_envelope(await client.get("/d/support-bot/v1/models"), 404, "deployment_not_found")


async def test_forwarded_host_headers_are_never_trusted(gateway: Gateway, seed: Seed) -> None:
    _, key = await _deployment(seed, gateway, "alpha-bot")
    async with client_for(gateway, base_url="http://unrelated.example", key=key) as client:
        for header in (
            {"x-forwarded-host": host_for("alpha-bot")},
            {"forwarded": f"host={host_for('alpha-bot')}"},
        ):
            assert_envelope(await client.get("/v1/models", headers=header), 404, "deployment_not_found")


async def test_request_id(gateway: Gateway, seed: Seed) -> None:
    _, key = await _deployment(seed, gateway)
    async with client_for(gateway, "support-bot", key=key) as client:
        echoed = await client.get("/v1/models", headers={"x-request-id": "abc.DEF_123-x"})
        assert echoed.headers["x-request-id"] == "abc.DEF_123-x"
        for bad in ("has space", "x" * 65, "semi;colon", ""):
            generated = await client.get("/v1/models", headers={"x-request-id": bad})
            assert generated.headers["x-request-id"] != bad
            assert len(generated.headers["x-request-id"]) == 32
        missing = await client.get("/v1/nope")
        assert len(missing.headers["x-request-id"]) == 32


async def test_disabled_and_deleted_deployments_are_not_found(gateway: Gateway, seed: Seed) -> None:
    deployment_id, key = await _deployment(seed, gateway)
    async with client_for(gateway, "support-bot", key=key) as client:
        assert (await client.get("/v1/models")).status_code == 200
        await seed.update_deployment(deployment_id, enabled=False)
        await gateway.follower.sync_now()
        assert_envelope(await client.get("/v1/models"), 404, "deployment_not_found")
        await seed.update_deployment(deployment_id, enabled=True)
        await gateway.follower.sync_now()
        assert (await client.get("/v1/models")).status_code == 200
        await seed.update_deployment(deployment_id, deleted_at=utcnow())
        await gateway.follower.sync_now()
        assert_envelope(await client.get("/v1/models"), 404, "deployment_not_found")


async def test_cors_preflight(make_gateway: MakeGateway, seed: Seed) -> None:
    gw = await make_gateway(update={"cors_origins": ["https://app.example"]})
    _, key = await _deployment(seed, gw)
    async with client_for(gw, "support-bot") as client:
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"
        refused = await client.options("/v1/chat/completions", headers={"origin": "https://evil.example"})
        assert_envelope(refused, 403, "cors_not_allowed")
        listed = await client.get(
            "/v1/models", headers={"origin": "https://app.example", "authorization": f"Bearer {key}"}
        )
        assert listed.status_code == 200
        assert listed.headers["access-control-allow-origin"] == "https://app.example"
        other = await client.get(
            "/v1/models", headers={"origin": "https://evil.example", "authorization": f"Bearer {key}"}
        )
        assert "access-control-allow-origin" not in other.headers


async def test_operations_app(gateway: Gateway) -> None:
    async with ops_client(gateway) as ops:
        assert (await ops.get("/healthz")).json() == {"status": "ok"}
        ready = await ops.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ready"
        metrics = await ops.get("/metrics")
        assert metrics.status_code == 200 and "lorry_gateway_requests_total" in metrics.text
        assert_envelope(await ops.get("/v1/models"), 404, "not_found", request_id=False)
        gateway.begin_drain()
        assert (await ops.get("/readyz")).status_code == 503
