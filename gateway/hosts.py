"""Which deployment a request is for: its Host, or ``/d/<slug>/…`` in path mode (DESIGN §7).

Only the ``Host`` header counts: ``X-Forwarded-Host`` and ``Forwarded`` are never read, so a
client cannot reach another deployment by naming it in a header a proxy might pass along.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.errors import InvalidRequest

PATH_PREFIX = "/d/"
MAX_SLUG_LEN = 50


class RoutingMode(enum.StrEnum):
    HOST = "host"
    PATH = "path"


@dataclass(frozen=True, slots=True)
class Target:
    """A deployment slug and the path below its ``/v1`` root; slug None: no deployment named."""

    slug: str | None
    path: str
    mode: RoutingMode | None


def normalise_host(raw: str) -> str:
    """Lowercased, port and trailing dot stripped; IPv6 literals keep their brackets."""
    host = raw.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end != -1 else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def host_slug(host: str, base_domain: str) -> str | None:
    """The slug when ``host`` is exactly one label below the base domain, else None."""
    suffix = "." + base_domain.lower().rstrip(".")
    if not host.endswith(suffix):
        return None
    label = host[: -len(suffix)]
    if not label or "." in label or len(label) > MAX_SLUG_LEN:
        return None
    return label


def resolve(
    headers: Iterable[tuple[bytes, bytes]], path: str, *, base_domain: str, path_routing: bool
) -> Target:
    """Raises :class:`InvalidRequest` for more than one Host header."""
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) > 1:
        raise InvalidRequest("More than one Host header")
    host = normalise_host(hosts[0].decode("latin-1")) if hosts else ""
    slug = host_slug(host, base_domain) if host else None
    if slug is not None:
        # A deployment host serves its own routes only: `/d/<other>/…` here is just an unknown path.
        return Target(slug=slug, path=path, mode=RoutingMode.HOST)
    if path_routing and path.startswith(PATH_PREFIX):
        rest = path[len(PATH_PREFIX) :]
        slug_part, sep, tail = rest.partition("/")
        if slug_part and len(slug_part) <= MAX_SLUG_LEN:
            return Target(slug=slug_part, path=sep + tail, mode=RoutingMode.PATH)
    return Target(slug=None, path=path, mode=None)
