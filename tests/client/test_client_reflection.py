"""The typed client against a real control plane.

One scenario drives every public method of `AsyncCloudApiClient` (over ASGI, on the app) and of
`CloudApiClient` (over a real socket, uvicorn in a thread). Reflection closes the loop: the set of
methods called must equal the set of public methods (found with `inspect`), and the requests sent
must cover every admin route the app serves. Error statuses arrive as `CloudApiError` carrying
exactly the server's message and code.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.app import create_app
from lorry import AsyncCloudApiClient, CloudApiClient, CloudApiError, DeploymentScope
from lorry.client import calls
from lorry.client.models import (
    AdapterTarget,
    BaseModelTarget,
    CheckpointAdapterRef,
    Deployment,
    FinalAdapterRef,
)
from lorry.settings import LorrySettings
from tests.client.support import (
    AsyncRecordingTransport,
    Awaitable,
    RecordingTransport,
    Wire,
    adapter_archive,
    admin_routes,
    free_port,
    public_methods,
    recording,
    serve_in_thread,
    training_output,
)
from tests.conftest import ADMIN_TOKEN
from tests.support.adapters import BASE_MODEL

SCOPE = DeploymentScope(org_slug="default", project_slug="default")
ASGI_URL = "http://admin.lorry.test"


# --------------------------------------------------------------------------- the scenario


async def scenario(client: Any, settings: LorrySettings, tmp: Path) -> None:
    """Every admin route, through `client` (an async client, or a blocking one behind `Awaitable`)."""
    me = await client.me()
    assert me.token.kind == "install" and me.org_slug is None
    assert [org.slug for org in me.orgs] == ["default"]
    assert (await client.send(calls.me())).token.id == me.token.id

    # Tenancy
    org = await client.create_org("acme", "Acme Inc.")
    assert (org.slug, org.name) == ("acme", "Acme Inc.")
    project = await client.create_project("acme", "web", "Web")
    assert (project.slug, project.org_id) == ("web", org.id)
    listed = await client.list_projects("acme")
    assert listed.org.id == org.id and [p.slug for p in listed.projects] == ["web"]

    # Admin tokens
    token = await client.create_admin_token("ci", kind="org", org_slug="acme")
    assert token.plaintext.startswith("lorry_admin_") and token.kind == "org" and token.org_id == org.id
    assert token.plaintext.startswith(token.prefix)
    tokens = await client.list_admin_tokens("acme")
    assert [t.id for t in tokens] == [token.id] and tokens[0].enabled
    rolled_token = await client.roll_admin_token(token.id, 0)
    assert rolled_token.previous.id == token.id and rolled_token.token.label == "ci"
    assert rolled_token.token.plaintext != token.plaintext
    await client.revoke_admin_token(rolled_token.token.id)
    assert {t.id: t.enabled for t in await client.list_admin_tokens("acme")} == {
        token.id: False,
        rolled_token.token.id: False,
    }

    # Engines (install tokens)
    engine = await client.create_engine(
        name="cpu-1",
        url="http://127.0.0.1:9",
        base_model=BASE_MODEL,
        max_lora_rank=16,
        api_key="engine-secret",
    )
    assert engine.has_api_key and engine.source == "api" and engine.max_lora_rank == 16
    assert "engine-secret" not in engine.model_dump_json()
    assert (await client.get_engine(engine.id)).name == "cpu-1"
    engine = await client.update_engine(engine.id, max_loras=2, api_key=None)
    assert engine.max_loras == 2 and engine.has_api_key is False
    assert engine.id in [e.id for e in await client.list_engines()]

    # Jobs: an import from the server's disk, and an upload with progress
    output = training_output(settings.import_roots[0], "run-1", steps=(5,))
    imported = await client.import_job(SCOPE, name="run-1", path=str(output))
    assert imported.status == "completed" and imported.config.model == BASE_MODEL
    assert sorted((a.kind, a.step) for a in imported.adapters) == [("checkpoint", 5), ("final", None)]
    empty = await client.create_job(SCOPE, name="uploaded", model=BASE_MODEL)
    assert empty.status == "queued" and empty.adapters == []
    archive = adapter_archive(tmp, "upload", seed=7)
    progress: list[tuple[int, int]] = []
    uploaded = await client.upload_artifact(
        empty.id, SCOPE, archive, on_progress=lambda sent, total: progress.append((sent, total))
    )
    size = archive.stat().st_size
    assert progress and progress[-1] == (size, size)
    assert [sent for sent, _ in progress] == sorted(sent for sent, _ in progress)
    assert uploaded.job.id == empty.id and uploaded.job.status == "completed"
    assert (
        uploaded.adapter.kind == "final" and uploaded.adapter.rank == 8 and len(uploaded.adapter.digest) == 64
    )
    checkpoint = await client.upload_artifact(empty.id, SCOPE, archive, kind="checkpoint", step=3)
    assert (checkpoint.adapter.kind, checkpoint.adapter.step) == ("checkpoint", 3)
    assert (await client.get_job(empty.id, SCOPE)).adapters[-1].id == checkpoint.adapter.id
    assert {j.id for j in await client.list_jobs(SCOPE)} == {imported.id, empty.id}

    # Deployments
    final = AdapterTarget(adapter=FinalAdapterRef(job_id=imported.id))
    deployment = await client.create_deployment(SCOPE, slug="support-bot", target=final)
    assert deployment.status == "ready" and deployment.auth_mode == "fixed_api_key" and deployment.enabled
    assert deployment.target == final
    assert deployment.base_url == settings.public_url("support-bot")
    assert (await client.get_deployment(deployment.id, SCOPE)).slug == "support-bot"
    assert [d.id for d in await client.list_deployments(SCOPE)] == [deployment.id]
    step_target = {"kind": "adapter", "adapter": {"kind": "checkpoint", "jobId": imported.id, "step": 5}}
    updated = await client.update_deployment(
        deployment.id,
        SCOPE,
        target=step_target,
        enabled=False,
        run_retention_mode="days",
        run_retention_days=30,
    )
    assert updated.target == AdapterTarget(adapter=CheckpointAdapterRef(job_id=imported.id, step=5))
    assert (updated.enabled, updated.run_retention_mode, updated.run_retention_days) == (False, "days", 30)
    assert updated.slug == "support-bot" and updated.auth_mode == "fixed_api_key"
    base = await client.create_deployment(
        SCOPE,
        slug="base-demo",
        target=BaseModelTarget(base_model=BASE_MODEL),
        auth_mode="none",
        run_retention_mode="unlimited",
    )
    assert (base.auth_mode, base.run_retention_mode, base.run_retention_days) == ("none", "unlimited", None)

    # Keys
    key = await client.create_deployment_key(deployment.id, SCOPE, label="prod")
    assert key.plaintext.startswith(key.prefix) and key.label == "prod"
    keys = await client.list_deployment_keys(deployment.id, SCOPE)
    assert [(k.id, k.enabled) for k in keys] == [(key.id, True)]
    assert "plaintext" not in keys[0].model_dump()
    rolled = await client.roll_deployment_key(deployment.id, key.id, SCOPE, grace_period_seconds=0)
    assert (
        rolled.previous.id == key.id and rolled.key.label == "prod" and rolled.key.plaintext != key.plaintext
    )
    await client.revoke_deployment_key(deployment.id, rolled.key.id, SCOPE)
    assert {k.id: k.enabled for k in await client.list_deployment_keys(deployment.id, SCOPE)} == {
        key.id: False,
        rolled.key.id: False,
    }

    # Deleting
    await client.delete_deployment(base.id, SCOPE)
    await client.delete_deployment(deployment.id, SCOPE)
    assert await client.list_deployments(SCOPE) == []
    await client.delete_job(empty.id, SCOPE)
    assert [j.id for j in await client.list_jobs(SCOPE)] == [imported.id]
    await client.delete_engine(engine.id)
    assert engine.id not in [e.id for e in await client.list_engines()]

    # Audit
    since = datetime.now(UTC) - timedelta(hours=1)
    events = await client.list_audit_events("default", action="deployment.create", since=since, limit=10)
    assert {e.resource_id for e in events} == {deployment.id, base.id}
    assert all(e.actor_token_id == me.token.id for e in events)
    assert len(await client.list_audit_events(limit=1)) == 1


def check_reflection(cls: type, called: set[str], wire: Wire, app: FastAPI) -> None:
    public = public_methods(cls)
    assert public - called == set(), f"{cls.__name__} methods never exercised: {sorted(public - called)}"
    assert called <= public
    missed = {(method, path) for method, path, _ in admin_routes(app)} - wire.routes_hit(app)
    assert missed == set(), f"admin routes no {cls.__name__} call reached: {sorted(missed)}"


async def test_async_client_covers_every_route(
    control_plane: FastAPI, settings: LorrySettings, tmp_path: Path
) -> None:
    called: set[str] = set()
    wire = Wire()
    transport = AsyncRecordingTransport(httpx.ASGITransport(app=control_plane), wire)
    client = recording(AsyncCloudApiClient(ASGI_URL, ADMIN_TOKEN, transport=transport), called)
    try:
        await scenario(client, settings, tmp_path)
    finally:
        await client.aclose()
    check_reflection(AsyncCloudApiClient, called, wire, control_plane)


async def test_sync_client_covers_every_route(settings: LorrySettings, tmp_path: Path) -> None:
    app = create_app(settings)
    called: set[str] = set()
    wire = Wire()
    with serve_in_thread(app) as url:
        transport = RecordingTransport(httpx.HTTPTransport(), wire)
        client = recording(CloudApiClient(url, ADMIN_TOKEN, transport=transport), called)
        try:
            await scenario(Awaitable(client), settings, tmp_path)
        finally:
            client.close()
    check_reflection(CloudApiClient, called, wire, app)


def test_twins_have_the_same_methods_one_per_builder() -> None:
    """Both clients expose the same methods, generated from the same builders, same signatures."""
    lifecycle = {"send", "close", "aclose"}
    sync_methods = public_methods(CloudApiClient) - lifecycle
    async_methods = public_methods(AsyncCloudApiClient) - lifecycle
    builders = {
        name
        for name, value in vars(calls).items()
        if callable(value) and not name.startswith("_") and getattr(value, "__module__", "") == calls.__name__
    } - {"Call", "Unset"}
    assert sync_methods == async_methods == builders
    import inspect

    for name in builders:
        sync_sig = inspect.signature(getattr(CloudApiClient, name))
        async_sig = inspect.signature(getattr(AsyncCloudApiClient, name))
        assert sync_sig == async_sig, name
        if name != "upload_artifact":  # adds on_progress
            assert list(sync_sig.parameters)[1:] == list(inspect.signature(getattr(calls, name)).parameters)
        assert inspect.iscoroutinefunction(getattr(AsyncCloudApiClient, name)), name
        assert not inspect.iscoroutinefunction(getattr(CloudApiClient, name)), name


# --------------------------------------------------------------------------- errors


async def raw_error(
    control_plane: FastAPI, method: str, path: str, token: str | None, **kw: Any
) -> dict[str, Any]:
    """The server's own answer to the same request, read without the client."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=control_plane)
    async with httpx.AsyncClient(transport=transport, base_url=ASGI_URL, headers=headers) as http:
        response = await http.request(method, path, **kw)
    body: dict[str, Any] = response.json()
    body["status"] = response.status_code
    return body


