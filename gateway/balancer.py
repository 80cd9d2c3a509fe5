"""Which engine serves a request (DESIGN §8).

Candidates: enabled, healthy engines whose ``baseModel`` equals the deployment's base model and
whose ``maxLoraRank`` covers the adapter's rank (when none of the able engines is healthy, all of
them are tried rather than none). Engines that already have the adapter
registered come first; the rest are ordered by rendezvous hashing of (adapter digest, or the
deployment slug for base-model deployments) and the engine's id, so every gateway replica agrees
on where an adapter goes without talking to the others.

The load bound: an engine over it goes to the back of the list, behind every engine under it
(and those over it are ordered by how far over they are). An engine is over its bound when

- its requests reach ``max_requests`` — this gateway's in-flight requests, or the running plus
  waiting requests the engine itself reports (which counts every gateway) when that is larger;
- ``max_waiting`` requests wait on it (its own ``vllm:num_requests_waiting``);
- the request's adapter is not among those in flight there and either ``maxLoras`` distinct
  adapters already are (the new one would be deferred), or the engine already defers requests
  (``vllm:num_requests_waiting_by_reason{reason="deferred"}``).

So requests for one adapter stay on one engine while it is under its bound, and a burst beyond
the bound spreads to the next engine in the adapter's rendezvous order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.engines import EngineState
from gateway.snapshot import DeploymentView


@dataclass(frozen=True, slots=True)
class LoadBound:
    max_requests: int = 64
    max_waiting: int = 4


def rendezvous_score(key: str, engine_key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}\x00{engine_key}".encode()).digest()[:8], "big")


def affinity_key(deployment: DeploymentView) -> str:
    return deployment.adapter.digest if deployment.adapter is not None else f"slug:{deployment.slug}"


def overload(state: EngineState, adapter: str | None, bound: LoadBound) -> float:
    """0 when ``state`` is under its bound for a request of ``adapter``; else how far over (> 0)."""
    over = 0.0
    requests = state.requests_load()
    if requests >= bound.max_requests:
        over = max(over, (requests + 1) / max(1, bound.max_requests))
    if state.load_known and state.load.waiting >= bound.max_waiting:
        over = max(over, (state.load.waiting + 1) / max(1, bound.max_waiting))
    if adapter is not None:
        busy = state.adapters_busy()
        if adapter not in busy:
            slots = state.view.max_loras
            if len(busy) >= slots:
                over = max(over, (len(busy) + 1) / max(1, slots))
            if state.load_known and state.load.deferred > 0:
                over = max(over, 1.0 + state.load.deferred / max(1, slots))
    return over


def candidates(
    deployment: DeploymentView, engines: Iterable[EngineState], bound: LoadBound | None = None
) -> list[EngineState]:
    """Engines able to serve ``deployment``, best first."""
    limits = bound or LoadBound()
    able = [state for state in engines if state.view.serves(deployment.base_model, deployment.rank)]
    # Only when every able engine is out of rotation are they all tried anyway ("panic" routing):
    # a false ejection must not turn into a total outage.
    eligible = [state for state in able if state.healthy] or able
    key = affinity_key(deployment)
    name = deployment.adapter.engine_name if deployment.adapter is not None else None
    preferred = sorted(
        eligible,
        key=lambda state: (
            name is not None and name in state.registered,
            rendezvous_score(key, state.key),
        ),
        reverse=True,
    )
    scored = [(overload(state, name, limits), position, state) for position, state in enumerate(preferred)]
    # Under the bound (0) in preference order, then the least overloaded.
    scored.sort(key=lambda item: (item[0], item[1]))
    return [state for _, _, state in scored]


def rendezvous_order(deployment: DeploymentView, engine_keys: Iterable[str]) -> list[str]:
    """Engine keys by rendezvous score alone (what every replica agrees on for a fresh adapter)."""
    key = affinity_key(deployment)
    return sorted(engine_keys, key=lambda engine_key: rendezvous_score(key, engine_key), reverse=True)
