"""Which engine serves a request (DESIGN §8).

Candidates: enabled, healthy engines whose ``baseModel`` equals the deployment's base model and
whose ``maxLoraRank`` covers the adapter's rank. Engines that already have the adapter
registered come first; the rest are ordered by rendezvous hashing of (adapter digest, or the
deployment slug for base-model deployments) and engine id, so every gateway replica agrees on
where an adapter goes without talking to the others. Load bounds (issue 5) plug in here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from gateway.engines import EngineState
from gateway.snapshot import DeploymentView


def rendezvous_score(key: str, engine_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}\x00{engine_id}".encode()).digest()[:8], "big")


def affinity_key(deployment: DeploymentView) -> str:
    return deployment.adapter.digest if deployment.adapter is not None else f"slug:{deployment.slug}"


def candidates(deployment: DeploymentView, engines: Iterable[EngineState]) -> list[EngineState]:
    """Engines able to serve ``deployment``, best first."""
    eligible = [
        state
        for state in engines
        if state.healthy and state.view.serves(deployment.base_model, deployment.rank)
    ]
    key = affinity_key(deployment)
    name = deployment.adapter.engine_name if deployment.adapter is not None else None
    return sorted(
        eligible,
        key=lambda state: (
            name is not None and name in state.registered,
            rendezvous_score(key, state.view.id),
        ),
        reverse=True,
    )
