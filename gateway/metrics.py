"""Prometheus metrics of one gateway, in its own registry (served on the operations port).

Labels name deployments by id (``-`` when no deployment was resolved), engines by name, routes
by their fixed template, error codes by their fixed strings. Never a key, a kid, a slug taken from
a request or anything else a client controls.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

NO_DEPLOYMENT = "-"
ENGINE_LOAD_KINDS = ("running", "waiting", "deferred")
_LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lorry_gateway_requests",
            "Data-plane requests answered, by deployment, route and HTTP status.",
            ["deployment", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "lorry_gateway_request_duration_seconds",
            "Time from request to the last byte of the response.",
            ["deployment", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "lorry_gateway_time_to_first_token_seconds",
            "Time from request to the first generated content reaching the client (streams).",
            ["deployment"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "lorry_gateway_tokens",
            "Tokens reported by engines, by deployment and kind (prompt or completion).",
            ["deployment", "kind"],
            registry=registry,
        )
        self.errors = Counter(
            "lorry_gateway_errors",
            "Error answers (and stream error events), by deployment and error code.",
            ["deployment", "code"],
            registry=registry,
        )
        self.adapter_loads = Counter(
            "lorry_gateway_adapter_loads",
            "POST /v1/load_lora_adapter calls, by deployment, engine and outcome.",
            ["deployment", "engine", "outcome"],
            registry=registry,
        )
        self.key_checks = Counter(
            "lorry_gateway_key_checks",
            "Deployment-key checks by outcome: cache_hit, verified, rejected, throttled.",
            ["deployment", "outcome"],
            registry=registry,
        )
        self.key_verifications = Counter(
            "lorry_gateway_key_verifications",
            "argon2 verifications run (cache misses that reached the hash).",
            registry=registry,
        )
        self.in_flight = Gauge(
            "lorry_gateway_in_flight_requests",
            "Requests being proxied to an engine, by engine.",
            ["engine"],
            registry=registry,
        )
        self.engine_up = Gauge(
            "lorry_gateway_engine_up",
            "1 when the engine (one address of an engine entry) is enabled and healthy, else 0.",
            ["engine"],
            registry=registry,
        )
        self.engine_load = Gauge(
            "lorry_gateway_engine_load",
            "Engine load as last read from its /metrics: running, waiting and deferred requests.",
            ["engine", "kind"],
            registry=registry,
        )
        self.engine_ejections = Counter(
            "lorry_gateway_engine_ejections",
            "Engines taken out of rotation by failed health checks or refused connections.",
            ["engine"],
            registry=registry,
        )
        self._engines: set[str] = set()
        self.snapshot_age = Gauge(
            "lorry_gateway_change_feed_lag_seconds",
            "Seconds since the change feed was last read successfully.",
            registry=registry,
        )

        self.loop_lag = Histogram(
            "lorry_gateway_event_loop_lag_seconds",
            "How late a 100 ms timer on the gateway's event loop fired (a blocked loop stalls every stream).",
            buckets=_LOOP_LAG_BUCKETS,
            registry=registry,
        )

    def key_outcome(self, deployment_id: str, outcome: str) -> None:
        self.key_checks.labels(deployment_id, outcome).inc()

    def key_verified(self) -> None:
        self.key_verifications.inc()

    def engine_state(self, name: str, *, up: bool, load: tuple[float, float, float] | None = None) -> None:
        self._engines.add(name)
        self.engine_up.labels(name).set(1 if up else 0)
        if load is not None:
            for kind, value in zip(ENGINE_LOAD_KINDS, load, strict=True):
                self.engine_load.labels(name, kind).set(value)

    def forget_engines(self, keep: set[str]) -> None:
        """Drop the health and load series of engines no longer in the pool."""
        for name in self._engines - keep:
            with contextlib.suppress(KeyError):
                self.engine_up.remove(name)
            for kind in ENGINE_LOAD_KINDS:
                with contextlib.suppress(KeyError):
                    self.engine_load.remove(name, kind)
        self._engines &= keep

    def render(self) -> bytes:
        return generate_latest(self.registry)
