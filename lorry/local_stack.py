"""`lorry up`: the embedded default (DESIGN §10).

SQLite under ./.lorry/, control plane and gateway in one process, a supervised local vLLM CPU
engine serving the demo model (or `--model`, or an existing server with `--engine-url`). The
first start creates the demo job, deployment `demo` and a key; every start prints the five
labelled lines once each part answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lorry import engine_env, keys, migrate
from lorry.client import AsyncCloudApiClient, CloudApiError, DeploymentScope
from lorry.client.models import Deployment
from lorry.credentials import Credentials
from lorry.local_engine import SupervisedEngine, engine_command, engine_environ, free_port
from lorry.private_files import write_private_json
from lorry.settings import LorrySettings

STATE_DIR = Path(".lorry")
SECRETS_FILE = "secrets.json"
CREDENTIALS_FILE = "credentials.json"
DEMO_SLUG = "demo"
DEMO_ADAPTER = "alpha"
ENGINE_START_TIMEOUT_S = 600.0
SCOPE = DeploymentScope(org_slug="default", project_slug="default")


@dataclass(frozen=True)
class UpOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    admin_port: int = 8081
    ops_port: int = 9090
    state_dir: Path = STATE_DIR
    model: Path | None = None
    engine_url: str | None = None


@dataclass
class EnginePlan:
    """What the local stack serves: an engine to start (or an existing URL) and the demo target."""

    url: str
    model_id: str
    served_model_name: str
    max_lora_rank: int
    demo_adapter: Path | None
    supervised: SupervisedEngine | None = None
    import_roots: list[Path] = field(default_factory=list)


def say(label: str, value: str) -> None:
    """One plain line, flushed at once: scripts and tests read these (no rich wrapping)."""
    sys.stdout.write(f"{label:<13}{value}\n")
    sys.stdout.flush()


def progress(message: str) -> None:
    sys.stderr.write(f"lorry up: {message}\n")
    sys.stderr.flush()


def load_secrets(state_dir: Path) -> dict[str, Any]:
    """The demo credentials `lorry up` keeps for itself (mode 0600, the one documented exception)."""
    path = state_dir / SECRETS_FILE
    if path.exists():
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    secrets = {"adminToken": keys.issue(keys.TokenKind.ADMIN_TOKEN).plaintext}
    write_private_json(path, secrets)
    return secrets


def up_settings(options: UpOptions, admin_token: str, plan: EnginePlan) -> LorrySettings:
    state = options.state_dir.resolve()
    store = state / "adapters"
    overrides: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{state / 'lorry.db'}",
        "adapter_store": store,
        "import_roots": plan.import_roots,
        "path_routing": True,
        "public_url_template": f"http://{options.host}:{options.port}/d/{{slug}}/v1",
        "bootstrap_admin_token": admin_token,
        "shutdown_deadline_s": 5.0,
        "engines": [
            {
                "name": "local",
                "url": plan.url,
                "baseModel": plan.model_id,
                "servedModelName": plan.served_model_name,
                "adapterRoot": str(store),
                "maxLoras": 4,
                "maxLoraRank": plan.max_lora_rank,
            }
        ],
    }
    settings = LorrySettings()
    # Explicit LORRY_ variables still win, so `lorry up` can be pointed elsewhere.
    explicit = {k for k in os.environ if k.startswith("LORRY_")}
    return settings.model_copy(
        update={k: v for k, v in overrides.items() if f"LORRY_{k.upper()}" not in explicit}
    )


async def plan_engine(options: UpOptions, cache_dir: Path) -> EnginePlan:
    if options.engine_url:
        url = options.engine_url.rstrip("/")
        async with httpx.AsyncClient(timeout=10.0) as client:
            served = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        return EnginePlan(
            url=url, model_id=served, served_model_name=served, max_lora_rank=16, demo_adapter=None
        )
    progress("preparing the vLLM engine environment (first run: several GB, cached)")
    await asyncio.to_thread(engine_env.build, cache_dir)
    if options.model is not None:
        model_dir = options.model.resolve()
        model_id = model_dir.name
        dtype, rank, adapter = "auto", 16, None
        roots: list[Path] = []
    else:
        demo_dir = await asyncio.to_thread(engine_env.build_demo_model, cache_dir)
        manifest = json.loads((demo_dir / "manifest.json").read_text())
        model_dir = demo_dir / manifest["base"]
        model_id, dtype, rank = manifest["model_id"], manifest["dtype"], int(manifest["max_lora_rank"])
        adapter = demo_dir / "adapters" / DEMO_ADAPTER
        roots = [demo_dir / "adapters"]
    port = free_port()
    argv = engine_command(
        engine_env.python_path(cache_dir),
        model_dir,
        port=port,
        served_model_name=model_id,
        max_loras=4,
        max_lora_rank=rank,
        dtype=dtype,
    )
    url = f"http://127.0.0.1:{port}"
    log_path = options.state_dir / "engine.log"
    engine = SupervisedEngine(argv, engine_environ(), log_path, url)
    return EnginePlan(url, model_id, model_id, rank, adapter, supervised=engine, import_roots=roots)


async def _wait_ready(url: str, path: str, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}{path}")).status_code == 200:
                    return
            if loop.time() > deadline:
                raise TimeoutError(f"{url}{path} did not answer within {timeout_s:.0f} s")
            await asyncio.sleep(0.2)


async def _key_usable(client: AsyncCloudApiClient, deployment_id: str, plaintext: str) -> bool:
    """Whether the saved key is still one of the deployment's working keys (the user may have
    revoked it with the CLI since the last start)."""
    parsed = keys.parse(plaintext)
    if parsed is None:
        return False
    listed = await client.list_deployment_keys(deployment_id, SCOPE)
    return any(key.prefix == parsed.prefix and key.enabled for key in listed)


@dataclass(frozen=True)
class DemoAccess:
    slug: str
    key: str


async def ensure_demo(
    client: AsyncCloudApiClient, secrets: dict[str, Any], plan: EnginePlan, state_dir: Path
) -> DemoAccess:
    """The demo deployment and its key: created on the first start, reused afterwards.

    Slugs are never reused, so a demo deleted by hand comes back as ``demo-2`` (then ``demo-3``…).
    """
    deployment: Deployment | None = None
    if "demoDeploymentId" in secrets:
        with contextlib.suppress(CloudApiError):
            deployment = await client.get_deployment(secrets["demoDeploymentId"], SCOPE)
    if deployment is None:
        existing = [d for d in await client.list_deployments(SCOPE) if d.slug == DEMO_SLUG]
        if existing:
            deployment = existing[0]
        else:
            if plan.demo_adapter is not None:
                job = await client.import_job(
                    SCOPE, name="demo", path=str(plan.demo_adapter), model=plan.model_id
                )
                target: dict[str, Any] = {"kind": "adapter", "adapter": {"kind": "final", "jobId": job.id}}
            else:
                target = {"kind": "base_model", "baseModel": plan.model_id}
            deployment = await _create_demo(client, target)
        secrets.pop("demoKey", None)
    if "demoKey" in secrets and not await _key_usable(client, deployment.id, str(secrets["demoKey"])):
        progress("the saved demo key was revoked or has expired: creating a new one")
        secrets.pop("demoKey")
    if "demoKey" not in secrets:
        key = await client.create_deployment_key(deployment.id, SCOPE, label="lorry up demo")
        secrets["demoKey"] = key.plaintext
    secrets["demoDeploymentId"] = deployment.id
    write_private_json(state_dir / SECRETS_FILE, secrets)
    return DemoAccess(slug=deployment.slug, key=str(secrets["demoKey"]))


async def _create_demo(client: AsyncCloudApiClient, target: dict[str, Any]) -> Deployment:
    for n in range(1, 100):
        slug = DEMO_SLUG if n == 1 else f"{DEMO_SLUG}-{n}"
        try:
            return await client.create_deployment(SCOPE, slug=slug, target=target)
        except CloudApiError as exc:
            if exc.code != "slug_taken":
                raise
            progress(f"the slug {slug} belonged to a deleted deployment: trying the next")
    raise RuntimeError("no free demo slug (demo … demo-99 are all taken)")


def curl_line(base_url: str, key: str, slug: str = DEMO_SLUG) -> str:
    body = json.dumps({"model": slug, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    return (
        f"curl -sS {base_url}/chat/completions -H {shlex.quote('Authorization: Bearer ' + key)} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


async def _wait_serving(base_url: str, key: str, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    body = {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    async with httpx.AsyncClient(timeout=60.0) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                response = await client.post(
                    f"{base_url}/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
                )
                if response.status_code == 200:
                    return
            if loop.time() > deadline:
                raise TimeoutError("the demo deployment did not serve tokens in time")
            await asyncio.sleep(1.0)


async def announce(
    options: UpOptions, settings: LorrySettings, secrets: dict[str, Any], plan: EnginePlan
) -> None:
    admin_url = f"http://{options.host}:{options.admin_port}"
    await _wait_ready(admin_url, "/readyz", 120.0)
    say("Admin API:", admin_url)
    say("Admin token:", secrets["adminToken"])
    credentials = Credentials(
        token=secrets["adminToken"], apiUrl=admin_url, orgSlug="default", projectSlug="default"
    )
    write_private_json(
        options.state_dir / CREDENTIALS_FILE, credentials.model_dump(by_alias=True, exclude_none=True)
    )
    async with AsyncCloudApiClient(admin_url, credentials) as client:
        demo = await ensure_demo(client, secrets, plan, options.state_dir)
    if plan.supervised is not None:
        progress(f"waiting for the vLLM engine (log: {plan.supervised.log_path})")
        await plan.supervised.wait_healthy(ENGINE_START_TIMEOUT_S)
    base_url = settings.public_url(demo.slug)
    await _wait_serving(base_url, demo.key, 300.0)
    say("Base URL:", base_url)
    say("Key:", demo.key)
    sys.stdout.write(curl_line(base_url, demo.key, demo.slug) + "\n")
    sys.stdout.flush()


async def run_up(options: UpOptions) -> None:
    from lorry.combined import serve_control_plane_and_gateway

    options.state_dir.mkdir(parents=True, exist_ok=True)
    secrets = load_secrets(options.state_dir)
    cache_dir = LorrySettings().cache_dir
    stop = asyncio.Event()
    plan = await plan_engine(options, cache_dir)
    settings = up_settings(options, secrets["adminToken"], plan)
    await asyncio.to_thread(migrate.upgrade, settings.database_url)
    if plan.supervised is not None:
        await plan.supervised.start()
    announcing = asyncio.create_task(announce(options, settings, secrets, plan))
    failures: list[BaseException] = []

    def announced(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            failures.append(task.exception())  # type: ignore[arg-type]
            progress(f"error: {task.exception()}")
            stop.set()

    announcing.add_done_callback(announced)
    try:
        await serve_control_plane_and_gateway(
            settings,
            host=options.host,
            port=options.port,
            admin_port=options.admin_port,
            ops_port=options.ops_port,
            stop=stop,
        )
    finally:
        announcing.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await announcing
        if plan.supervised is not None:
            await plan.supervised.stop()
    if failures:
        raise SystemExit(1)