@pytest.fixture
async def aclient(control_plane: FastAPI) -> AsyncIterator[AsyncCloudApiClient]:
    transport = httpx.ASGITransport(app=control_plane)
    async with AsyncCloudApiClient(ASGI_URL, ADMIN_TOKEN, transport=transport) as client:
        yield client


async def test_every_error_status_is_a_cloud_api_error_with_the_servers_words(
    control_plane: FastAPI, aclient: AsyncCloudApiClient
) -> None:
    transport = httpx.ASGITransport(app=control_plane)
    org_token = (await aclient.create_admin_token("scoped", kind="org", org_slug="default")).plaintext
    await aclient.create_org("other", "Other")
    base = {"kind": "base_model", "baseModel": BASE_MODEL}
    await aclient.create_deployment(SCOPE, slug="taken", target=base)
    params = SCOPE.params()

    async with (
        AsyncCloudApiClient(ASGI_URL, "lorry_admin_nope", transport=transport) as stranger,
        AsyncCloudApiClient(ASGI_URL, org_token, transport=transport) as scoped,
    ):
        attempts: list[tuple[int, Any, dict[str, Any]]] = [
            (
                400,
                aclient.create_deployment(SCOPE, slug="-bad-", target=base),
                await raw_error(
                    control_plane,
                    "POST",
                    "/v1/endpoints",
                    ADMIN_TOKEN,
                    params=params,
                    json={"slug": "-bad-", "target": base},
                ),
            ),
            (
                400,
                aclient.list_deployments(DeploymentScope(org_slug="default", project_slug="")),
                await raw_error(
                    control_plane,
                    "GET",
                    "/v1/endpoints",
                    ADMIN_TOKEN,
                    params={"orgSlug": "default", "projectSlug": ""},
                ),
            ),
            (401, stranger.me(), await raw_error(control_plane, "GET", "/v1/me", "lorry_admin_nope")),
            (
                403,
                scoped.create_org("mine", "Mine"),
                await raw_error(
                    control_plane, "POST", "/v1/orgs", org_token, json={"slug": "mine", "name": "Mine"}
                ),
            ),
            (
                403,
                scoped.list_deployments(DeploymentScope(org_slug="other", project_slug="default")),
                await raw_error(
                    control_plane,
                    "GET",
                    "/v1/endpoints",
                    org_token,
                    params={"orgSlug": "other", "projectSlug": "default"},
                ),
            ),
            (
                404,
                aclient.get_deployment(str(uuid.uuid4()), SCOPE),
                await raw_error(
                    control_plane, "GET", f"/v1/endpoints/{uuid.uuid4()}", ADMIN_TOKEN, params=params
                ),
            ),
            (
                404,
                aclient.get_deployment("not-a-uuid", SCOPE),
                await raw_error(control_plane, "GET", "/v1/endpoints/not-a-uuid", ADMIN_TOKEN, params=params),
            ),
            (
                409,
                aclient.create_deployment(SCOPE, slug="taken", target=base),
                await raw_error(
                    control_plane,
                    "POST",
                    "/v1/endpoints",
                    ADMIN_TOKEN,
                    params=params,
                    json={"slug": "taken", "target": base},
                ),
            ),
        ]
        seen: list[tuple[int, str | None]] = []
        for status, call, expected in attempts:
            with pytest.raises(CloudApiError) as caught:
                await call
            error = caught.value
            assert expected["status"] == status
            assert (error.status, error.message, error.code) == (status, expected["error"], expected["code"])
            assert error.message and error.code
            assert expected["error"] in str(error)
            seen.append((error.status, error.code))
    assert {status for status, _ in seen} == {400, 401, 403, 404, 409}
    assert (400, "scope_required") in seen and (409, "slug_taken") in seen


