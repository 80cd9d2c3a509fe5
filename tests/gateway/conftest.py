"""Gateway fixtures: a started gateway on the per-test database, clients, a real HTTP server."""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp

from control_plane.context import AppContext
from gateway.app import Gateway, create_app
from gateway.options import GatewayOptions
from lorry.settings import LorrySettings
from tests.conftest import BASE_DOMAIN
from tests.engines import RunningEngine
from tests.gateway.admin_api import AdminApi
from tests.gateway.figures import FIGURES
from tests.gateway.seed import Seed
from tests.gateway.standin import serve_app

FAST_OPTIONS = GatewayOptions(last_used_flush_s=0.25)
MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def seed(sessionmaker: Any) -> Seed:
    return Seed(sessionmaker)


@pytest.fixture
async def make_gateway(settings: LorrySettings, ctx: AppContext) -> AsyncIterator[MakeGateway]:
    """``await make_gateway(options=..., update={settings fields}, in_process=True)``."""
    made: list[Gateway] = []

    async def make(
        *,
        options: GatewayOptions | None = None,
        update: dict[str, Any] | None = None,
        in_process: bool = True,
    ) -> Gateway:
        gw_settings = settings.model_copy(update=update) if update else settings
        gw = create_app(gw_settings, options or FAST_OPTIONS)
        await gw.start()
        made.append(gw)
        if in_process:  # as under `lorry serve all`
            ctx.change_listeners.append(gw.notify)
        return gw

    try:
        yield make
    finally:
        for gw in made:
            with contextlib.suppress(ValueError):
                ctx.change_listeners.remove(gw.notify)
            await gw.stop()


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> Gateway:
    return await make_gateway()


def host_for(slug: str) -> str:
    return f"{slug}.{BASE_DOMAIN}"


def client_for(
    gw: Gateway,
    slug: str | None = None,
    *,
    key: str | None = None,
    address: str = "127.0.0.1",
    base_url: str | None = None,
) -> httpx.AsyncClient:
    """A client of the data plane in-process (ASGI); host mode when ``slug`` is given."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    url = base_url or (f"http://{host_for(slug)}" if slug else "http://127.0.0.1:8080")
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gw.app, client=(address, 40000)),
        base_url=url,
        headers=headers,
        timeout=60.0,
    )


def ops_client(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.ops_app), base_url="http://ops")


@contextlib.asynccontextmanager
async def http_server(app: ASGIApp) -> AsyncIterator[str]:
    """Serves ``app`` with uvicorn (httptools) on 127.0.0.1 and a free port; yields its base URL."""
    async with serve_app(app, graceful_s=None) as port:
        yield f"http://127.0.0.1:{port}"


# -- real engines ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One adapter store for the whole session: the shared engine keeps reading registered paths."""
    return tmp_path_factory.mktemp("gateway-store").resolve()


@pytest.fixture
def settings(settings: LorrySettings, shared_store: Path) -> LorrySettings:
    """The suite's per-test settings, with the session's adapter store."""
    return settings.model_copy(update={"adapter_store": shared_store})


def engine_entry(engine: RunningEngine, store: Path, **overrides: Any) -> dict[str, Any]:
    """A LORRY_ENGINES entry for a running engine that sees the store at its real path."""
    return {
        "name": "shared",
        "url": engine.url,
        "baseModel": engine.served_model_name,
        "servedModelName": engine.served_model_name,
        "adapterRoot": str(store),
        "maxLoras": 4,
        "maxLoraRank": 16,
        **overrides,
    }


@pytest.fixture
async def engine_gateway(
    make_gateway: MakeGateway, vllm_engine: RunningEngine, shared_store: Path
) -> Gateway:
    """A gateway routing to the shared real engine, path mode on."""
    return await make_gateway(
        update={"engines": [engine_entry(vllm_engine, shared_store)], "path_routing": True}
    )


@pytest.fixture
def admin_api(admin: httpx.AsyncClient) -> AdminApi:
    return AdminApi(admin)


class DemoAdapters:
    """Imports the demo model's PEFT adapters through the admin API (``POST /v1/jobs``)."""

    def __init__(self, api: AdminApi, demo_model_dir: Path, import_root: Path) -> None:
        self.api = api
        self.source = demo_model_dir / "adapters"
        self.import_root = import_root

    def copy(self, name: str, *, variant: str | None = None) -> Path:
        """A copy under the import root; a ``variant`` makes new content (a new digest, a new load)."""
        target = self.import_root / f"{name}-{uuid.uuid4().hex[:8]}"
        shutil.copytree(self.source / name, target)
        if variant is not None:
            config_path = target / "adapter_config.json"
            config = json.loads(config_path.read_text())
            config["revision"] = variant  # a PEFT field vLLM ignores: same weights, new content id
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        return target

    async def job(self, name: str, *, variant: str | None = None) -> dict[str, Any]:
        return await self.api.import_job(f"{name}-job", self.copy(name, variant=variant))


@pytest.fixture
def demo_adapters(admin_api: AdminApi, demo_model_dir: Path, settings: LorrySettings) -> DemoAdapters:
    return DemoAdapters(admin_api, demo_model_dir, settings.import_roots[0])


def engine_name_of(job: dict[str, Any]) -> str:
    """The engine-side name of a job's final adapter (DESIGN §8)."""
    final = [a for a in job["adapters"] if a["kind"] == "final"]
    assert len(final) == 1, job
    return f"lora-{final[0]['digest'][:16]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures the gateway tests measured (``tests/gateway/figures.py``), shown without ``-s``."""
    if not FIGURES:
        return
    terminalreporter.section("gateway figures")
    for test, text in FIGURES:
        terminalreporter.write_line(f"{test}: {text}")
