"""Configuration changes reach a running gateway within 1 s (DESIGN §6), on SQLite and PostgreSQL.

The gateway here is NOT wired to the control plane in-process (unlike ``lorry serve all``): it
learns of changes only as a separate process would — Postgres ``NOTIFY`` plus the 200 ms poll,
or the poll alone on SQLite. Each bound is measured and printed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable

import asyncpg
import httpx
import pytest
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.app import Gateway
from lorry.db.models import ChangeLogEntry
from tests.gateway.admin_api import AdminApi
from tests.gateway.conftest import MakeGateway, client_for
from tests.support.databases import PG_ADMIN_DSN
from tests.support.polling import until

BOUND_S = 1.0


async def status(gw: Gateway, slug: str, key: str | None) -> int:
    async with client_for(gw, slug, key=key) as client:
        return (await client.get("/v1/models")).status_code


async def _deployment_with_key(api: AdminApi, slug: str) -> tuple[str, dict[str, object]]:
    deployment = await api.create_deployment(slug, base_model="lorry/tiny-llama")
    key = await api.create_key(deployment["id"])
    return str(deployment["id"]), key


async def test_revoked_key_refused_within_bound(
    admin: httpx.AsyncClient, make_gateway: MakeGateway, backend: str
) -> None:
    gw = await make_gateway(in_process=False)
    api = AdminApi(admin)
    deployment_id, key = await _deployment_with_key(api, "revoke-me")
    plaintext = str(key["plaintext"])
    await until(lambda: _is(status(gw, "revoke-me", plaintext), 200))  # created → served (and cached)
    assert await status(gw, "revoke-me", plaintext) == 200
    started = time.monotonic()
    await api.revoke_key(deployment_id, str(key["id"]))
    elapsed = await until(lambda: _is(status(gw, "revoke-me", plaintext), 401))
    total = time.monotonic() - started
    print(
        f"\n[{backend}] revoked key refused after {elapsed * 1000:.0f} ms "
        f"({total * 1000:.0f} ms incl. the API call)"
    )
    assert total < BOUND_S


async def test_disable_delete_and_roll_within_bound(
    admin: httpx.AsyncClient, make_gateway: MakeGateway, backend: str
) -> None:
    gw = await make_gateway(in_process=False)
    api = AdminApi(admin)
    deployment_id, key = await _deployment_with_key(api, "changing")
    plaintext = str(key["plaintext"])
    await until(lambda: _is(status(gw, "changing", plaintext), 200))
    timings: dict[str, float] = {}

    started = time.monotonic()
    await api.patch_deployment(deployment_id, enabled=False)
    await until(lambda: _is(status(gw, "changing", plaintext), 404))
    timings["disable"] = time.monotonic() - started

    started = time.monotonic()
    await api.patch_deployment(deployment_id, enabled=True)
    await until(lambda: _is(status(gw, "changing", plaintext), 200))
    timings["enable"] = time.monotonic() - started

    started = time.monotonic()
    rolled = await api.roll_key(deployment_id, str(key["id"]), 0)
    new_plaintext = str(rolled["key"]["plaintext"])
    await until(lambda: _is(status(gw, "changing", plaintext), 401))
    timings["roll (grace 0)"] = time.monotonic() - started
    assert await status(gw, "changing", new_plaintext) == 200

    started = time.monotonic()
    await api.delete_deployment(deployment_id)
    await until(lambda: _is(status(gw, "changing", new_plaintext), 404))
    timings["delete"] = time.monotonic() - started

    print(f"\n[{backend}] " + ", ".join(f"{name}: {value * 1000:.0f} ms" for name, value in timings.items()))
    assert max(timings.values()) < BOUND_S


async def test_in_process_notify_is_immediate(admin: httpx.AsyncClient, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(in_process=True)  # as under `lorry serve all`
    api = AdminApi(admin)
    deployment_id, key = await _deployment_with_key(api, "same-process")
    plaintext = str(key["plaintext"])
    assert await status(gw, "same-process", plaintext) == 200
    polls = gw.follower.polls
    started = time.monotonic()
    await api.revoke_key(deployment_id, str(key["id"]))
    elapsed = await until(lambda: _is(status(gw, "same-process", plaintext), 401))
    print(f"\nin-process notify: revoked key refused after {elapsed * 1000:.0f} ms")
    assert time.monotonic() - started < 0.2 or gw.follower.polls > polls


async def test_resync_when_cursor_is_older_than_the_retained_log(
    admin: httpx.AsyncClient, make_gateway: MakeGateway, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    gw = await make_gateway(in_process=False)
    api = AdminApi(admin)
    deployment_id, key = await _deployment_with_key(api, "trimmed")
    plaintext = str(key["plaintext"])
    await until(lambda: _cached(gw, "trimmed", plaintext, deployment_id))
    await gw.follower.stop()  # the gateway stops reading the feed (as if partitioned away)
    resyncs = gw.follower.resyncs
    await api.revoke_key(deployment_id, str(key["id"]))
    await api.create_deployment("created-while-away", base_model="lorry/tiny-llama")
    async with sessionmaker() as session:  # the log is trimmed past the gateway's cursor
        newest = (await session.execute(select(func.max(ChangeLogEntry.seq)))).scalar_one()
        await session.execute(delete(ChangeLogEntry).where(ChangeLogEntry.seq < newest))
        await session.commit()
    assert await status(gw, "trimmed", plaintext) == 200  # stale: nothing read yet
    await gw.follower.sync_now()
    assert gw.follower.resyncs == resyncs + 1
    assert await status(gw, "trimmed", plaintext) == 401
    assert "created-while-away" in gw.snapshot.by_slug


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_lost_listen_connection_resyncs(admin: httpx.AsyncClient, make_gateway: MakeGateway) -> None:
    gw = await make_gateway(in_process=False)
    api = AdminApi(admin)
    deployment_id, key = await _deployment_with_key(api, "listener")
    plaintext = str(key["plaintext"])
    await until(lambda: _is(status(gw, "listener", plaintext), 200))
    await until(lambda: _is_true(gw.follower.listening))
    database = gw.db.url.database
    admin_conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        killed = await admin_conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND query ILIKE 'LISTEN%'",
            database,
        )
    finally:
        await admin_conn.close()
    assert killed == 1
    resyncs = gw.follower.resyncs
    await until(lambda: _is_true(gw.follower.resyncs > resyncs and gw.follower.listening))
    started = time.monotonic()
    await api.revoke_key(deployment_id, str(key["id"]))
    await until(lambda: _is(status(gw, "listener", plaintext), 401))
    elapsed = time.monotonic() - started
    print(f"\nafter pg_terminate_backend of LISTEN: revoked key refused after {elapsed * 1000:.0f} ms")
    assert elapsed < BOUND_S


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _cached(gw: Gateway, slug: str, key: str, deployment_id: str) -> bool:
    return await status(gw, slug, key) == 200 and gw.keys.cached_grant(key, deployment_id) is not None


async def _is_true(value: bool) -> bool:
    return value
