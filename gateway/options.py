"""Tunables of one gateway process that are not (yet) public settings (DESIGN §12 names the rest).

Defaults suit production; tests shorten intervals and TTLs. A process started as
``lorry serve gateway`` reads overrides from ``LORRY_GATEWAY_*`` environment variables (see
:data:`ENV_FIELDS`), so tests and operators can tune a real gateway process without code.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gateway.key_check import KeyCheckOptions
from gateway.request_policy import Limits

Resolver = Callable[[str, int], list[str]]
"""``resolver(host, port)`` → the addresses of a DNS name (blocking; run in a worker thread)."""


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA), in the order the system gives, deduplicated."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    keys: KeyCheckOptions = field(default_factory=KeyCheckOptions)
    limits: Limits = field(default_factory=Limits)
    # Change feed: poll interval (DESIGN §6: 200 ms) and whether to LISTEN on Postgres.
    poll_interval_s: float = 0.2
    listen: bool = True
    # lastUsedAt write-behind interval.
    last_used_flush_s: float = 5.0
    # A rejected adapter load is remembered per (engine, adapter) this long.
    adapter_negative_ttl_s: float = 60.0
    # Engines tried for one request before the first byte reached the client.
    max_attempts: int = 2
    # Largest SSE event (or non-streaming body) accepted from an engine.
    max_upstream_event_bytes: int = 8 * 1024 * 1024
    max_upstream_body_bytes: int = 64 * 1024 * 1024
    # Reconcile what each engine has registered from its /v1/models at start.
    reconcile_on_start: bool = True
    # Connections kept per engine.
    max_connections_per_engine: int = 256
    # Active health checks (GET /health): every interval; an engine is ejected after
    # `unhealthy_after` consecutive failures and re-admitted after `healthy_after` successes.
    # A refused connection ejects at once (passive check).
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    unhealthy_after: int = 3
    healthy_after: int = 2
    # Engine load from GET /metrics (vllm:num_requests_running/_waiting/_waiting_by_reason). vLLM
    # renders that page on the event loop that streams its tokens: every replica reading it often
    # slows every stream, so the default is modest (this gateway's own in-flight counts are exact).
    load_interval_s: float = 2.0
    load_timeout_s: float = 5.0
    # The load bound (DESIGN §8): an engine is over it when its requests (this gateway's in-flight
    # requests, or the engine's own running + waiting count if larger) reach `engine_max_requests`,
    # when `engine_max_waiting` requests queue on it, or when a new adapter would wait behind
    # `maxLoras` adapters in flight (or behind requests the engine already defers).
    engine_max_requests: int = 64
    engine_max_waiting: int = 4
    # Engine DNS names expand to one engine per address, re-resolved this often.
    dns_refresh_s: float = 30.0
    dns_timeout_s: float = 2.0
    resolver: Resolver = system_resolver
    # After the shutdown deadline, streams get their error event; uvicorn is given this much more
    # before it cancels what is left.
    shutdown_grace_s: float = 3.0
    # A stall of the event loop this long is logged with the loop's stack (0: no watchdog).
    loop_stall_warn_s: float = 1.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewayOptions:
        """Defaults with ``LORRY_GATEWAY_*`` overrides (unknown or malformed values raise)."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        key_values: dict[str, object] = {}
        for name, (target, caster) in ENV_FIELDS.items():
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            try:
                value = caster(raw.strip())
            except ValueError as exc:
                raise ValueError(f"{name}={raw!r}: {exc}") from None
            if target.startswith("keys."):
                key_values[target[len("keys.") :]] = value
            else:
                values[target] = value
        if key_values:
            values["keys"] = dataclasses.replace(KeyCheckOptions(), **key_values)  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


ENV_FIELDS: dict[str, tuple[str, Callable[[str], object]]] = {
    "LORRY_GATEWAY_POLL_INTERVAL_S": ("poll_interval_s", float),
    "LORRY_GATEWAY_LISTEN": ("listen", _bool),
    "LORRY_GATEWAY_LAST_USED_FLUSH_S": ("last_used_flush_s", float),
    "LORRY_GATEWAY_MAX_ATTEMPTS": ("max_attempts", int),
    "LORRY_GATEWAY_HEALTH_INTERVAL_S": ("health_interval_s", float),
    "LORRY_GATEWAY_HEALTH_TIMEOUT_S": ("health_timeout_s", float),
    "LORRY_GATEWAY_UNHEALTHY_AFTER": ("unhealthy_after", int),
    "LORRY_GATEWAY_HEALTHY_AFTER": ("healthy_after", int),
    "LORRY_GATEWAY_LOAD_INTERVAL_S": ("load_interval_s", float),
    "LORRY_GATEWAY_LOAD_TIMEOUT_S": ("load_timeout_s", float),
    "LORRY_GATEWAY_ENGINE_MAX_REQUESTS": ("engine_max_requests", int),
    "LORRY_GATEWAY_ENGINE_MAX_WAITING": ("engine_max_waiting", int),
    "LORRY_GATEWAY_DNS_REFRESH_S": ("dns_refresh_s", float),
    "LORRY_GATEWAY_SHUTDOWN_GRACE_S": ("shutdown_grace_s", float),
    "LORRY_GATEWAY_LOOP_STALL_WARN_S": ("loop_stall_warn_s", float),
    "LORRY_GATEWAY_KEY_CACHE_TTL_S": ("keys.positive_ttl_s", float),
    "LORRY_GATEWAY_KEY_NEGATIVE_TTL_S": ("keys.negative_ttl_s", float),
}
