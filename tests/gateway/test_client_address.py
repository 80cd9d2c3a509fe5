"""The address the key-failure throttle counts by: the peer, or behind a trusted proxy the client
it forwarded (``LORRY_TRUSTED_PROXIES``, ``gateway/client_address.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.client_address import client_address, trusted_networks
from gateway.key_check import KeyCheckOptions
from gateway.options import GatewayOptions
from lorry.settings import LorrySettings
from tests.gateway.conftest import MakeGateway, client_for
from tests.gateway.seed import Seed
from tests.gateway.test_key_check import forged

PROXIES = trusted_networks(["10.0.0.0/8", "fd00::/8"])


def scope(peer: str, *forwarded: str) -> dict[str, Any]:
    return {"client": (peer, 40000), "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded]}


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", ("198.51.100.1",), "203.0.113.9"),  # not a proxy: the header is ignored
        ("10.0.0.7", (), "10.0.0.7"),  # a proxy that forwarded nothing
        ("10.0.0.7", ("198.51.100.1",), "198.51.100.1"),
        ("10.0.0.7", ("1.2.3.4, 198.51.100.1",), "198.51.100.1"),  # the client chose 1.2.3.4: ignored
        ("10.0.0.7", ("198.51.100.1, 10.0.0.8",), "198.51.100.1"),  # two proxies in a row
        ("10.0.0.7", ("198.51.100.1", "10.0.0.8"), "198.51.100.1"),  # the header twice
        ("10.0.0.7", ("10.0.0.8",), "10.0.0.7"),  # only proxies
        ("10.0.0.7", ("not-an-address",), "10.0.0.7"),  # malformed: the proxy itself
        ("fd00::1", ("2001:db8::5",), "2001:db8::5"),
    ],
)
def test_client_address(peer: str, forwarded: tuple[str, ...], expected: str) -> None:
    assert client_address(scope(peer, *forwarded), PROXIES) == expected


def test_without_trusted_proxies_the_header_never_counts() -> None:
    assert client_address(scope("10.0.0.7", "198.51.100.1"), ()) == "10.0.0.7"


def test_a_malformed_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="not an IP address or CIDR range"):
        LorrySettings(trusted_proxies=["10.0.0.0/8", "proxy.internal"])


async def test_behind_a_trusted_proxy_an_attacker_throttles_only_itself(
    make_gateway: MakeGateway, seed: Seed
) -> None:
    limit = 3
    gw = await make_gateway(
        options=GatewayOptions(keys=KeyCheckOptions(throttle_failures=limit)),
        update={"trusted_proxies": ["10.0.0.0/8"]},
    )
    scope_ids = await seed.default_scope()
    deployment_id = await seed.deployment(scope_ids, "proxied")
    key = await seed.key(deployment_id)
    await gw.follower.sync_now()

    def wrong() -> dict[str, str]:  # a new wrong secret each time (a repeated one is cached)
        return {"authorization": f"Bearer {forged(key.kid)}"}

    def via_proxy(client: str) -> dict[str, str]:
        return {**wrong(), "x-forwarded-for": client}

    async with client_for(gw, "proxied", address="10.0.0.7") as proxy:
        for _ in range(20):  # one attacker behind the proxy
            assert (await proxy.get("/v1/models", headers=via_proxy("198.51.100.66"))).status_code == 401
        assert gw.keys.verifications == limit
        # Another client behind the same proxy still gets its attempts checked (not throttled)...
        assert (await proxy.get("/v1/models", headers=via_proxy("198.51.100.7"))).status_code == 401
        assert gw.keys.verifications == limit + 1
        # ...and the owner, whose key never verified on this gateway yet, gets in.
        owner = {"authorization": f"Bearer {key.plaintext}", "x-forwarded-for": "198.51.100.7"}
        assert (await proxy.get("/v1/models", headers=owner)).status_code == 200

    # A client that is not a proxy cannot pick its bucket with the header: it is throttled by its
    # own address whatever it claims.
    async with client_for(gw, "proxied", address="203.0.113.9") as direct:
        before = gw.keys.verifications
        for i in range(10):
            claimed = {**wrong(), "x-forwarded-for": f"198.51.100.{100 + i}"}
            assert (await direct.get("/v1/models", headers=claimed)).status_code == 401
        assert gw.keys.verifications - before == limit
