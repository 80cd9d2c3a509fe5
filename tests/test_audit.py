"""`GET /v1/audit-events`: shape, newest first, filters, limit, and org confinement."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
from fastapi import FastAPI

from lorry import keys
from tests.conftest import ADMIN_TOKEN, RowCounter, client_for
from tests.test_tenancy import assert_error, make_org

EVENT_FIELDS = {"id", "orgId", "actorTokenId", "action", "resourceType", "resourceId", "details", "createdAt"}


async def events(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/audit-events", params=params)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"events"}
    found: list[dict[str, Any]] = response.json()["events"]
    return found


async def test_events_are_listed_newest_first_with_their_shape(admin: httpx.AsyncClient) -> None:
    me = (await admin.get("/v1/me")).json()["token"]
    assert await events(admin) == []
    org = await make_org(admin)
    await asyncio.sleep(0.01)
    project = (
        await admin.post("/v1/projects", params={"orgSlug": "acme"}, json={"slug": "p1", "name": "P"})
    ).json()
    await asyncio.sleep(0.01)
    token = (await admin.post("/v1/admin-tokens", json={"label": "t", "kind": "install"})).json()["token"]

    listed = await events(admin)
    assert [e["action"] for e in listed] == ["admin_token.create", "project.create", "org.create"]
    for event in listed:
        assert set(event) == EVENT_FIELDS
        assert event["actorTokenId"] == me["id"]
        assert datetime.fromisoformat(event["createdAt"]) <= datetime.now(UTC)
        assert event["createdAt"].endswith("Z") and len(event["createdAt"]) == len("2025-01-01T00:00:00.000Z")
    stamps = [e["createdAt"] for e in listed]
    assert stamps == sorted(stamps, reverse=True)
    assert listed[0]["resourceType"] == "admin_token" and listed[0]["resourceId"] == token["id"]
    assert listed[0]["orgId"] is None  # install-level event
    assert listed[1]["resourceId"] == project["project"]["id"] and listed[1]["orgId"] == org["id"]
    assert listed[2]["resourceType"] == "org" and listed[2]["orgId"] == org["id"]
    assert token["plaintext"] not in json.dumps(listed)


async def test_filters_and_limit(admin: httpx.AsyncClient) -> None:
    for slug in ("o1", "o2", "o3"):
        await make_org(admin, slug, slug.upper())
        await asyncio.sleep(0.01)
    await admin.post("/v1/projects", params={"orgSlug": "o2"}, json={"slug": "p1", "name": "P"})
    everything = await events(admin)
    assert len(everything) == 4

    orgs_only = await events(admin, action="org.create")
    assert [e["details"]["slug"] for e in orgs_only] == ["o3", "o2", "o1"]
    assert await events(admin, action="nothing.happened") == []

    assert [e["id"] for e in await events(admin, limit=1)] == [everything[0]["id"]]
    assert [e["id"] for e in await events(admin, limit=2)] == [e["id"] for e in everything[:2]]
    assert len(await events(admin, limit=500)) == 4

    # since is inclusive: from the second org's event on.
    o2_created = next(e for e in orgs_only if e["details"]["slug"] == "o2")["createdAt"]
    recent = await events(admin, since=o2_created)
    assert [e["action"] for e in recent] == ["project.create", "org.create", "org.create"]
    assert [e["details"].get("slug") for e in recent] == ["p1", "o3", "o2"]
    assert [e["details"]["slug"] for e in await events(admin, since=o2_created, action="org.create")] == [
        "o3",
        "o2",
    ]
    # The same instant with an offset, and without one (read as UTC).
    instant = datetime.fromisoformat(o2_created)
    assert len(await events(admin, since=instant.astimezone(timezone(timedelta(hours=2))).isoformat())) == 3
    assert len(await events(admin, since=instant.replace(tzinfo=None).isoformat())) == 3
    future = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert await events(admin, since=future) == []

    # Org filter.
    o2 = await events(admin, orgSlug="o2")
    assert sorted(e["action"] for e in o2) == ["org.create", "project.create"]
    assert_error(await admin.get("/v1/audit-events", params={"orgSlug": "nope"}), 404, "org_not_found")


async def test_bad_parameters_are_400(admin: httpx.AsyncClient, rows: RowCounter) -> None:
    await make_org(admin)
    before = await rows.snapshot()
    for params in (
        {"limit": "0"},
        {"limit": "501"},
        {"limit": "ten"},
        {"limit": "1.5"},
        {"since": "yesterday"},
        {"since": "2025-13-01T00:00:00Z"},
        {"since": ""},
        {"action": "a" * 61},
    ):
        assert_error(await admin.get("/v1/audit-events", params=params), 400, "invalid_request")
    assert await rows.snapshot() == before


async def test_org_tokens_see_only_their_org(admin: httpx.AsyncClient, control_plane: FastAPI) -> None:
    acme = await make_org(admin)
    await make_org(admin, "other", "Other")
    created = await admin.post("/v1/admin-tokens", json={"label": "acme", "kind": "org", "orgSlug": "acme"})
    acme_token = created.json()["token"]
    await admin.post("/v1/projects", params={"orgSlug": "other"}, json={"slug": "p1", "name": "P"})
    async with client_for(control_plane, acme_token["plaintext"]) as client:
        await client.post("/v1/projects", params={"orgSlug": "acme"}, json={"slug": "mine", "name": "Mine"})
        # orgSlug defaults to the token's own org.
        own = await events(client)
        assert own == await events(client, orgSlug="acme")
        assert [(e["action"], e["orgId"]) for e in own] == [
            ("project.create", acme["id"]),
            ("admin_token.create", acme["id"]),
            ("org.create", acme["id"]),
        ]
        assert own[0]["actorTokenId"] == acme_token["id"]
        for slug in ("other", "default", "no-such-org"):
            assert_error(await client.get("/v1/audit-events", params={"orgSlug": slug}), 403, "forbidden")
    # The install token sees everything, install-level and other orgs' events included.
    assert len(await events(admin)) == 5


async def test_audit_requires_a_valid_token(anonymous: httpx.AsyncClient, control_plane: FastAPI) -> None:
    assert_error(await anonymous.get("/v1/audit-events"), 401, "unauthorized")
    async with client_for(control_plane, keys.issue(keys.TokenKind.ADMIN_TOKEN).plaintext) as client:
        assert_error(await client.get("/v1/audit-events"), 401, "unauthorized")
    async with client_for(control_plane, ADMIN_TOKEN) as client:
        assert (await client.get("/v1/audit-events")).status_code == 200
