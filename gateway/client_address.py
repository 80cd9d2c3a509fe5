"""Which address a request comes from, for the key-failure throttle (DESIGN §5).

Behind a reverse proxy every request arrives from the proxy's address, so one attacker guessing a
key's secret would spend the throttle budget of everyone behind that proxy. When the peer is a
trusted proxy (``LORRY_TRUSTED_PROXIES``), the client is the rightmost ``X-Forwarded-For``
address that is not itself a trusted proxy. From any other peer the header is ignored: a client
cannot choose its own throttle bucket.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from starlette.types import Scope

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Parses ``LORRY_TRUSTED_PROXIES`` entries (addresses or CIDR ranges); raises ValueError."""
    return tuple(ipaddress.ip_network(value.strip(), strict=False) for value in values if value.strip())


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Sequence[Network]) -> bool:
    return any(ip in network for network in networks)


def client_address(scope: Scope, networks: Sequence[Network]) -> str:
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    peer_ip = _ip(peer)
    if not networks or peer_ip is None or not _trusted(peer_ip, networks):
        return peer
    values = [value for name, value in scope["headers"] if name == b"x-forwarded-for"]
    if not values:
        return peer
    hops = [hop.strip() for hop in b",".join(values).decode("latin-1").split(",")]
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:
            return peer  # a malformed chain: fall back to the proxy itself
        if not _trusted(ip, networks):
            return str(ip)
    return peer
