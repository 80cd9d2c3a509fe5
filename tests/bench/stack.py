"""What a benchmark runs against: the embedded database (SQLite) seeded with one deployment and
key, an upstream (the mock, or a real vLLM engine), and one ``lorry serve gateway`` process."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from control_plane.bootstrap import ensure_bootstrapped
from lorry import migrate
from lorry.db.engine import create_engine, create_sessionmaker
from lorry.settings import LorrySettings
from tests.engines import free_port
from tests.gateway.processes import GatewayProcess, start_gateway
from tests.gateway.seed import Seed
from tests.support.databases import sqlite_url

SLUG = "bench"
GATEWAY_ENV = {"LORRY_LOG_LEVEL": "warning"}


@dataclass(frozen=True)
class Stack:
    upstream_url: str  # the upstream's OpenAI base, e.g. http://127.0.0.1:N/v1
    gateway: GatewayProcess
    key: str
    model: str

    @property
    def gateway_url(self) -> str:
        return self.gateway.base_url(SLUG)


async def seed(settings: LorrySettings, upstream: str, model: str) -> str:
    """One engine, one base-model deployment and one key; returns the key's plaintext."""
    await asyncio.to_thread(migrate.upgrade, settings.database_url)
    engine = create_engine(settings.database_url)
    try:
        rows = Seed(create_sessionmaker(engine))
        async with rows.sessionmaker() as session:
            await ensure_bootstrapped(session, None)
            await session.commit()
        scope = await rows.default_scope()
        await rows.engine(
            "bench", upstream, adapter_root=str(settings.adapter_store), served_model_name=model
        )
        deployment = await rows.deployment(scope, SLUG, base_model=model)
        return (await rows.key(deployment)).plaintext
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def mock_upstream(chunks: int) -> AsyncIterator[str]:
    """The mock upstream in its own process; yields its root URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.upstream", "--port", str(port), "--chunks", str(chunks)],
        stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_for(f"{url}/health", process)
        yield url
    finally:
        process.terminate()
        process.wait(10)


async def _wait_for(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    async with httpx.AsyncClient(timeout=2) as client:
        for _ in range(int(timeout / 0.1)):
            if process.poll() is not None:
                raise RuntimeError(f"the upstream exited ({process.returncode})")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


@contextlib.asynccontextmanager
async def gateway_in_front_of(upstream: str, model: str, workdir: Path) -> AsyncIterator[Stack]:
    """A seeded database and a gateway process routing deployment ``bench`` to ``upstream``."""
    workdir.mkdir(parents=True, exist_ok=True)
    settings = LorrySettings(
        database_url=sqlite_url(workdir / "lorry.db"),
        path_routing=True,
        adapter_store=workdir / "store",
        cache_dir=workdir / "cache",
    )
    key = await seed(settings, upstream, model)
    gateway = start_gateway("bench", settings, workdir, GATEWAY_ENV)
    try:
        await gateway.wait_ready()
        yield Stack(upstream_url=f"{upstream}/v1", gateway=gateway, key=key, model=model)
    finally:
        await gateway.stop()
