"""`/v1/endpoints`: create, list, get, update and soft-delete deployments; targets, status, scope."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.app import create_app
from control_plane.bootstrap import admin_token_row
from lorry import keys
from lorry.db.models import (
    Adapter,
    AuditEvent,
    ChangeLogEntry,
    Deployment,
    DeploymentKey,
    Engine,
    Job,
    Organization,
    Project,
)
from lorry.db.types import utcnow
from lorry.settings import LorrySettings
from tests.conftest import ADMIN_TOKEN, DEFAULT_SCOPE, RowCounter, client_for

DEPLOYMENT_FIELDS = {
    "id",
    "slug",
    "orgId",
    "projectId",
    "target",
    "authMode",
    "urlFormat",
    "enabled",
    "customDomain",
    "runRetentionMode",
    "runRetentionDays",
    "createdAt",
    "updatedAt",
    "baseUrl",
    "status",
}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
BASE = "acme/base-7b"
DIGEST = "ab" * 32

SessionMaker = async_sessionmaker[AsyncSession]


# --- helpers shared with the other deployment test modules -------------------------------------


def base_target(model: str = BASE) -> dict[str, Any]:
    return {"kind": "base_model", "baseModel": model}


def final_target(job_id: str) -> dict[str, Any]:
    return {"kind": "adapter", "adapter": {"kind": "final", "jobId": job_id}}


def checkpoint_target(job_id: str, step: Any) -> dict[str, Any]:
    return {"kind": "adapter", "adapter": {"kind": "checkpoint", "jobId": job_id, "step": step}}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "code"}, body
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"]
    return body


async def create(
    client: httpx.AsyncClient, slug: str, target: dict[str, Any] | None = None, **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        "/v1/endpoints", params=DEFAULT_SCOPE, json={"slug": slug, "target": target or base_target(), **extra}
    )
    assert response.status_code == 201, response.text
    deployment: dict[str, Any] = response.json()["deployment"]
    return deployment


async def get(client: httpx.AsyncClient, deployment_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/endpoints/{deployment_id}", params=DEFAULT_SCOPE)
    assert response.status_code == 200, response.text
    deployment: dict[str, Any] = response.json()["deployment"]
    return deployment


async def patch(client: httpx.AsyncClient, deployment_id: str, **body: Any) -> dict[str, Any]:
    response = await client.patch(f"/v1/endpoints/{deployment_id}", params=DEFAULT_SCOPE, json=body)
    assert response.status_code == 200, response.text
    deployment: dict[str, Any] = response.json()["deployment"]
    return deployment


async def default_project(sessionmaker: SessionMaker) -> Project:
    async with sessionmaker() as session:
        return (
            await session.execute(
                select(Project)
                .join(Organization, Organization.id == Project.org_id)
                .where(Organization.slug == "default", Project.slug == "default")
            )
        ).scalar_one()


async def make_job(
    sessionmaker: SessionMaker,
    *,
    model: str | None = BASE,
    final_rank: int | None = 8,
    checkpoints: Sequence[int] = (),
    checkpoint_rank: int = 8,
    adapter_base_model: str | None = None,
    project: Project | None = None,
) -> dict[str, str]:
    """A job with its adapter rows, inserted directly; returns {"job": id, "final": id, "step-N": id}."""
    project = project or await default_project(sessionmaker)
    async with sessionmaker() as session:
        job = Job(org_id=project.org_id, project_id=project.id, name="job", model=model, status="completed")
        session.add(job)
        await session.flush()
        ids = {"job": job.id}
        rows: list[tuple[str, str, int | None, int]] = []
        if final_rank is not None:
            rows.append(("final", "final", None, final_rank))
        rows += [(f"step-{step}", "checkpoint", step, checkpoint_rank) for step in checkpoints]
        for name, kind, step, rank in rows:
            adapter = Adapter(
                job_id=job.id,
                kind=kind,
                step=step,
                digest=DIGEST,
                rank=rank,
                target_modules=["q_proj", "v_proj"],
                base_model=adapter_base_model,
            )
            session.add(adapter)
            await session.flush()
            ids[name] = adapter.id
        await session.commit()
    return ids


async def add_engine(
    sessionmaker: SessionMaker, *, base_model: str = BASE, max_lora_rank: int = 16, enabled: bool = True
) -> str:
    async with sessionmaker() as session:
        engine = Engine(
            name=f"engine-{utcnow().timestamp()}",
            url="http://127.0.0.1:9",
            base_model=base_model,
            served_model_name=base_model,
            adapter_root="/adapters",
            max_lora_rank=max_lora_rank,
            enabled=enabled,
        )
        session.add(engine)
        await session.commit()
        return engine.id


async def count(sessionmaker: SessionMaker, model: Any, *where: Any) -> int:
    async with sessionmaker() as session:
        return int(
            (await session.execute(select(func.count()).select_from(model).where(*where))).scalar_one()
        )


async def audit_actions(sessionmaker: SessionMaker) -> list[tuple[str, str, dict[str, Any]]]:
    async with sessionmaker() as session:
        rows = (await session.execute(select(AuditEvent).order_by(AuditEvent.created_at))).scalars().all()
        return [(row.action, row.resource_id, row.details) for row in rows]


async def make_org_token(sessionmaker: SessionMaker, org_slug: str) -> tuple[str, Organization, Project]:
    """A new org with one project and an org-kind admin token for it (rows inserted directly)."""
    plaintext = keys.issue(keys.TokenKind.ADMIN_TOKEN).plaintext
    async with sessionmaker() as session:
        org = Organization(slug=org_slug, name=org_slug)
        session.add(org)
        await session.flush()
        project = Project(org_id=org.id, slug="main", name="Main")
        session.add(project)
        session.add(admin_token_row(plaintext, kind="org", org_id=org.id, label=f"{org_slug} ops"))
        await session.commit()
    return plaintext, org, project


# --- tests -------------------------------------------------------------------------------------


async def test_base_model_lifecycle(
    admin: httpx.AsyncClient, sessionmaker: SessionMaker, settings: LorrySettings
) -> None:
    project = await default_project(sessionmaker)
    listed = await admin.get("/v1/endpoints", params=DEFAULT_SCOPE)
    assert listed.status_code == 200 and listed.json() == {"deployments": []}

    response = await admin.post(
        "/v1/endpoints", params=DEFAULT_SCOPE, json={"slug": "my-model", "target": base_target()}
    )
    assert response.status_code == 201, response.text
    assert set(response.json()) == {"deployment"}
    created = response.json()["deployment"]
    assert set(created) == DEPLOYMENT_FIELDS
    assert created["slug"] == "my-model"
    assert created["orgId"] == project.org_id and created["projectId"] == project.id
    assert created["target"] == base_target()
    assert created["authMode"] == "fixed_api_key" and created["urlFormat"] == "openai_compat"
    assert created["enabled"] is True and created["customDomain"] is None
    assert (created["runRetentionMode"], created["runRetentionDays"]) == ("days", 7)
    assert created["baseUrl"] == settings.public_url("my-model") == "https://my-model.lorry.test/v1"
    assert created["status"] == "no_engine"
    assert TIMESTAMP.fullmatch(created["createdAt"]) and created["createdAt"] == created["updatedAt"]

    assert await get(admin, created["id"]) == created
    listed = await admin.get("/v1/endpoints", params=DEFAULT_SCOPE)
    assert listed.json() == {"deployments": [created]}

    await asyncio.sleep(0.002)
    patched = await patch(admin, created["id"], enabled=False, authMode="none")
    assert patched["enabled"] is False and patched["authMode"] == "none"
    assert patched["createdAt"] == created["createdAt"] and patched["updatedAt"] > created["updatedAt"]
    assert {k: v for k, v in patched.items() if k not in ("enabled", "authMode", "updatedAt")} == {
        k: v for k, v in created.items() if k not in ("enabled", "authMode", "updatedAt")
    }
    assert await get(admin, created["id"]) == patched

    deleted = await admin.delete(f"/v1/endpoints/{created['id']}", params=DEFAULT_SCOPE)
    assert deleted.status_code == 204 and deleted.content == b""
    for method in ("GET", "DELETE"):
        response = await admin.request(method, f"/v1/endpoints/{created['id']}", params=DEFAULT_SCOPE)
        assert_error(response, 404, "deployment_not_found")
    response = await admin.patch(
        f"/v1/endpoints/{created['id']}", params=DEFAULT_SCOPE, json={"enabled": True}
    )
    assert_error(response, 404, "deployment_not_found")
    assert (await admin.get("/v1/endpoints", params=DEFAULT_SCOPE)).json() == {"deployments": []}

    # The row stays, with its slug, deleted.
    async with sessionmaker() as session:
        row = (await session.execute(select(Deployment).where(Deployment.id == created["id"]))).scalar_one()
        assert row.deleted_at is not None and row.slug == "my-model"
    response = await admin.post(
        "/v1/endpoints", params=DEFAULT_SCOPE, json={"slug": "my-model", "target": base_target()}
    )
    assert_error(response, 409, "slug_taken")


async def test_adapter_targets_are_resolved(admin: httpx.AsyncClient, sessionmaker: SessionMaker) -> None:
    ids = await make_job(sessionmaker, checkpoints=[100, 200])
    final = await create(admin, "final-dep", final_target(ids["job"]))
    assert final["target"] == final_target(ids["job"])
    checkpoint = await create(admin, "ckpt-dep", checkpoint_target(ids["job"], 200))
    assert checkpoint["target"] == checkpoint_target(ids["job"], 200)
    base = await create(admin, "base-dep", base_target("other/model"))
    async with sessionmaker() as session:
        rows = {row.slug: row for row in (await session.execute(select(Deployment))).scalars().all()}
    assert (rows["final-dep"].target_kind, rows["final-dep"].job_id, rows["final-dep"].adapter_id) == (
        "adapter",
        ids["job"],
        ids["final"],
    )
    assert rows["final-dep"].base_model == BASE
    assert rows["ckpt-dep"].adapter_id == ids["step-200"] and rows["ckpt-dep"].job_id == ids["job"]
    assert (rows["base-dep"].target_kind, rows["base-dep"].job_id, rows["base-dep"].adapter_id) == (
        "base_model",
        None,
        None,
    )
    assert rows["base-dep"].base_model == "other/model"
    assert rows["final-dep"].target == final_target(ids["job"])
    assert base["target"] == base_target("other/model")

    # Re-target: same id, slug and URL; the resolved columns follow.
    retargeted = await patch(admin, final["id"], target=checkpoint_target(ids["job"], 100))
    assert retargeted["target"] == checkpoint_target(ids["job"], 100)
    assert (retargeted["id"], retargeted["slug"], retargeted["baseUrl"]) == (
        final["id"],
        final["slug"],
        final["baseUrl"],
    )
    async with sessionmaker() as session:
        row = (await session.execute(select(Deployment).where(Deployment.id == final["id"]))).scalar_one()
        assert row.adapter_id == ids["step-100"]
    to_base = await patch(admin, final["id"], target=base_target())
    assert to_base["target"] == base_target()
    async with sessionmaker() as session:
        row = (await session.execute(select(Deployment).where(Deployment.id == final["id"]))).scalar_one()
        assert (row.target_kind, row.job_id, row.adapter_id, row.base_model) == (
            "base_model",
            None,
            None,
            BASE,
        )


async def test_missing_jobs_and_adapters(
    admin: httpx.AsyncClient, sessionmaker: SessionMaker, rows: RowCounter
) -> None:
    no_final = await make_job(sessionmaker, final_rank=None, checkpoints=[10])
    with_final = await make_job(sessionmaker)
    _token, _org, other_project = await make_org_token(sessionmaker, "other-org")
    foreign = await make_job(sessionmaker, project=other_project)
    unknown_job = "00000000-0000-4000-8000-000000000000"
    before = await rows.snapshot()
    cases = [
        (final_target(no_final["job"]), "adapter_not_found"),
        (checkpoint_target(no_final["job"], 11), "adapter_not_found"),
        (checkpoint_target(with_final["job"], 10), "adapter_not_found"),
        (final_target(unknown_job), "job_not_found"),
        (final_target("not-a-uuid"), "job_not_found"),
        (final_target("\u0000"), "job_not_found"),
        (final_target(foreign["job"]), "job_not_found"),
    ]
    for target, code in cases:
        response = await admin.post(
            "/v1/endpoints", params=DEFAULT_SCOPE, json={"slug": "missing", "target": target}
        )
        assert_error(response, 404, code)
    assert await rows.snapshot() == before

    # PATCH re-targets are resolved the same way, and a failed one changes nothing.
    deployment = await create(admin, "retarget", checkpoint_target(no_final["job"], 10))
    before = await rows.snapshot()
    for target, code in cases:
        response = await admin.patch(
            f"/v1/endpoints/{deployment['id']}", params=DEFAULT_SCOPE, json={"target": target}
        )
        assert_error(response, 404, code)
    assert await rows.snapshot() == before
    assert await get(admin, deployment["id"]) == deployment


async def test_status_follows_the_engines(admin: httpx.AsyncClient, sessionmaker: SessionMaker) -> None:
    ids = await make_job(sessionmaker, final_rank=32, checkpoints=[5], checkpoint_rank=8)
    # A job without `model` falls back to the adapter's base model.
    fallback = await make_job(sessionmaker, model=None, adapter_base_model="acme/fallback", final_rank=8)
    final = await create(admin, "rank-32", final_target(ids["job"]))
    checkpoint = await create(admin, "rank-8", checkpoint_target(ids["job"], 5))
    base = await create(admin, "base", base_target())
    other_base = await create(admin, "fallback", final_target(fallback["job"]))

    async def statuses() -> dict[str, str]:
        response = await admin.get("/v1/endpoints", params=DEFAULT_SCOPE)
        return {d["slug"]: d["status"] for d in response.json()["deployments"]}

    assert await statuses() == dict.fromkeys(("rank-32", "rank-8", "base", "fallback"), "no_engine")

    engine_id = await add_engine(sessionmaker, max_lora_rank=16)
    assert await statuses() == {
        "rank-32": "no_engine",
        "rank-8": "ready",
        "base": "ready",
        "fallback": "no_engine",
    }
    assert (await get(admin, checkpoint["id"]))["status"] == "ready"
    assert (await get(admin, final["id"]))["status"] == "no_engine"

    async with sessionmaker() as session:
        await session.execute(update(Engine).where(Engine.id == engine_id).values(max_lora_rank=64))
        await session.commit()
    assert await statuses() == {
        "rank-32": "ready",
        "rank-8": "ready",
        "base": "ready",
        "fallback": "no_engine",
    }

    # The engine's rank shrinks below the adapters': back to no_engine (base models need no rank).
    async with sessionmaker() as session:
        await session.execute(update(Engine).where(Engine.id == engine_id).values(max_lora_rank=4))
        await session.commit()
    assert await statuses() == {
        "rank-32": "no_engine",
        "rank-8": "no_engine",
        "base": "ready",
        "fallback": "no_engine",
    }

    # A disabled engine serves nothing.
    async with sessionmaker() as session:
        await session.execute(update(Engine).where(Engine.id == engine_id).values(enabled=False))
        await session.commit()
    assert set((await statuses()).values()) == {"no_engine"}

    await add_engine(sessionmaker, base_model="acme/fallback", max_lora_rank=8)
    assert (await get(admin, other_base["id"]))["status"] == "ready"
    assert (await get(admin, base["id"]))["status"] == "no_engine"


async def test_static_engines_count_for_status(
    control_plane: FastAPI, sessionmaker: SessionMaker, settings: LorrySettings
) -> None:
    static = settings.model_copy(
        update={"engines": [{"name": "static-one", "url": "http://127.0.0.1:9", "baseModel": BASE}]}
    )
    app = create_app(static)
    async with app.router.lifespan_context(app), client_for(app, ADMIN_TOKEN) as client:
        deployment = await create(client, "static-served")
        assert deployment["status"] == "ready"


async def test_retention_rules(admin: httpx.AsyncClient, rows: RowCounter) -> None:
    cases_ok: list[tuple[dict[str, Any], tuple[str, int | None]]] = [
        ({}, ("days", 7)),
        ({"runRetentionMode": "unlimited"}, ("unlimited", None)),
        ({"runRetentionMode": "disabled", "runRetentionDays": None}, ("disabled", None)),
        ({"runRetentionMode": "days", "runRetentionDays": 30}, ("days", 30)),
        ({"runRetentionDays": 14}, ("days", 14)),
        ({"runRetentionMode": "days", "runRetentionDays": 3650}, ("days", 3650)),
    ]
    for index, (extra, expected) in enumerate(cases_ok):
        deployment = await create(admin, f"retention-{index}", **extra)
        assert (deployment["runRetentionMode"], deployment["runRetentionDays"]) == expected, extra

    before = await rows.snapshot()
    for extra in (
        {"runRetentionMode": "days"},
        {"runRetentionMode": "days", "runRetentionDays": None},
        {"runRetentionMode": "unlimited", "runRetentionDays": 7},
        {"runRetentionMode": "disabled", "runRetentionDays": 1},
        {"runRetentionDays": 0},
        {"runRetentionDays": -3},
        {"runRetentionDays": 3651},
        {"runRetentionDays": 7.0},
        {"runRetentionMode": "weekly"},
        {"runRetentionMode": None},
    ):
        response = await admin.post(
            "/v1/endpoints",
            params=DEFAULT_SCOPE,
            json={"slug": "bad-retention", "target": base_target(), **extra},
        )
        assert_error(response, 400, "invalid_request")
    assert await rows.snapshot() == before


async def test_retention_on_patch(admin: httpx.AsyncClient, rows: RowCounter) -> None:
    deployment = await create(admin, "retained")
    dep_id = deployment["id"]
    path = f"/v1/endpoints/{dep_id}"

    changed = await patch(admin, dep_id, runRetentionDays=30)  # the stored mode is `days`
    assert (changed["runRetentionMode"], changed["runRetentionDays"]) == ("days", 30)

    before = await rows.snapshot()
    for body in (
        {"runRetentionMode": "days"},  # days without runRetentionDays, even though some are stored
        {"runRetentionDays": None},  # the mode is `days`: days may not be cleared
        {"runRetentionMode": "unlimited", "runRetentionDays": 30},
        {"runRetentionMode": None},
    ):
        assert_error(await admin.patch(path, params=DEFAULT_SCOPE, json=body), 400, "invalid_request")
    assert await rows.snapshot() == before

    # A mode other than `days` clears the stored days.
    unlimited = await patch(admin, dep_id, runRetentionMode="unlimited")
    assert (unlimited["runRetentionMode"], unlimited["runRetentionDays"]) == ("unlimited", None)
    before = await rows.snapshot()
    response = await admin.patch(path, params=DEFAULT_SCOPE, json={"runRetentionDays": 5})
    error = assert_error(response, 400, "invalid_request")
    assert "unlimited" in error["error"]
    assert await rows.snapshot() == before
    # Null days with a non-`days` mode is consistent and changes nothing.
    assert (await patch(admin, dep_id, runRetentionDays=None))["updatedAt"] == unlimited["updatedAt"]

    disabled = await patch(admin, dep_id, runRetentionMode="disabled", runRetentionDays=None)
    assert (disabled["runRetentionMode"], disabled["runRetentionDays"]) == ("disabled", None)
    days = await patch(admin, dep_id, runRetentionMode="days", runRetentionDays=3)
    assert (days["runRetentionMode"], days["runRetentionDays"]) == ("days", 3)


async def test_patch_semantics(
    admin: httpx.AsyncClient, sessionmaker: SessionMaker, rows: RowCounter
) -> None:
    deployment = await create(admin, "patchable")
    path = f"/v1/endpoints/{deployment['id']}"
    key = await admin.post(f"{path}/keys", params=DEFAULT_SCOPE, json={"label": "app"})
    assert key.status_code == 201

    before = await rows.snapshot()
    for slug in ("renamed", "patchable", 5):
        body = assert_error(
            await admin.patch(path, params=DEFAULT_SCOPE, json={"slug": slug}), 400, "immutable_field"
        )
        assert "slug" in body["error"]
    assert_error(
        await admin.patch(path, params=DEFAULT_SCOPE, json={"slug": "renamed", "enabled": False}),
        400,
        "immutable_field",
    )
    # An empty body and a body that repeats the current values change nothing and write nothing.
    assert await patch(admin, deployment["id"]) == deployment
    same = await patch(
        admin,
        deployment["id"],
        target=base_target(),
        authMode="fixed_api_key",
        enabled=True,
        runRetentionMode="days",
        runRetentionDays=7,
    )
    assert same == deployment
    assert await rows.snapshot() == before

    await asyncio.sleep(0.002)
    retargeted = await patch(admin, deployment["id"], target=base_target("acme/other"))
    assert retargeted["updatedAt"] > deployment["updatedAt"]
    assert (retargeted["id"], retargeted["slug"]) == (deployment["id"], "patchable")
    keys_after = (await admin.get(f"{path}/keys", params=DEFAULT_SCOPE)).json()["keys"]
    assert [k["id"] for k in keys_after] == [key.json()["key"]["id"]] and keys_after[0]["enabled"] is True


async def test_every_write_logs_one_change_and_one_audit_event(
    admin: httpx.AsyncClient, sessionmaker: SessionMaker
) -> None:
    async def counts() -> tuple[int, int]:
        return await count(sessionmaker, ChangeLogEntry), await count(sessionmaker, AuditEvent)

    start = await counts()
    deployment = await create(admin, "audited")
    assert await counts() == (start[0] + 1, start[1] + 1)
    await patch(admin, deployment["id"], enabled=False, runRetentionMode="unlimited")
    assert await counts() == (start[0] + 2, start[1] + 2)
    response = await admin.delete(f"/v1/endpoints/{deployment['id']}", params=DEFAULT_SCOPE)
    assert response.status_code == 204
    assert await counts() == (start[0] + 3, start[1] + 3)

    async with sessionmaker() as session:
        changes = (
            (await session.execute(select(ChangeLogEntry).order_by(ChangeLogEntry.seq.desc()).limit(3)))
            .scalars()
            .all()
        )
    assert [(c.kind, c.resource_id) for c in changes] == [("deployment", deployment["id"])] * 3
    events = [(a, r, d) for a, r, d in await audit_actions(sessionmaker) if r == deployment["id"]]
    assert [a for a, _r, _d in events] == ["deployment.create", "deployment.update", "deployment.delete"]
    assert events[0][2]["slug"] == "audited"
    assert sorted(events[1][2]["changed"]) == ["enabled", "runRetentionDays", "runRetentionMode"]
    assert events[2][2] == {"slug": "audited", "revokedKeys": 0}
    async with sessionmaker() as session:
        actors = (await session.execute(select(AuditEvent.actor_token_id).distinct())).scalars().all()
    assert len(actors) == 1 and actors[0] is not None


async def test_delete_revokes_keys_and_releases_the_job(
    admin: httpx.AsyncClient, sessionmaker: SessionMaker
) -> None:
    ids = await make_job(sessionmaker)
    deployment = await create(admin, "doomed", final_target(ids["job"]))
    path = f"/v1/endpoints/{deployment['id']}"
    for label in ("one", "two"):
        assert (
            await admin.post(f"{path}/keys", params=DEFAULT_SCOPE, json={"label": label})
        ).status_code == 201
    changes_before = await count(sessionmaker, ChangeLogEntry)
    assert (await admin.delete(path, params=DEFAULT_SCOPE)).status_code == 204
    # One change for the deployment and one per revoked key, so gateways drop them all.
    assert await count(sessionmaker, ChangeLogEntry) == changes_before + 3
    assert await count(sessionmaker, DeploymentKey, DeploymentKey.revoked_at.is_(None)) == 0
    assert_error(await admin.get(f"{path}/keys", params=DEFAULT_SCOPE), 404, "deployment_not_found")
    async with sessionmaker() as session:
        row = (
            await session.execute(select(Deployment).where(Deployment.id == deployment["id"]))
        ).scalar_one()
        assert row.target == final_target(ids["job"])
        assert row.job_id is None and row.adapter_id is None
        # Nothing pins the job any more: its rows can go.
        await session.execute(text("DELETE FROM adapters WHERE job_id = :id"), {"id": ids["job"]})
        await session.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": ids["job"]})
        await session.commit()


async def test_slugs_are_unique_across_the_install(
    admin: httpx.AsyncClient, control_plane: FastAPI, sessionmaker: SessionMaker
) -> None:
    await create(admin, "shared-name")
    token, _org, _project = await make_org_token(sessionmaker, "acme")
    scope = {"orgSlug": "acme", "projectSlug": "main"}
    async with client_for(control_plane, token) as acme:
        response = await acme.post(
            "/v1/endpoints", params=scope, json={"slug": "shared-name", "target": base_target()}
        )
        body = assert_error(response, 409, "slug_taken")
        assert "shared-name" in body["error"]
        response = await acme.post(
            "/v1/endpoints", params=scope, json={"slug": "acme-one", "target": base_target()}
        )
        assert response.status_code == 201
        acme_id = response.json()["deployment"]["id"]
        assert (await acme.delete(f"/v1/endpoints/{acme_id}", params=scope)).status_code == 204
    # Deleted in another org, still never reused.
    response = await admin.post(
        "/v1/endpoints", params=DEFAULT_SCOPE, json={"slug": "acme-one", "target": base_target()}
    )
    assert_error(response, 409, "slug_taken")


async def test_concurrent_creates_of_one_slug(admin: httpx.AsyncClient, sessionmaker: SessionMaker) -> None:
    responses = await asyncio.gather(
        *(
            admin.post("/v1/endpoints", params=DEFAULT_SCOPE, json={"slug": "racy", "target": base_target()})
            for _ in range(5)
        )
    )
    assert sorted(r.status_code for r in responses) == [201, 409, 409, 409, 409]
    for response in responses:
        if response.status_code == 409:
            assert_error(response, 409, "slug_taken")
    assert await count(sessionmaker, Deployment, Deployment.slug == "racy") == 1
    assert await count(sessionmaker, AuditEvent, AuditEvent.action == "deployment.create") == 1


async def test_unique_index_decides_a_race(
    admin: httpx.AsyncClient, sessionmaker: SessionMaker, backend: str
) -> None:
    """Both creates pass the slug check; the second waits on the unique index, then gets 409."""
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer through one connection: the check cannot race there")
    project = await default_project(sessionmaker)
    async with sessionmaker() as holder:
        holder.add(
            Deployment(
                org_id=project.org_id,
                project_id=project.id,
                slug="contested",
                target=base_target(),
                target_kind="base_model",
                base_model=BASE,
            )
        )
        await holder.flush()  # inserted, not committed: invisible to the request's slug check
        request = asyncio.create_task(
            admin.post(
                "/v1/endpoints", params=DEFAULT_SCOPE, json={"slug": "contested", "target": base_target()}
            )
        )
        async with sessionmaker() as observer:
            for _ in range(3000):
                # pg_stat_activity is a snapshot taken once per transaction: take a fresh one.
                await observer.execute(text("SELECT pg_stat_clear_snapshot()"))
                waiting = (
                    await observer.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                        )
                    )
                ).scalar_one()
                if waiting:
                    break
                await asyncio.sleep(0.01)
            assert waiting == 1, "the request never blocked on the unique index"
        await holder.commit()
    assert_error(await request, 409, "slug_taken")
    assert await count(sessionmaker, ChangeLogEntry, ChangeLogEntry.kind == "deployment") == 0


async def test_scope_and_tenancy(
    admin: httpx.AsyncClient, control_plane: FastAPI, sessionmaker: SessionMaker
) -> None:
    mine = await create(admin, "default-dep")
    token, org, project = await make_org_token(sessionmaker, "acme")
    acme_scope = {"orgSlug": "acme", "projectSlug": "main"}
    async with client_for(control_plane, token) as acme:
        # An org token in another org's scope: 403 on every route, whatever the id.
        for method, path in (
            ("GET", "/v1/endpoints"),
            ("POST", "/v1/endpoints"),
            ("GET", f"/v1/endpoints/{mine['id']}"),
            ("PATCH", f"/v1/endpoints/{mine['id']}"),
            ("DELETE", f"/v1/endpoints/{mine['id']}"),
            ("GET", f"/v1/endpoints/{mine['id']}/keys"),
            ("POST", f"/v1/endpoints/{mine['id']}/keys"),
        ):
            body = {"slug": "x-y", "target": base_target()} if path == "/v1/endpoints" else {"label": "x"}
            response = await acme.request(
                method, path, params=DEFAULT_SCOPE, json=body if method in ("POST", "PATCH") else None
            )
            assert_error(response, 403, "forbidden")

        # In its own scope it works, and ids from another project are 404 there.
        theirs = await acme.post(
            "/v1/endpoints", params=acme_scope, json={"slug": "acme-dep", "target": base_target()}
        )
        assert theirs.status_code == 201, theirs.text
        deployment = theirs.json()["deployment"]
        assert (deployment["orgId"], deployment["projectId"]) == (org.id, project.id)
        assert_error(
            await acme.get(f"/v1/endpoints/{mine['id']}", params=acme_scope), 404, "deployment_not_found"
        )
        listed = (await acme.get("/v1/endpoints", params=acme_scope)).json()["deployments"]
        assert [d["slug"] for d in listed] == ["acme-dep"]

    # The install token sees acme's deployment only in acme's scope.
    assert_error(
        await admin.get(f"/v1/endpoints/{deployment['id']}", params=DEFAULT_SCOPE),
        404,
        "deployment_not_found",
    )
    assert_error(
        await admin.delete(f"/v1/endpoints/{deployment['id']}", params=DEFAULT_SCOPE),
        404,
        "deployment_not_found",
    )
    assert (await admin.get(f"/v1/endpoints/{deployment['id']}", params=acme_scope)).status_code == 200
    listed = (await admin.get("/v1/endpoints", params=DEFAULT_SCOPE)).json()["deployments"]
    assert [d["slug"] for d in listed] == ["default-dep"]

    # Scope is required, and must exist.
    assert_error(await admin.get("/v1/endpoints"), 400, "scope_required")
    assert_error(await admin.get("/v1/endpoints", params={"orgSlug": "default"}), 400, "scope_required")
    assert_error(
        await admin.get("/v1/endpoints", params={"orgSlug": "default", "projectSlug": "nope"}),
        404,
        "project_not_found",
    )


async def test_list_order_and_timestamps(admin: httpx.AsyncClient) -> None:
    slugs = [f"ordered-{n}" for n in range(4)]
    for slug in slugs:
        await create(admin, slug)
    listed = (await admin.get("/v1/endpoints", params=DEFAULT_SCOPE)).json()["deployments"]
    assert [d["slug"] for d in listed] == slugs
    for deployment in listed:
        created = datetime.strptime(deployment["createdAt"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - created).total_seconds()) < 60


async def test_openapi_describes_the_routes(admin: httpx.AsyncClient) -> None:
    schema = (await admin.get("/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths["/v1/endpoints"]) == {"get", "post"}
    assert set(paths["/v1/endpoints/{deployment_id}"]) == {"get", "patch", "delete"}
    assert set(paths["/v1/endpoints/{deployment_id}/keys"]) == {"get", "post"}
    assert set(paths["/v1/endpoints/{deployment_id}/keys/{key_id}"]) == {"delete"}
    assert set(paths["/v1/endpoints/{deployment_id}/keys/{key_id}/roll"]) == {"post"}
    assert "201" in paths["/v1/endpoints"]["post"]["responses"]
    assert "204" in paths["/v1/endpoints/{deployment_id}"]["delete"]["responses"]
    assert "422" not in paths["/v1/endpoints"]["post"]["responses"]
    components = schema["components"]["schemas"]
    assert "slug" not in components["UpdateDeploymentRequest"]["properties"]
    create_props = components["CreateDeploymentRequest"]["properties"]
    assert create_props["slug"]["pattern"].endswith("[a-z0-9]$")
