"""``gateway.server.serve``: the data plane and the operations app on their own ports."""

from __future__ import annotations

import asyncio
import time

import httpx

from gateway.server import serve
from lorry.settings import LorrySettings
from tests.engines import free_port
from tests.gateway.conftest import host_for
from tests.gateway.seed import Seed


async def test_serve_two_ports_and_stop(settings: LorrySettings, seed: Seed, control_plane: object) -> None:
    scope = await seed.default_scope()
    await seed.deployment(scope, "served", auth_mode="none")
    port, ops_port = free_port(), free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(
            settings, host="127.0.0.1", port=port, ops_port=ops_port, install_signal_handlers=False, stop=stop
        )
    )
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            deadline = time.monotonic() + 20
            while True:
                try:
                    ready = await client.get(f"http://127.0.0.1:{ops_port}/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "gateway did not become ready"
                await asyncio.sleep(0.05)
            models = await client.get(
                f"http://127.0.0.1:{port}/v1/models", headers={"host": host_for("served")}
            )
            assert models.status_code == 200 and models.json()["data"][0]["id"] == "served"
            # Operations routes are not on the data port, and the data routes not on the ops port.
            assert (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 404
            ops_models = await client.get(
                f"http://127.0.0.1:{ops_port}/v1/models", headers={"host": host_for("served")}
            )
            assert ops_models.status_code == 404
            metrics = await client.get(f"http://127.0.0.1:{ops_port}/metrics")
            assert "lorry_gateway_requests_total" in metrics.text
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)
    async with httpx.AsyncClient(timeout=2) as client:
        try:
            await client.get(f"http://127.0.0.1:{port}/v1/models")
            raise AssertionError("the data port still answers after stop")
        except httpx.TransportError:
            pass