def test_sync_client_raises_the_same_errors_over_a_socket(settings: LorrySettings) -> None:
    with serve_in_thread(create_app(settings)) as url, CloudApiClient(url, ADMIN_TOKEN) as client:
        with pytest.raises(CloudApiError) as missing:
            client.get_job(str(uuid.uuid4()), SCOPE)
        assert (missing.value.status, missing.value.code) == (404, "job_not_found")
        with CloudApiClient(url, "lorry_admin_nope") as stranger, pytest.raises(CloudApiError) as refused:
            stranger.list_engines()
        assert refused.value.status == 401 and refused.value.code
        with pytest.raises(CloudApiError) as bad:
            client.create_job(SCOPE, name=" ", model=BASE_MODEL)
        assert (bad.value.status, bad.value.code) == (400, "invalid_request")
        assert bad.value.message


def test_network_errors_are_not_swallowed() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with CloudApiClient(url, ADMIN_TOKEN, timeout=5) as client, pytest.raises(httpx.ConnectError):
        client.me()


async def test_async_network_errors_are_not_swallowed() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncCloudApiClient(url, ADMIN_TOKEN, timeout=5) as client:
        with pytest.raises(httpx.ConnectError):
            await client.list_deployments(SCOPE)


# --------------------------------------------------------------------------- unknown fields


