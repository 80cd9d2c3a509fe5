"""`/v1/admin-tokens`: create, list, revoke, roll; scope, expiry, caching and lock-out protection."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.admin_tokens import service as admin_tokens_service
from control_plane.app import create_app
from control_plane.bootstrap import admin_token_row
from control_plane.context import AppContext
from control_plane.principal import Principal
from lorry import keys
from lorry.db.models import AdminToken, AuditEvent, ChangeLogEntry
from lorry.db.types import isoformat
from lorry.errors import Conflict
from lorry.settings import LorrySettings
from tests.conftest import ADMIN_TOKEN, RowCounter, client_for
from tests.test_tenancy import assert_error, make_org

TOKEN_FIELDS = {
    "id",
    "label",
    "prefix",
    "kind",
    "orgId",
    "orgSlug",
    "enabled",
    "createdAt",
    "lastUsedAt",
    "expiresAt",
}


async def create_token(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/admin-tokens", json=body)
    assert response.status_code == 201, response.text
    token: dict[str, Any] = response.json()["token"]
    return token


async def status_with(app: FastAPI, token: str, path: str = "/v1/me") -> int:
    async with client_for(app, token) as client:
        return (await client.get(path)).status_code


async def listed(client: httpx.AsyncClient, **params: str) -> dict[str, dict[str, Any]]:
    response = await client.get("/v1/admin-tokens", params=params)
    assert response.status_code == 200, response.text
    return {token["id"]: token for token in response.json()["tokens"]}


async def test_create_and_list_shapes(
    admin: httpx.AsyncClient, control_plane: FastAPI, rows: RowCounter
) -> None:
    org = await make_org(admin)
    before = await rows.snapshot()
    expires = datetime.now(UTC) + timedelta(days=30)
    install = await create_token(admin, label="ci", kind="install", expiresAt=expires.isoformat())
    assert set(install) == TOKEN_FIELDS | {"plaintext"}
    assert install["kind"] == "install" and install["orgId"] is None and install["orgSlug"] is None
    assert install["label"] == "ci" and install["enabled"] is True and install["lastUsedAt"] is None
    assert install["expiresAt"] == isoformat(expires)
    parsed = keys.parse(install["plaintext"])
    assert parsed is not None and parsed.kind is keys.TokenKind.ADMIN_TOKEN
    assert install["prefix"] == parsed.prefix and install["plaintext"].startswith(install["prefix"] + "_")

    scoped = await create_token(admin, label="  acme ops ", kind="org", orgSlug="acme")
    assert scoped["kind"] == "org" and scoped["orgId"] == org["id"] and scoped["orgSlug"] == "acme"
    assert scoped["label"] == "acme ops" and scoped["expiresAt"] is None

    after = await rows.snapshot()
    assert after["admin_tokens"] == before["admin_tokens"] + 2
    assert after["change_log"] == before["change_log"] + 2
    assert after["audit_events"] == before["audit_events"] + 2

    # Both work at once.
    assert await status_with(control_plane, install["plaintext"]) == 200
    assert await status_with(control_plane, scoped["plaintext"]) == 200

    tokens = await listed(admin)
    assert set(tokens) == {install["id"], scoped["id"], (await admin.get("/v1/me")).json()["token"]["id"]}
    for token in tokens.values():
        assert set(token) == TOKEN_FIELDS  # never a plaintext in a list
    assert tokens[install["id"]] == {k: v for k, v in install.items() if k != "plaintext"}
    assert tokens[scoped["id"]]["orgSlug"] == "acme"
    assert set(await listed(admin, orgSlug="acme")) == {scoped["id"]}
    assert set(await listed(admin, orgSlug="default")) == set()
    assert_error(await admin.get("/v1/admin-tokens", params={"orgSlug": "nope"}), 404, "org_not_found")

    # The audit trail and the raw rows never hold a plaintext or a secret.
    async with control_plane.state.ctx.sessionmaker() as session:
        events = (await session.execute(select(AuditEvent))).scalars().all()
        stored = (await session.execute(select(AdminToken))).scalars().all()
    dumped = json.dumps([e.details for e in events])
    for plaintext in (install["plaintext"], scoped["plaintext"], ADMIN_TOKEN):
        token_parts = keys.parse(plaintext)
        assert token_parts is not None
        assert token_parts.secret not in dumped
        assert all(token_parts.secret not in row.secret_hash for row in stored)
    create_events = [e for e in events if e.action == "admin_token.create"]
    assert {e.resource_id for e in create_events} == {install["id"], scoped["id"]}
    assert next(e for e in create_events if e.resource_id == scoped["id"]).org_id == org["id"]


async def test_org_token_powers(admin: httpx.AsyncClient, control_plane: FastAPI, rows: RowCounter) -> None:
    await make_org(admin)
    await make_org(admin, "other", "Other")
    acme_token = await create_token(admin, label="acme", kind="org", orgSlug="acme")
    other_token = await create_token(admin, label="other", kind="org", orgSlug="other")
    async with client_for(control_plane, acme_token["plaintext"]) as acme:
        own = await create_token(acme, label="acme 2", kind="org", orgSlug="acme")
        assert own["orgSlug"] == "acme"
        assert await status_with(control_plane, own["plaintext"]) == 200

        before = await rows.snapshot()
        assert_error(
            await acme.post("/v1/admin-tokens", json={"label": "x", "kind": "install"}), 403, "forbidden"
        )
        for slug in ("default", "other", "no-such-org"):
            response = await acme.post(
                "/v1/admin-tokens", json={"label": "x", "kind": "org", "orgSlug": slug}
            )
            assert_error(response, 403, "forbidden")
        assert await rows.snapshot() == before

        # Only its own org's org tokens, never install tokens or other orgs' tokens.
        assert set(await listed(acme)) == {acme_token["id"], own["id"]}
        assert set(await listed(acme, orgSlug="acme")) == {acme_token["id"], own["id"]}
        assert_error(await acme.get("/v1/admin-tokens", params={"orgSlug": "other"}), 403, "forbidden")

        # Tokens it cannot see are 404, like unknown ones: revoke and roll alike.
        bootstrap_id = (await admin.get("/v1/me")).json()["token"]["id"]
        for hidden in (bootstrap_id, other_token["id"]):
            assert_error(await acme.delete(f"/v1/admin-tokens/{hidden}"), 404, "token_not_found")
            assert_error(await acme.post(f"/v1/admin-tokens/{hidden}/roll", json={}), 404, "token_not_found")
        assert await rows.snapshot() == before
        assert await status_with(control_plane, other_token["plaintext"]) == 200

        # It may revoke a sibling in its own org.
        assert (await acme.delete(f"/v1/admin-tokens/{own['id']}")).status_code == 204
        assert await status_with(control_plane, own["plaintext"]) == 401


@pytest.mark.parametrize("token_id", ["00000000-0000-4000-8000-000000000000", "not-a-uuid", "x" * 300, "%20"])
async def test_unknown_or_malformed_ids_are_404(
    admin: httpx.AsyncClient, rows: RowCounter, token_id: str
) -> None:
    before = await rows.snapshot()
    assert_error(await admin.delete(f"/v1/admin-tokens/{token_id}"), 404, "token_not_found")
    assert_error(await admin.post(f"/v1/admin-tokens/{token_id}/roll", json={}), 404, "token_not_found")
    assert await rows.snapshot() == before


async def test_revoked_token_is_refused_at_once(
    admin: httpx.AsyncClient, ctx: AppContext, control_plane: FastAPI
) -> None:
    token = await create_token(admin, label="doomed", kind="install")
    async with client_for(control_plane, token["plaintext"]) as doomed:
        assert (await doomed.get("/v1/me")).status_code == 200
        verified = ctx.verifier.verifications
        assert (await doomed.get("/v1/me")).status_code == 200
        assert ctx.verifier.verifications == verified, "the second request must come from the cache"

        assert (await admin.delete(f"/v1/admin-tokens/{token['id']}")).status_code == 204
        # The cache entry was live (2 s TTL), yet the revoking process refuses the token at once.
        assert_error(await doomed.get("/v1/me"), 401, "unauthorized")

    tokens = await listed(admin)
    assert tokens[token["id"]]["enabled"] is False  # revoked tokens stay listed
    # Revoking again is a no-op that records nothing.
    events_before = len((await admin.get("/v1/audit-events")).json()["events"])
    assert (await admin.delete(f"/v1/admin-tokens/{token['id']}")).status_code == 204
    assert len((await admin.get("/v1/audit-events")).json()["events"]) == events_before
    assert_error(await admin.post(f"/v1/admin-tokens/{token['id']}/roll", json={}), 409, "token_inactive")


async def test_a_token_may_revoke_itself(admin: httpx.AsyncClient, control_plane: FastAPI) -> None:
    await make_org(admin)
    token = await create_token(admin, label="self", kind="org", orgSlug="acme")
    async with client_for(control_plane, token["plaintext"]) as client:
        assert (await client.get("/v1/me")).status_code == 200
        assert (await client.delete(f"/v1/admin-tokens/{token['id']}")).status_code == 204
        assert_error(await client.get("/v1/me"), 401, "unauthorized")
    events = (await admin.get("/v1/audit-events", params={"action": "admin_token.revoke"})).json()["events"]
    assert [(e["resourceId"], e["actorTokenId"]) for e in events] == [(token["id"], token["id"])]


async def test_another_process_refuses_a_revoked_token_after_its_cache_ttl(
    admin: httpx.AsyncClient, settings: LorrySettings
) -> None:
    token = await create_token(admin, label="shared", kind="install")
    second = create_app(settings)
    async with second.router.lifespan_context(second):
        assert await status_with(second, token["plaintext"]) == 200  # cached there now
        assert (await admin.delete(f"/v1/admin-tokens/{token['id']}")).status_code == 204
        started = time.monotonic()
        while await status_with(second, token["plaintext"]) == 200:
            assert time.monotonic() - started < 3.0, "the other process kept accepting a revoked token"
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        print(f"revocation reached the second process after {elapsed:.2f} s")
        assert elapsed <= 2.5


async def test_expired_tokens_are_refused(
    admin: httpx.AsyncClient, control_plane: FastAPI, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    expired = keys.issue(keys.TokenKind.ADMIN_TOKEN).plaintext
    async with sessionmaker() as session:
        row = admin_token_row(expired, kind="install", org_id=None, label="old")
        row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
        session.add(row)
        await session.commit()
        expired_id = row.id
    assert await status_with(control_plane, expired) == 401
    assert (await listed(admin))[expired_id]["enabled"] is False

    # Expiry is checked on cache hits too: a token that expires while cached is refused.
    soon = await create_token(
        admin, label="soon", kind="install", expiresAt=(datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    )
    async with client_for(control_plane, soon["plaintext"]) as client:
        assert (await client.get("/v1/me")).status_code == 200
        await asyncio.sleep(1.1)
        assert_error(await client.get("/v1/me"), 401, "unauthorized")
    assert_error(await admin.post(f"/v1/admin-tokens/{soon['id']}/roll", json={}), 409, "token_inactive")


async def test_roll_with_grace_keeps_the_old_token_until_it_ends(
    admin: httpx.AsyncClient, control_plane: FastAPI, rows: RowCounter
) -> None:
    await make_org(admin)
    old = await create_token(admin, label="deploy bot", kind="org", orgSlug="acme")
    assert await status_with(control_plane, old["plaintext"]) == 200  # cached
    before = await rows.snapshot()
    started = datetime.now(UTC)
    response = await admin.post(f"/v1/admin-tokens/{old['id']}/roll", json={"gracePeriodSeconds": 2})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"token", "previous"}
    assert set(body["previous"]) == {"id", "expiresAt"}
    new = body["token"]
    assert set(new) == TOKEN_FIELDS | {"plaintext"}
    assert new["id"] != old["id"] and new["plaintext"] != old["plaintext"]
    assert (new["label"], new["kind"], new["orgId"], new["orgSlug"]) == (
        "deploy bot",
        "org",
        old["orgId"],
        "acme",
    )
    assert body["previous"]["id"] == old["id"]
    previous_end = datetime.fromisoformat(body["previous"]["expiresAt"])
    assert started + timedelta(seconds=1.9) <= previous_end <= datetime.now(UTC) + timedelta(seconds=2.1)

    after = await rows.snapshot()
    assert after["admin_tokens"] == before["admin_tokens"] + 1
    assert after["change_log"] == before["change_log"] + 2
    assert after["audit_events"] == before["audit_events"] + 1

    assert await status_with(control_plane, new["plaintext"]) == 200
    assert await status_with(control_plane, old["plaintext"]) == 200  # within the grace
    tokens = await listed(admin)
    assert tokens[old["id"]]["expiresAt"] == body["previous"]["expiresAt"]
    await asyncio.sleep(max(0.0, (previous_end - datetime.now(UTC)).total_seconds()) + 0.05)
    assert await status_with(control_plane, old["plaintext"]) == 401
    assert await status_with(control_plane, new["plaintext"]) == 200

    event = (await admin.get("/v1/audit-events", params={"action": "admin_token.roll"})).json()["events"][0]
    assert event["resourceId"] == old["id"] and event["details"]["newTokenId"] == new["id"]
    assert event["details"]["gracePeriodSeconds"] == 2
    assert old["plaintext"] not in json.dumps(event) and new["plaintext"] not in json.dumps(event)


async def test_roll_with_no_grace_refuses_the_old_token_at_once(
    admin: httpx.AsyncClient, control_plane: FastAPI
) -> None:
    old = await create_token(admin, label="rotate me", kind="install")
    async with client_for(control_plane, old["plaintext"]) as client:
        assert (await client.get("/v1/me")).status_code == 200  # cached for 2 s
        # The token rolls itself.
        response = await client.post(f"/v1/admin-tokens/{old['id']}/roll", json={"gracePeriodSeconds": 0})
        assert response.status_code == 201, response.text
        assert_error(await client.get("/v1/me"), 401, "unauthorized")
    new = response.json()["token"]
    assert new["label"] == "rotate me" and new["kind"] == "install"
    assert await status_with(control_plane, new["plaintext"]) == 200
    tokens = await listed(admin)
    assert tokens[old["id"]]["enabled"] is False and tokens[new["id"]]["enabled"] is True
    assert_error(await admin.post(f"/v1/admin-tokens/{old['id']}/roll", json={}), 409, "token_inactive")


async def test_roll_defaults_to_a_day_and_never_extends_an_expiry(
    admin: httpx.AsyncClient, control_plane: FastAPI
) -> None:
    plain = await create_token(admin, label="plain", kind="install")
    response = await admin.post(f"/v1/admin-tokens/{plain['id']}/roll")  # no body at all
    assert response.status_code == 201, response.text
    end = datetime.fromisoformat(response.json()["previous"]["expiresAt"])
    assert abs((end - datetime.now(UTC)) - timedelta(days=1)) < timedelta(seconds=30)
    assert response.json()["token"]["expiresAt"] is None

    expiry = datetime.now(UTC) + timedelta(hours=1)
    short = await create_token(admin, label="short", kind="install", expiresAt=expiry.isoformat())
    response = await admin.post(f"/v1/admin-tokens/{short['id']}/roll", json={})
    assert response.status_code == 201, response.text
    # The old token keeps its earlier end; the new one inherits the expiry policy.
    assert response.json()["previous"]["expiresAt"] == isoformat(expiry)
    assert response.json()["token"]["expiresAt"] == isoformat(expiry)


async def test_the_last_install_token_cannot_be_revoked(
    admin: httpx.AsyncClient, control_plane: FastAPI, rows: RowCounter
) -> None:
    bootstrap_id = (await admin.get("/v1/me")).json()["token"]["id"]
    await make_org(admin)
    await create_token(admin, label="org tokens do not count", kind="org", orgSlug="acme")
    before = await rows.snapshot()
    assert_error(await admin.delete(f"/v1/admin-tokens/{bootstrap_id}"), 409, "last_install_token")
    assert await rows.snapshot() == before
    assert (await admin.get("/v1/me")).status_code == 200

    # A token already rolled out with grace 0 or expired does not count either.
    spare = await create_token(admin, label="spare", kind="install")
    rolled = await admin.post(f"/v1/admin-tokens/{spare['id']}/roll", json={"gracePeriodSeconds": 0})
    replacement = rolled.json()["token"]
    assert (await admin.delete(f"/v1/admin-tokens/{bootstrap_id}")).status_code == 204
    assert await status_with(control_plane, ADMIN_TOKEN) == 401
    async with client_for(control_plane, replacement["plaintext"]) as operator:
        assert_error(
            await operator.delete(f"/v1/admin-tokens/{replacement['id']}"), 409, "last_install_token"
        )
        # Rolling the last install token is fine: it leaves a new one.
        rolled_again = await operator.post(
            f"/v1/admin-tokens/{replacement['id']}/roll", json={"gracePeriodSeconds": 0}
        )
        assert rolled_again.status_code == 201, rolled_again.text
    assert await status_with(control_plane, rolled_again.json()["token"]["plaintext"]) == 200


async def test_bad_input_changes_nothing(admin: httpx.AsyncClient, rows: RowCounter) -> None:
    await make_org(admin)
    target = await create_token(admin, label="target", kind="install")
    before = await rows.snapshot()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    create_bodies: list[tuple[Any, int, str]] = [
        ({"label": "x", "kind": "root"}, 400, "invalid_request"),
        ({"label": "x"}, 400, "invalid_request"),
        ({"kind": "install"}, 400, "invalid_request"),
        ({"label": "", "kind": "install"}, 400, "invalid_request"),
        ({"label": "   ", "kind": "install"}, 400, "invalid_request"),
        ({"label": "l" * 81, "kind": "install"}, 400, "invalid_request"),
        ({"label": 5, "kind": "install"}, 400, "invalid_request"),
        ({"label": "x", "kind": 1}, 400, "invalid_request"),
        ({"label": "x", "kind": "install", "extra": True}, 400, "invalid_request"),
        ({"label": "x", "kind": "install", "plaintext": "lorry_admin_x"}, 400, "invalid_request"),
        ({"label": "x", "kind": "install", "orgSlug": "acme"}, 400, "invalid_request"),
        ({"label": "x", "kind": "org"}, 400, "invalid_request"),
        ({"label": "x", "kind": "org", "orgSlug": 7}, 400, "invalid_request"),
        ({"label": "x", "kind": "org", "orgSlug": "nope"}, 404, "org_not_found"),
        ({"label": "x", "kind": "install", "expiresAt": past}, 400, "invalid_request"),
        ({"label": "x", "kind": "install", "expiresAt": 1_900_000_000}, 400, "invalid_request"),
        ({"label": "x", "kind": "install", "expiresAt": "tomorrow"}, 400, "invalid_request"),
        ({"label": "x", "kind": "install", "expiresAt": future[:19]}, 400, "invalid_request"),  # no offset
        ([], 400, "invalid_request"),
    ]
    for body, status, code in create_bodies:
        assert_error(await admin.post("/v1/admin-tokens", json=body), status, code)
    for raw in (b"{bad json", b"", b"null"):
        response = await admin.post(
            "/v1/admin-tokens", content=raw, headers={"content-type": "application/json"}
        )
        assert_error(response, 400, "invalid_request")
    roll = f"/v1/admin-tokens/{target['id']}/roll"
    for body in (
        {"gracePeriodSeconds": -1},
        {"gracePeriodSeconds": 604_801},
        {"gracePeriodSeconds": "10"},
        {"gracePeriodSeconds": 1.5},
        {"gracePeriodSeconds": True},
        {"gracePeriodSeconds": None},
        {"grace": 10},
        [],
    ):
        assert_error(await admin.post(roll, json=body), 400, "invalid_request")
    assert_error(
        await admin.post(roll, content=b"{oops", headers={"content-type": "application/json"}),
        400,
        "invalid_request",
    )
    assert await rows.snapshot() == before
    # The boundaries themselves are accepted.
    assert (await admin.post(roll, json={"gracePeriodSeconds": 604_800})).status_code == 201


async def test_every_write_appends_a_change(
    admin: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async def changes() -> list[tuple[str, str]]:
        async with sessionmaker() as session:
            entries = (
                (await session.execute(select(ChangeLogEntry).order_by(ChangeLogEntry.seq))).scalars().all()
            )
            return [(e.kind, e.resource_id) for e in entries]

    start = len(await changes())
    created = await create_token(admin, label="a", kind="install")
    rolled = (await admin.post(f"/v1/admin-tokens/{created['id']}/roll", json={})).json()
    assert (await admin.delete(f"/v1/admin-tokens/{rolled['token']['id']}")).status_code == 204
    assert (await changes())[start:] == [
        ("admin_token", created["id"]),
        ("admin_token", created["id"]),
        ("admin_token", rolled["token"]["id"]),
        ("admin_token", rolled["token"]["id"]),
    ]


async def test_concurrent_revokes_cannot_remove_every_install_token(
    admin: httpx.AsyncClient, ctx: AppContext, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    """Two transactions revoking the last two install tokens: the second waits, then gets 409."""
    bootstrap_id = (await admin.get("/v1/me")).json()["token"]["id"]
    other = await create_token(admin, label="other", kind="install")
    principal = Principal(token_id=bootstrap_id, kind="install", org_id=None, expires_at=None)
    async with sessionmaker() as first, sessionmaker() as second:
        await admin_tokens_service.revoke_token(first, principal, ctx.verifier, bootstrap_id)  # not committed
        racing = asyncio.create_task(
            admin_tokens_service.revoke_token(second, principal, ctx.verifier, other["id"])
        )
        await asyncio.sleep(0.3)
        # Postgres: blocked on the install-token row locks; SQLite: on its single writer connection.
        assert not racing.done()
        await first.commit()
        with pytest.raises(Conflict) as raised:
            await racing
        assert raised.value.code == "last_install_token"
        await second.rollback()
    assert await status_with_app_token(admin, other["plaintext"]) == 200
    tokens = await listed_with(admin, other["plaintext"])
    assert tokens[bootstrap_id]["enabled"] is False and tokens[other["id"]]["enabled"] is True


async def status_with_app_token(admin: httpx.AsyncClient, token: str) -> int:
    response = await admin.get("/v1/me", headers={"authorization": f"Bearer {token}"})
    return response.status_code


async def listed_with(admin: httpx.AsyncClient, token: str) -> dict[str, dict[str, Any]]:
    response = await admin.get("/v1/admin-tokens", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return {t["id"]: t for t in response.json()["tokens"]}
