"""Engine health and load (DESIGN §8).

- Active checks: ``GET /health`` on every engine each ``health_interval_s``. An engine is ejected
  after ``unhealthy_after`` consecutive failures and re-admitted after ``healthy_after``
  consecutive successes; on re-admission what it has registered is read again from its
  ``/v1/models`` (it may have restarted and forgotten every adapter).
- Passive checks: a refused connection (or a connect timeout) ejects the engine at once; any other
  transport failure asks for an immediate active check.
- Load: ``GET /metrics`` on every healthy engine each ``load_interval_s``: running and waiting
  requests, requests deferred behind the LoRA budget, and the adapters in flight (the newest
  ``vllm:lora_requests_info`` series, reference/vllm.md §4).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from gateway.engines import EngineLoad, EnginePool, EngineState

logger = logging.getLogger("lorry.gateway.health")

_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
_WANTED = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:num_requests_waiting_by_reason",
    "vllm:lora_requests_info",
)
MAX_METRICS_BYTES = 4 * 1024 * 1024


def parse_engine_load(text: str) -> EngineLoad:
    """The routing-relevant gauges of a vLLM ``/metrics`` page (summed over engine cores)."""
    running = waiting = deferred = 0.0
    newest_lora: tuple[float, dict[str, str]] | None = None
    for line in text.splitlines():
        if not line.startswith(_WANTED):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        name = match["name"]
        labels = dict(_LABEL.findall(match["labels"] or ""))
        if name == "vllm:num_requests_running":
            running += value
        elif name == "vllm:num_requests_waiting":
            waiting += value
        elif name == "vllm:num_requests_waiting_by_reason":
            if labels.get("reason") == "deferred":
                deferred += value
        elif name == "vllm:lora_requests_info" and (newest_lora is None or value > newest_lora[0]):
            # Every label combination ever seen stays as a series; the value is a timestamp.
            newest_lora = (value, labels)
    adapters: frozenset[str] = frozenset()
    max_lora: int | None = None
    # The gauge is only updated while the engine steps: an idle engine's newest series still
    # lists the adapters of its last requests. Nothing runs or waits → no adapter is in flight.
    if newest_lora is not None:
        labels = newest_lora[1]
        with contextlib.suppress(ValueError):
            max_lora = int(labels.get("max_lora", ""))
        if running + waiting > 0:
            names = f"{labels.get('running_lora_adapters', '')},{labels.get('waiting_lora_adapters', '')}"
            adapters = frozenset(part.strip() for part in names.split(",") if part.strip())
    return EngineLoad(
        running=running, waiting=waiting, deferred=deferred, lora_adapters=adapters, max_lora=max_lora
    )


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    interval_s: float = 2.0
    timeout_s: float = 2.0
    unhealthy_after: int = 3
    healthy_after: int = 2
    load_interval_s: float = 2.0
    # Reading /metrics may be slow on a busy engine: its own timeout, and a reading stays in use
    # until it is this old (a failed read does not erase it at once).
    load_timeout_s: float = 5.0
    load_max_age_s: float = 10.0


StateHook = Callable[[EngineState], None]


class HealthMonitor:
    def __init__(
        self,
        pool: EnginePool,
        policy: HealthPolicy,
        *,
        on_eject: StateHook | None = None,
        on_readmit: StateHook | None = None,
        on_load: StateHook | None = None,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self._on_eject = on_eject
        self._on_readmit = on_readmit
        self._on_load = on_load
        self._tasks: list[asyncio.Task[None]] = []
        self._probing: dict[int, asyncio.Task[None]] = {}
        self.checks = 0
        self.scrapes = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._health_loop(), name="lorry-engine-health"),
            asyncio.create_task(self._load_loop(), name="lorry-engine-load"),
        ]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._probing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._probing.clear()

    # -- passive ------------------------------------------------------------------------------

    def eject(self, state: EngineState, reason: str) -> None:
        """The engine refused a connection: out of rotation now, back after enough health checks."""
        state.consecutive_successes = 0
        state.consecutive_failures = max(state.consecutive_failures, self.policy.unhealthy_after)
        if state.healthy:
            self._set_unhealthy(state, reason)

    def suspect(self, state: EngineState) -> None:
        """A transport failure that is not a refused connection: check this engine now."""
        self.probe(state)

    def probe(self, state: EngineState) -> None:
        """One active check now (at most one at a time per engine)."""
        key = id(state)
        if key in self._probing or not self._tasks:
            return
        task = asyncio.create_task(self.check(state), name=f"lorry-engine-probe-{state.name}")
        self._probing[key] = task
        task.add_done_callback(functools.partial(self._probe_done, key))

    def _probe_done(self, key: int, _task: asyncio.Task[None]) -> None:
        self._probing.pop(key, None)

    # -- active -------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval_s)
            states = self.pool.states()
            if states:
                await asyncio.gather(*(self.check(state) for state in states), return_exceptions=True)

    async def check(self, state: EngineState) -> None:
        self.checks += 1
        try:
            response = await state.client.get("/health", timeout=self.policy.timeout_s)
            ok = response.status_code == 200
            await response.aclose()
        except httpx.TimeoutException:
            # vLLM answers /health on the event loop that streams its tokens: a busy engine can
            # be slow to answer. Slow is not dead while it is sending this gateway answers.
            if time.monotonic() - state.answered_at < self.policy.timeout_s + self.policy.interval_s:
                return
            ok = False
        except (httpx.HTTPError, OSError):
            ok = False
        if ok:
            self._success(state)
        else:
            self._failure(state)

    def _success(self, state: EngineState) -> None:
        state.consecutive_failures = 0
        state.consecutive_successes += 1
        if not state.healthy and state.consecutive_successes >= self.policy.healthy_after:
            state.healthy = True
            logger.info("engine %s is healthy again: re-admitted", state.name)
            if self._on_readmit is not None:
                self._on_readmit(state)

    def _failure(self, state: EngineState) -> None:
        state.consecutive_successes = 0
        state.consecutive_failures += 1
        if state.healthy and state.consecutive_failures >= self.policy.unhealthy_after:
            self._set_unhealthy(state, f"{state.consecutive_failures} failed health checks")

    def _set_unhealthy(self, state: EngineState, reason: str) -> None:
        state.healthy = False
        state.ejections += 1
        state.load_known = False
        logger.warning("engine %s ejected: %s", state.name, reason)
        if self._on_eject is not None:
            self._on_eject(state)

    # -- load ---------------------------------------------------------------------------------

    async def _load_loop(self) -> None:
        while True:
            states = [state for state in self.pool.states() if state.healthy and state.view.enabled]
            if states:
                await asyncio.gather(*(self.scrape(state) for state in states), return_exceptions=True)
            await asyncio.sleep(self.policy.load_interval_s)

    async def scrape(self, state: EngineState) -> None:
        self.scrapes += 1
        try:
            response = await state.client.get("/metrics", timeout=self.policy.load_timeout_s)
            ok = response.status_code == 200 and len(response.content) <= MAX_METRICS_BYTES
            text = response.text if ok else ""
        except (httpx.HTTPError, OSError):
            ok, text = False, ""
        if not ok:
            if time.monotonic() - state.load_at > self.policy.load_max_age_s:
                state.load_known = False
            return
        state.load = parse_engine_load(text)
        state.load_at = time.monotonic()
        state.load_known = True
        if self._on_load is not None:
            self._on_load(state)
