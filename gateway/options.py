"""Tunables of one gateway process that are not (yet) public settings (DESIGN §12 names the rest).

Defaults suit production; tests shorten intervals and TTLs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.key_check import KeyCheckOptions
from gateway.request_policy import Limits


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
