"""The engines this gateway talks to: one ``httpx.AsyncClient`` per engine address and its state.

The pool follows the snapshot's engine list (DESIGN §8). An engine whose URL names a host (not an
IP literal) expands to one internal engine per address that name resolves to (the addresses come
from :class:`gateway.dns.AddressBook`), so an engine entry for a headless Service or a
``compose --scale`` name reaches every vLLM process behind it, never one load-balanced address.

An engine whose address, key or adapter root changed gets a fresh state (its registered adapters
are unknown again); an unchanged one keeps its state. Retired clients are closed once their last
request is done. Each state carries what routing needs: health (active and passive checks, see
:mod:`gateway.health`), this gateway's in-flight requests and adapters, and the load the engine
itself reports on ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx

from gateway.snapshot import EngineView

KEEPALIVE_EXPIRY_S = 2.0


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    connect_s: float
    first_byte_s: float
    idle_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What the engine reports on ``/metrics`` (summed over its engine cores)."""

    running: float = 0.0
    waiting: float = 0.0
    deferred: float = 0.0
    # Adapters with requests in flight on the engine (newest ``vllm:lora_requests_info`` series).
    lora_adapters: frozenset[str] = frozenset()
    max_lora: int | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of an engine entry."""

    key: str  # stable id: the engine id, or "<engine id>@<address>" for an expanded DNS name
    label: str  # for logs and metrics: the engine name, or "<name>@<address>"
    url: str
    host_header: str | None = None


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def dns_name(view: EngineView) -> tuple[str, int] | None:
    """(host, port) when ``view``'s URL names a host that expands to one engine per address."""
    parts = urlsplit(view.url)
    host = parts.hostname
    if host is None or _is_ip_literal(host) or parts.scheme != "http":
        # https engines keep their name: the certificate names the host, not its addresses.
        return None
    return host, parts.port or 80


def endpoints(view: EngineView, addresses: Mapping[tuple[str, int], Sequence[str]]) -> list[Endpoint]:
    name = dns_name(view)
    found = addresses.get(name) if name is not None else None
    if not found:
        return [Endpoint(key=view.id, label=view.name, url=view.url)]
    parts = urlsplit(view.url)
    result = []
    for address in found:
        host = f"[{address}]" if ":" in address else address
        netloc = f"{host}:{parts.port}" if parts.port else host
        result.append(
            Endpoint(
                key=f"{view.id}@{address}",
                label=f"{view.name}@{address}",
                url=urlunsplit((parts.scheme, netloc, parts.path, "", "")),
                host_header=parts.netloc,
            )
        )
    return result


@dataclass(eq=False)
class EngineState:
    view: EngineView
    client: httpx.AsyncClient
    endpoint: Endpoint = field(default_factory=lambda: Endpoint("", "", ""))
    registered: set[str] = field(default_factory=set)
    in_flight: int = 0
    # Adapters (engine-side names) with requests in flight from this gateway, and how many.
    adapters_in_flight: dict[str, int] = field(default_factory=dict)
    healthy: bool = True
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    ejections: int = 0
    load: EngineLoad = field(default_factory=EngineLoad)
    load_known: bool = False
    load_at: float = 0.0  # time.monotonic() of the last successful /metrics read
    # time.monotonic() when the engine last sent this gateway an answer's bytes: proof of life a
    # health check that times out on a busy engine cannot outweigh.
    answered_at: float = 0.0
    reconciled: bool = False

    def __post_init__(self) -> None:
        if not self.endpoint.key:
            self.endpoint = Endpoint(key=self.view.id, label=self.view.name, url=self.view.url)

    @property
    def key(self) -> str:
        """Stable identity for rendezvous hashing (the same on every gateway replica)."""
        return self.endpoint.key

    @property
    def name(self) -> str:
        return self.endpoint.label

    @property
    def routable(self) -> bool:
        return self.healthy and self.view.enabled

    @property
    def identity(self) -> tuple[str, str | None, str | None, str]:
        return (self.endpoint.url, self.endpoint.host_header, self.view.api_key, self.view.adapter_root)

    # -- load ---------------------------------------------------------------------------------

    def requests_load(self) -> float:
        """Requests on the engine: ours, or the engine's own count (all gateways) when larger."""
        engine_side = self.load.running + self.load.waiting if self.load_known else 0.0
        return max(float(self.in_flight), engine_side)

    def adapters_busy(self) -> set[str]:
        busy = {name for name, count in self.adapters_in_flight.items() if count > 0}
        if self.load_known:
            busy |= self.load.lora_adapters
        return busy

    def acquire(self, adapter: str | None) -> None:
        self.in_flight += 1
        if adapter is not None:
            self.adapters_in_flight[adapter] = self.adapters_in_flight.get(adapter, 0) + 1

    def release(self, adapter: str | None) -> None:
        self.in_flight -= 1
        if adapter is not None:
            left = self.adapters_in_flight.get(adapter, 0) - 1
            if left > 0:
                self.adapters_in_flight[adapter] = left
            else:
                self.adapters_in_flight.pop(adapter, None)


