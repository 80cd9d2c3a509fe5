"""The engines this gateway talks to: one ``httpx.AsyncClient`` per engine and what it has loaded.

The pool follows the snapshot's engine list: an engine whose address, key or adapter root changed
gets a fresh state (its registered adapters are unknown again); an unchanged one keeps its state.
Retired clients are closed once their last request is done. Health and load (issue 5) live on
:class:`EngineState` too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx

from gateway.snapshot import EngineView


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    connect_s: float
    first_byte_s: float
    idle_s: float
    total_s: float


@dataclass(eq=False)
class EngineState:
    view: EngineView
    client: httpx.AsyncClient
    registered: set[str] = field(default_factory=set)
    in_flight: int = 0
    healthy: bool = True
    reconciled: bool = False

    @property
    def identity(self) -> tuple[str, str | None, str]:
        return (self.view.url, self.view.api_key, self.view.adapter_root)


def _identity(view: EngineView) -> tuple[str, str | None, str]:
    return (view.url, view.api_key, view.adapter_root)


class EnginePool:
    def __init__(self, timeouts: UpstreamTimeouts, *, max_connections: int = 256) -> None:
        self.timeouts = timeouts
        self._max_connections = max_connections
        self._states: dict[str, EngineState] = {}
        self._retired: list[EngineState] = []

    def _client(self, view: EngineView) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {view.api_key}"} if view.api_key else {}
        return httpx.AsyncClient(
            base_url=view.url,
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
            ),
            trust_env=False,  # never an HTTP(S)_PROXY from the environment between gateway and engine
            follow_redirects=False,
        )

    def sync(self, views: Iterable[EngineView]) -> list[EngineState]:
        """Follow the snapshot; returns the states that are new (to reconcile)."""
        fresh: dict[str, EngineState] = {}
        created: list[EngineState] = []
        for view in views:
            state = self._states.get(view.id)
            if state is not None and state.identity == _identity(view):
                state.view = view
            else:
                if state is not None:
                    self._retired.append(state)
                state = EngineState(view=view, client=self._client(view))
                created.append(state)
            fresh[view.id] = state
        for engine_id, state in self._states.items():
            if engine_id not in fresh:
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

    def get(self, engine_id: str) -> EngineState | None:
        return self._states.get(engine_id)

    def states(self) -> list[EngineState]:
        return list(self._states.values())

    async def aclose(self) -> None:
        for state in [*self._states.values(), *self._retired]:
            with contextlib.suppress(Exception):
                await state.client.aclose()
        self._states.clear()
        self._retired.clear()