class FutureServer:
    """The real app, with a field this client has never heard of added to every JSON object it
    answers, and one deployment's target turned into a kind the client does not know."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = b"".join(chunks)
                    if body and dict(start.get("headers", [])).get(b"content-type", b"").startswith(
                        b"application/json"
                    ):
                        body = json.dumps(self.future(json.loads(body))).encode()
                    headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                    headers.append((b"content-length", str(len(body)).encode()))
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)

    def future(self, value: Any) -> Any:
        if isinstance(value, dict):
            out = {key: self.future(item) for key, item in value.items()}
            out["fromTheFuture"] = {"nested": [1, 2]}
            if out.get("slug") == "menu" and "target" in out:
                out["target"] = {"kind": "model_menu"}
            return out
        if isinstance(value, list):
            return [self.future(item) for item in value]
        return value


async def test_unknown_response_fields_never_break_parsing(control_plane: FastAPI) -> None:
    transport = httpx.ASGITransport(app=FutureServer(control_plane))
    async with AsyncCloudApiClient(ASGI_URL, ADMIN_TOKEN, transport=transport) as client:
        me = await client.me()
        assert me.model_extra == {"fromTheFuture": {"nested": [1, 2]}}
        assert me.token.model_extra == {"fromTheFuture": {"nested": [1, 2]}}
        base = BaseModelTarget(base_model=BASE_MODEL)
        known = await client.create_deployment(SCOPE, slug="known", target=base)
        menu = await client.create_deployment(SCOPE, slug="menu", target=base)
        assert isinstance(known.target, BaseModelTarget) and known.target.base_model == BASE_MODEL
        assert menu.target == {"kind": "model_menu"}
        listed = await client.list_deployments(SCOPE)
        assert [d.slug for d in listed] == ["known", "menu"]
        assert all(isinstance(d, Deployment) for d in listed)
        key = await client.create_deployment_key(known.id, SCOPE, label="k")
        assert key.model_extra is not None and "fromTheFuture" in key.model_extra
        assert (await client.list_deployment_keys(known.id, SCOPE))[0].id == key.id


def test_bad_request_bodies_are_the_servers_to_judge() -> None:
    """The client sends what it is given; a target kind it does not know goes out as posted."""
    call = calls.create_deployment(SCOPE, slug="x", target={"kind": "model_menu"})
    assert call.json == {"slug": "x", "target": {"kind": "model_menu"}}
    typed = calls.update_deployment("d", SCOPE, target=AdapterTarget(adapter=FinalAdapterRef(job_id="j")))
    assert typed.json == {"target": {"kind": "adapter", "adapter": {"kind": "final", "jobId": "j"}}}
    assert calls.update_engine("e").json == {}
    assert calls.update_engine("e", api_key=None, adapter_root=None).json == {
        "apiKey": None,
        "adapterRoot": None,
    }
    assert calls.roll_deployment_key("d", "k", SCOPE).json == {}