def _identity(view: EngineView, endpoint: Endpoint) -> tuple[str, str | None, str | None, str]:
    return (endpoint.url, endpoint.host_header, view.api_key, view.adapter_root)


class EnginePool:
    def __init__(self, timeouts: UpstreamTimeouts, *, max_connections: int = 256) -> None:
        self.timeouts = timeouts
        self._max_connections = max_connections
        self._states: dict[str, EngineState] = {}
        self._retired: list[EngineState] = []

    def _client(self, view: EngineView, endpoint: Endpoint) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {view.api_key}"} if view.api_key else {}
        if endpoint.host_header is not None:
            headers["host"] = endpoint.host_header
        return httpx.AsyncClient(
            base_url=endpoint.url,
            headers=headers,
            # Read timeouts are applied per phase by the proxy (first byte, idle, total).
            timeout=httpx.Timeout(
                connect=self.timeouts.connect_s,
                read=None,
                write=self.timeouts.idle_s,
                pool=self.timeouts.connect_s,
            ),
            limits=httpx.Limits(
                max_connections=self._max_connections,
                max_keepalive_connections=min(64, self._max_connections),
                # Below the engine's own idle timeout (vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s):
                # at equal timeouts the engine closes a connection just as it is reused.
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
            trust_env=False,  # never an HTTP(S)_PROXY from the environment between gateway and engine
            follow_redirects=False,
        )

    def sync(
        self, views: Iterable[EngineView], addresses: Mapping[tuple[str, int], Sequence[str]] | None = None
    ) -> list[EngineState]:
        """Follow the snapshot; returns the states that are new (to reconcile and probe)."""
        fresh: dict[str, EngineState] = {}
        created: list[EngineState] = []
        for view in views:
            for endpoint in endpoints(view, addresses or {}):
                state = self._states.get(endpoint.key)
                if state is not None and state.identity == _identity(view, endpoint):
                    state.view = view
                    state.endpoint = endpoint
                else:
                    if state is not None:
                        self._retired.append(state)
                    state = EngineState(view=view, client=self._client(view, endpoint), endpoint=endpoint)
                    created.append(state)
                fresh[endpoint.key] = state
        for key, state in self._states.items():
            if key not in fresh:
                self._retired.append(state)
        self._states = fresh
        self._close_idle_retired()
        return created

    def _close_idle_retired(self) -> None:
        keep = []
        for state in self._retired:
            if state.in_flight == 0:
                asyncio.get_running_loop().create_task(state.client.aclose())
            else:
                keep.append(state)
        self._retired = keep

    def released(self, state: EngineState) -> None:
        if self._retired and state in self._retired and state.in_flight == 0:
            self._close_idle_retired()

    def get(self, key: str) -> EngineState | None:
        return self._states.get(key)

    def states(self) -> list[EngineState]:
        return list(self._states.values())

    async def aclose(self) -> None:
        for state in [*self._states.values(), *self._retired]:
            with contextlib.suppress(Exception):
                await state.client.aclose()
        self._states.clear()
        self._retired.clear()
