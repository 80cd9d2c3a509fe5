"""`/v1/endpoints/{id}/keys`: create (plaintext once), list, revoke and roll deployment keys."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from lorry import keys
from lorry.db.models import AuditEvent, ChangeLogEntry, DeploymentKey
from lorry.db.types import isoformat
from tests.conftest import DEFAULT_SCOPE, RowCounter
from tests.test_deployments import TIMESTAMP, SessionMaker, assert_error, count, create

KEY_FIELDS = {"id", "label", "prefix", "enabled", "createdAt", "lastUsedAt", "expiresAt"}
CREATED_FIELDS = {"id", "label", "plaintext", "prefix", "createdAt", "expiresAt"}


def keys_path(deployment_id: str) -> str:
    return f"/v1/endpoints/{deployment_id}/keys"


async def create_key(client: httpx.AsyncClient, deployment_id: str, **body: Any) -> dict[str, Any]:
    response = await client.post(keys_path(deployment_id), params=DEFAULT_SCOPE, json=body)
    assert response.status_code == 201, response.text
    assert set(response.json()) == {"key"}
    key: dict[str, Any] = response.json()["key"]
    return key


async def listed(client: httpx.AsyncClient, deployment_id: str) -> dict[str, dict[str, Any]]:
    response = await client.get(keys_path(deployment_id), params=DEFAULT_SCOPE)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"keys"}
    return {key["id"]: key for key in response.json()["keys"]}


async def roll(
    client: httpx.AsyncClient, deployment_id: str, key_id: str, body: dict[str, Any] | None = None
) -> httpx.Response:
    return await client.post(f"{keys_path(deployment_id)}/{key_id}/roll", params=DEFAULT_SCOPE, json=body)


async def key_row(sessionmaker: SessionMaker, key_id: str) -> DeploymentKey:
    async with sessionmaker() as session:
        return (await session.execute(select(DeploymentKey).where(DeploymentKey.id == key_id))).scalar_one()


def parse_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@pytest.fixture
async def deployment(admin: httpx.AsyncClient) -> dict[str, Any]:
    return await create(admin, "keyed")


async def test_create_shows_the_plaintext_once(
    admin: httpx.AsyncClient,
    deployment: dict[str, Any],
    sessionmaker: SessionMaker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key = await create_key(admin, deployment["id"], label="  production app  ")
    assert set(key) == CREATED_FIELDS
    assert key["label"] == "production app" and key["expiresAt"] is None
    assert TIMESTAMP.fullmatch(key["createdAt"])
    parsed = keys.parse(key["plaintext"])
    assert parsed is not None and parsed.kind is keys.TokenKind.DEPLOYMENT_KEY
    assert key["prefix"] == parsed.prefix == f"lorry_{parsed.kid}"
    assert key["plaintext"].startswith(key["prefix"] + "_")

    # At rest: the kid, the prefix and an argon2id hash that verifies the secret. Never the plaintext.
    row = await key_row(sessionmaker, key["id"])
    assert row.kid == parsed.kid and row.prefix == key["prefix"] and row.deployment_id == deployment["id"]
    assert row.secret_hash.startswith("$argon2id$") and keys.verify_secret(row.secret_hash, parsed.secret)
    assert parsed.secret not in row.secret_hash
    assert row.rolled_from is None and row.revoked_at is None

    # The list and everything else show the prefix only.
    keys_listed = await listed(admin, deployment["id"])
    assert set(keys_listed) == {key["id"]}
    entry = keys_listed[key["id"]]
    assert set(entry) == KEY_FIELDS
    assert entry == {
        "id": key["id"],
        "label": "production app",
        "prefix": key["prefix"],
        "enabled": True,
        "createdAt": key["createdAt"],
        "lastUsedAt": None,
        "expiresAt": None,
    }
    for response in (
        await admin.get(keys_path(deployment["id"]), params=DEFAULT_SCOPE),
        await admin.get(f"/v1/endpoints/{deployment['id']}", params=DEFAULT_SCOPE),
        await admin.get("/v1/endpoints", params=DEFAULT_SCOPE),
    ):
        assert parsed.secret not in response.text
    async with sessionmaker() as session:
        audit = (await session.execute(select(AuditEvent))).scalars().all()
        changes = (await session.execute(select(ChangeLogEntry))).scalars().all()
    assert not any(parsed.secret in str(event.details) for event in audit)
    assert not any(parsed.secret in change.resource_id for change in changes)
    assert parsed.secret not in caplog.text


async def test_expiry(
    admin: httpx.AsyncClient, deployment: dict[str, Any], sessionmaker: SessionMaker
) -> None:
    expires = datetime.now(UTC) + timedelta(days=30)
    key = await create_key(admin, deployment["id"], label="expiring", expiresAt=expires.isoformat())
    assert key["expiresAt"] == isoformat(expires)
    # Any offset is read and normalised to UTC.
    in_berlin = (expires + timedelta(hours=1)).astimezone(timezone(timedelta(hours=2))).replace(microsecond=0)
    other = await create_key(admin, deployment["id"], label="offset", expiresAt=in_berlin.isoformat())
    assert in_berlin.isoformat().endswith("+02:00")
    assert other["expiresAt"] == isoformat(in_berlin.astimezone(UTC))

    # A key whose expiry has passed is listed, disabled.
    async with sessionmaker() as session:
        await session.execute(
            update(DeploymentKey)
            .where(DeploymentKey.id == key["id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        await session.commit()
    entries = await listed(admin, deployment["id"])
    assert entries[key["id"]]["enabled"] is False and entries[other["id"]]["enabled"] is True
    # An expired key cannot be rolled.
    assert_error(await roll(admin, deployment["id"], key["id"]), 409, "key_inactive")


async def test_revoke(
    admin: httpx.AsyncClient, deployment: dict[str, Any], sessionmaker: SessionMaker, rows: RowCounter
) -> None:
    key = await create_key(admin, deployment["id"], label="to revoke")
    kept = await create_key(admin, deployment["id"], label="kept")
    before = await rows.snapshot()
    response = await admin.delete(f"{keys_path(deployment['id'])}/{key['id']}", params=DEFAULT_SCOPE)
    assert response.status_code == 204 and response.content == b""
    after = await rows.snapshot()
    assert after["change_log"] == before["change_log"] + 1
    assert after["audit_events"] == before["audit_events"] + 1
    assert after["deployment_keys"] == before["deployment_keys"]
    entries = await listed(admin, deployment["id"])
    assert entries[key["id"]]["enabled"] is False and entries[kept["id"]]["enabled"] is True
    row = await key_row(sessionmaker, key["id"])
    assert row.revoked_at is not None
    revoked_at = row.revoked_at

    # Idempotent: again 204, nothing written, the first revocation time kept.
    response = await admin.delete(f"{keys_path(deployment['id'])}/{key['id']}", params=DEFAULT_SCOPE)
    assert response.status_code == 204
    assert await rows.snapshot() == after
    assert (await key_row(sessionmaker, key["id"])).revoked_at == revoked_at

    # A revoked key cannot be rolled.
    assert_error(await roll(admin, deployment["id"], key["id"]), 409, "key_inactive")
    assert await rows.snapshot() == after


async def test_unknown_keys_are_404(
    admin: httpx.AsyncClient, deployment: dict[str, Any], rows: RowCounter
) -> None:
    other = await create(admin, "other-keyed")
    foreign = await create_key(admin, other["id"], label="foreign")
    before = await rows.snapshot()
    for key_id in ("00000000-0000-4000-8000-000000000000", "not-a-uuid", foreign["id"]):
        response = await admin.delete(f"{keys_path(deployment['id'])}/{key_id}", params=DEFAULT_SCOPE)
        assert_error(response, 404, "key_not_found")
        assert_error(await roll(admin, deployment["id"], key_id), 404, "key_not_found")
    # An unknown deployment comes first.
    unknown = "00000000-0000-4000-8000-000000000000"
    assert_error(await admin.get(keys_path(unknown), params=DEFAULT_SCOPE), 404, "deployment_not_found")
    response = await admin.post(keys_path(unknown), params=DEFAULT_SCOPE, json={"label": "x"})
    assert_error(response, 404, "deployment_not_found")
    response = await admin.delete(f"{keys_path(unknown)}/{foreign['id']}", params=DEFAULT_SCOPE)
    assert_error(response, 404, "deployment_not_found")
    assert_error(await roll(admin, unknown, foreign["id"]), 404, "deployment_not_found")
    assert await rows.snapshot() == before
    assert (await listed(admin, other["id"]))[foreign["id"]]["enabled"] is True


async def test_roll_with_the_default_grace(
    admin: httpx.AsyncClient, deployment: dict[str, Any], sessionmaker: SessionMaker, rows: RowCounter
) -> None:
    old = await create_key(admin, deployment["id"], label="rolling")
    before = await rows.snapshot()
    response = await admin.post(f"{keys_path(deployment['id'])}/{old['id']}/roll", params=DEFAULT_SCOPE)
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"key", "previous"}
    new = body["key"]
    assert set(new) == CREATED_FIELDS and set(body["previous"]) == {"id", "expiresAt"}
    assert new["label"] == "rolling" and new["id"] != old["id"] and new["expiresAt"] is None
    assert new["plaintext"] != old["plaintext"] and keys.parse(new["plaintext"]) is not None
    assert body["previous"]["id"] == old["id"]
    grace_end = parse_time(body["previous"]["expiresAt"])
    expected = datetime.now(UTC) + timedelta(seconds=86_400)
    assert abs((grace_end - expected).total_seconds()) < 30

    after = await rows.snapshot()
    assert after["deployment_keys"] == before["deployment_keys"] + 1
    assert after["change_log"] == before["change_log"] + 2  # the old key changed, the new one appeared
    assert after["audit_events"] == before["audit_events"] + 1

    entries = await listed(admin, deployment["id"])
    assert entries[old["id"]]["enabled"] is True  # still inside its grace period
    assert entries[old["id"]]["expiresAt"] == body["previous"]["expiresAt"]
    assert entries[new["id"]]["enabled"] is True
    assert new["plaintext"] not in (await admin.get(keys_path(deployment["id"]), params=DEFAULT_SCOPE)).text
    new_row = await key_row(sessionmaker, new["id"])
    assert new_row.rolled_from == old["id"]
    assert (await key_row(sessionmaker, old["id"])).revoked_at is None

    # An empty JSON object is the same as no body.
    response = await roll(admin, deployment["id"], new["id"], {})
    assert response.status_code == 201, response.text
    assert abs((parse_time(response.json()["previous"]["expiresAt"]) - expected).total_seconds()) < 30

    async with sessionmaker() as session:
        event = (
            await session.execute(
                select(AuditEvent).where(AuditEvent.action == "deployment_key.roll").limit(1)
            )
        ).scalar_one()
    assert event.resource_id == old["id"] and event.details["newKeyId"] == new["id"]
    assert event.details["gracePeriodSeconds"] == 86_400
    assert new["plaintext"] not in str(event.details)


async def test_roll_with_zero_grace_revokes_at_once(
    admin: httpx.AsyncClient, deployment: dict[str, Any], sessionmaker: SessionMaker
) -> None:
    old = await create_key(admin, deployment["id"], label="instant")
    response = await roll(admin, deployment["id"], old["id"], {"gracePeriodSeconds": 0})
    assert response.status_code == 201, response.text
    body = response.json()
    now = datetime.now(UTC)
    assert abs((parse_time(body["previous"]["expiresAt"]) - now).total_seconds()) < 30
    row = await key_row(sessionmaker, old["id"])
    assert row.revoked_at is not None and row.expires_at == row.revoked_at
    entries = await listed(admin, deployment["id"])
    assert entries[old["id"]]["enabled"] is False and entries[body["key"]["id"]]["enabled"] is True
    assert_error(await roll(admin, deployment["id"], old["id"]), 409, "key_inactive")


async def test_roll_never_extends_an_expiry(admin: httpx.AsyncClient, deployment: dict[str, Any]) -> None:
    soon = datetime.now(UTC) + timedelta(minutes=10)
    old = await create_key(admin, deployment["id"], label="short", expiresAt=soon.isoformat())
    response = await roll(admin, deployment["id"], old["id"], {"gracePeriodSeconds": 3600})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["previous"]["expiresAt"] == isoformat(soon)
    # The new key keeps the original deadline: rolling is not a way to extend a key's life.
    assert body["key"]["expiresAt"] == isoformat(soon)

    later = await create_key(
        admin, deployment["id"], label="long", expiresAt=(datetime.now(UTC) + timedelta(days=9)).isoformat()
    )
    response = await roll(admin, deployment["id"], later["id"], {"gracePeriodSeconds": 60})
    grace_end = parse_time(response.json()["previous"]["expiresAt"])
    assert abs((grace_end - (datetime.now(UTC) + timedelta(seconds=60))).total_seconds()) < 30


async def test_key_writes_are_audited(
    admin: httpx.AsyncClient, deployment: dict[str, Any], sessionmaker: SessionMaker
) -> None:
    key = await create_key(admin, deployment["id"], label="audited")
    rolled = (await roll(admin, deployment["id"], key["id"])).json()["key"]
    response = await admin.delete(f"{keys_path(deployment['id'])}/{rolled['id']}", params=DEFAULT_SCOPE)
    assert response.status_code == 204
    async with sessionmaker() as session:
        events = (
            (
                await session.execute(
                    select(AuditEvent)
                    .where(AuditEvent.resource_type == "deployment_key")
                    .order_by(AuditEvent.created_at)
                )
            )
            .scalars()
            .all()
        )
        changes = (
            (
                await session.execute(
                    select(ChangeLogEntry)
                    .where(ChangeLogEntry.kind == "deployment_key")
                    .order_by(ChangeLogEntry.seq)
                )
            )
            .scalars()
            .all()
        )
    assert [(e.action, e.resource_id) for e in events] == [
        ("deployment_key.create", key["id"]),
        ("deployment_key.roll", key["id"]),
        ("deployment_key.revoke", rolled["id"]),
    ]
    assert all(e.org_id == deployment["orgId"] and e.details["slug"] == "keyed" for e in events)
    assert events[0].details["label"] == "audited"
    assert [c.resource_id for c in changes] == [key["id"], key["id"], rolled["id"], rolled["id"]]
    for secret in (key["plaintext"], rolled["plaintext"]):
        assert not any(secret in str(e.details) for e in events)
    assert await count(sessionmaker, DeploymentKey) == 2


async def test_keys_of_a_disabled_deployment_can_be_managed(
    admin: httpx.AsyncClient, deployment: dict[str, Any]
) -> None:
    response = await admin.patch(
        f"/v1/endpoints/{deployment['id']}", params=DEFAULT_SCOPE, json={"enabled": False}
    )
    assert response.status_code == 200
    key = await create_key(admin, deployment["id"], label="while disabled")
    assert (await roll(admin, deployment["id"], key["id"], {"gracePeriodSeconds": 0})).status_code == 201
