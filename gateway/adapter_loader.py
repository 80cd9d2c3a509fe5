"""Hot-loading adapters into engines (DESIGN §8, reference/vllm.md §1.3).

- Engine-side names are content ids ``lora-<digest[:16]>`` and ``lora_path`` is
  ``<engine adapterRoot>/<digest>``: two deployments of one adapter share one load, and a name is
  never reused for other weights.
- At most one ``POST /v1/load_lora_adapter`` per (engine, adapter) is in flight on this process;
  a burst of first requests waits for that one call. vLLM's 400 "already been loaded" is success
  (another gateway won the race).
- A rejected adapter (vLLM 400/404/500) is remembered per (engine, adapter) for a while and
  answered 502 ``adapter_load_failed`` with ``x-should-retry: false``; no further load is tried
  until the entry expires or the engine changes.
- What each engine has registered is tracked here, seeded from its ``/v1/models`` at start.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

import httpx
import orjson

from gateway.engines import EngineState
from gateway.errors import AdapterLoadFailed, EngineUnreachable, UpstreamUnavailable
from gateway.responses import engine_error_message
from gateway.snapshot import ADAPTER_NAME_PREFIX, AdapterRef
from gateway.upstream import connection_refused
from lorry.ttl_cache import TTLCache

logger = logging.getLogger("lorry.gateway.adapters")

LoadHook = Callable[[str, str, str], None]  # (deployment id, engine name, outcome)


class AdapterLoader:
    def __init__(
        self, *, load_timeout_s: float, negative_ttl_s: float = 60.0, on_load: LoadHook | None = None
    ) -> None:
        self._load_timeout_s = load_timeout_s
        self._rejected: TTLCache[tuple[str, str], str] = TTLCache(max_entries=10_000, ttl_s=negative_ttl_s)
        self._inflight: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._on_load = on_load
        self.load_calls = 0

    def _outcome(self, deployment_id: str, state: EngineState, outcome: str) -> None:
        if self._on_load is not None:
            self._on_load(deployment_id, state.name, outcome)

    async def ensure(self, state: EngineState, adapter: AdapterRef, deployment_id: str) -> str:
        """The engine-side name once ``adapter`` is registered on ``state``'s engine."""
        name = adapter.engine_name
        if name in state.registered:
            return name
        if self._rejected.get((state.view.id, adapter.digest)) is not None:
            raise AdapterLoadFailed()
        key = (id(state), name)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._load(state, adapter, name, deployment_id))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._finished, key))
        await asyncio.shield(task)
        return name

    def _finished(self, key: tuple[int, str], task: asyncio.Task[None]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()

    def forget(self, state: EngineState, name: str) -> None:
        """The engine no longer knows ``name`` (it restarted): register again on next use."""
        state.registered.discard(name)

    def forget_rejections(self, engine_id: str | None = None) -> None:
        if engine_id is None:
            self._rejected.clear()
        else:
            self._rejected.discard_where(lambda key, _reason: key[0] == engine_id)

    async def _load(self, state: EngineState, adapter: AdapterRef, name: str, deployment_id: str) -> None:
        path = state.view.adapter_path(adapter.digest)
        self.load_calls += 1
        try:
            async with asyncio.timeout(self._load_timeout_s):
                response = await state.client.post(
                    "/v1/load_lora_adapter",
                    content=orjson.dumps({"lora_name": name, "lora_path": path}),
                    headers={"content-type": "application/json"},
                )
        except (httpx.TransportError, TimeoutError) as exc:
            self._outcome(deployment_id, state, "error")
            logger.warning("adapter load on engine %s failed: %s", state.name, type(exc).__name__)
            if isinstance(exc, httpx.ConnectError) and connection_refused(exc):
                raise EngineUnreachable() from exc
            raise UpstreamUnavailable() from exc
        body = response.content
        if response.status_code == 200:
            state.registered.add(name)
            self._outcome(deployment_id, state, "loaded")
            return
        message, _ = engine_error_message(body)
        if response.status_code == 400 and message is not None and "already been loaded" in message:
            state.registered.add(name)
            self._outcome(deployment_id, state, "already_loaded")
            return
        if response.status_code in (502, 503, 504):
            self._outcome(deployment_id, state, "error")
            raise UpstreamUnavailable()
        self._rejected.put((state.view.id, adapter.digest), message or str(response.status_code))
        self._outcome(deployment_id, state, "rejected")
        logger.warning(
            "engine %s rejected adapter %s (HTTP %d): %s",
            state.name,
            name,
            response.status_code,
            (message or "")[:500],
        )
        raise AdapterLoadFailed()

    async def reconcile(self, state: EngineState, *, replace: bool = False) -> bool:
        """Seed ``state.registered`` from the engine's ``/v1/models``; False if it did not answer.

        ``replace``: the engine's answer is the whole truth (it may have restarted and forgotten
        adapters); otherwise it only adds to what this gateway registered itself.
        """
        try:
            async with asyncio.timeout(self._load_timeout_s):
                response = await state.client.get("/v1/models")
            response.raise_for_status()
            data = orjson.loads(response.content)
        except (httpx.HTTPError, TimeoutError, orjson.JSONDecodeError) as exc:
            logger.info("could not reconcile engine %s: %s", state.name, type(exc).__name__)
            return False
        entries = data.get("data") if isinstance(data, dict) else None
        names = {
            entry["id"]
            for entry in entries or []
            if isinstance(entry, dict)
            and isinstance(entry.get("id"), str)
            and entry["id"].startswith(ADAPTER_NAME_PREFIX)
        }
        if replace:
            state.registered.intersection_update(names)
        state.registered |= names
        state.reconciled = True
        return True
