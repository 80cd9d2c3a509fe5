"""The engines admin API (DESIGN §3, §4, §8): CRUD, write-only api keys, static engines, auth."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.app import create_app
from control_plane.bootstrap import admin_token_row
from control_plane.engines.catalog import all_engines
from lorry import keys
from lorry.db.models import AuditEvent, ChangeLogEntry, Deployment, Engine, Organization, Project
from lorry.engine_spec import static_engines
from lorry.settings import LorrySettings
from tests.conftest import RowCounter, client_for

SECRET = "engine-secret-Zq8vX3kP"
OTHER_SECRET = "engine-secret-rotated-Yb71"
STATIC_SECRET = "static-secret-Hh5nT0"
BASE_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
DTO_KEYS = {
    "id",
    "name",
    "url",
    "baseModel",
    "servedModelName",
    "adapterRoot",
    "maxLoras",
    "maxCpuLoras",
    "maxLoraRank",
    "enabled",
    "hasApiKey",
    "source",
    "createdAt",
    "updatedAt",
}


def engine_body(**overrides: Any) -> dict[str, Any]:
    return {"name": "gpu-0", "url": "http://10.0.0.5:8000/", "baseModel": BASE_MODEL, **overrides}


async def create(admin: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await admin.post("/v1/engines", json=engine_body(**overrides))
    assert response.status_code == 201, response.text
    engine: dict[str, Any] = response.json()["engine"]
    return engine


async def engine_changes(sessionmaker: async_sessionmaker[AsyncSession]) -> list[tuple[int, str]]:
    async with sessionmaker() as session:
        result = await session.execute(
            select(ChangeLogEntry.seq, ChangeLogEntry.resource_id)
            .where(ChangeLogEntry.kind == "engine")
            .order_by(ChangeLogEntry.seq)
        )
        return [(int(seq), str(resource_id)) for seq, resource_id in result.all()]


async def engine_audit(sessionmaker: async_sessionmaker[AsyncSession]) -> list[AuditEvent]:
    async with sessionmaker() as session:
        result = await session.execute(
            select(AuditEvent).where(AuditEvent.resource_type == "engine").order_by(AuditEvent.created_at)
        )
        return list(result.scalars().all())


async def test_crud_shapes_and_statuses(admin: httpx.AsyncClient, settings: LorrySettings) -> None:
    assert (await admin.get("/v1/engines")).json() == {"engines": []}

    created = await admin.post("/v1/engines", json=engine_body(apiKey=SECRET))
    assert created.status_code == 201, created.text
    assert set(created.json()) == {"engine"}
    engine = created.json()["engine"]
    assert set(engine) == DTO_KEYS
    assert engine["name"] == "gpu-0"
    assert engine["url"] == "http://10.0.0.5:8000"  # trailing slash normalised
    assert engine["baseModel"] == BASE_MODEL
    assert engine["servedModelName"] == BASE_MODEL
    assert engine["adapterRoot"] == settings.adapter_store.resolve().as_posix()
    assert (engine["maxLoras"], engine["maxCpuLoras"], engine["maxLoraRank"]) == (4, None, 16)
    assert engine["enabled"] is True
    assert engine["hasApiKey"] is True
    assert engine["source"] == "api"
    assert TIMESTAMP.match(engine["createdAt"]) and TIMESTAMP.match(engine["updatedAt"])
    uuid.UUID(engine["id"])

    fetched = await admin.get(f"/v1/engines/{engine['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == {"engine": engine}
    assert (await admin.get("/v1/engines")).json() == {"engines": [engine]}

    patched = await admin.patch(f"/v1/engines/{engine['id']}", json={"maxLoras": 8, "maxCpuLoras": 16})
    assert patched.status_code == 200, patched.text
    after = patched.json()["engine"]
    assert (after["maxLoras"], after["maxCpuLoras"]) == (8, 16)
    unchanged = {k: v for k, v in engine.items() if k not in ("maxLoras", "maxCpuLoras", "updatedAt")}
    assert {k: after[k] for k in unchanged} == unchanged
    assert after["updatedAt"] >= engine["updatedAt"]
    assert (await admin.get(f"/v1/engines/{engine['id']}")).json() == {"engine": after}

    # The served name followed the base model while it was the default.
    moved = await admin.patch(f"/v1/engines/{engine['id']}", json={"baseModel": "org/other-model"})
    assert moved.json()["engine"]["servedModelName"] == "org/other-model"
    named = await admin.patch(
        f"/v1/engines/{engine['id']}", json={"servedModelName": "served", "enabled": False}
    )
    assert (named.json()["engine"]["servedModelName"], named.json()["engine"]["enabled"]) == ("served", False)
    kept = await admin.patch(f"/v1/engines/{engine['id']}", json={"baseModel": "org/third"})
    assert kept.json()["engine"]["servedModelName"] == "served"
    reset = await admin.patch(
        f"/v1/engines/{engine['id']}",
        json={"servedModelName": None, "maxCpuLoras": None, "apiKey": None, "adapterRoot": "/mnt/store/"},
    )
    assert reset.status_code == 200, reset.text
    out = reset.json()["engine"]
    assert out["servedModelName"] == "org/third"
    assert out["maxCpuLoras"] is None
    assert out["hasApiKey"] is False
    assert out["adapterRoot"] == "/mnt/store"
    back = await admin.patch(f"/v1/engines/{engine['id']}", json={"adapterRoot": None})
    assert back.json()["engine"]["adapterRoot"] == settings.adapter_store.resolve().as_posix()

    deleted = await admin.delete(f"/v1/engines/{engine['id']}")
    assert deleted.status_code == 204
    assert deleted.content == b""
    gone = await admin.get(f"/v1/engines/{engine['id']}")
    assert gone.status_code == 404
    assert gone.json() == {"error": "Engine not found", "code": "engine_not_found"}
    assert (await admin.delete(f"/v1/engines/{engine['id']}")).status_code == 404
    assert (await admin.get("/v1/engines")).json() == {"engines": []}


async def test_explicit_fields_are_stored(admin: httpx.AsyncClient) -> None:
    engine = await create(
        admin,
        name="a.b_c-1",
        url="HTTPS://Engine.Example:8443/base//",
        servedModelName="served-name",
        adapterRoot="/srv//lorry/./adapters/",
        maxLoras=2,
        maxCpuLoras=2,
        maxLoraRank=64,
        enabled=False,
    )
    assert engine["url"] == "https://engine.example:8443/base"
    assert engine["servedModelName"] == "served-name"
    assert engine["adapterRoot"] == "/srv/lorry/adapters"
    assert (engine["maxLoras"], engine["maxCpuLoras"], engine["maxLoraRank"]) == (2, 2, 64)
    assert engine["enabled"] is False
    assert engine["hasApiKey"] is False


async def test_api_key_is_write_only(
    admin: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession], settings: LorrySettings
) -> None:
    texts: list[str] = []
    created = await admin.post("/v1/engines", json=engine_body(apiKey=SECRET))
    texts.append(created.text)
    engine_id = created.json()["engine"]["id"]
    texts.append((await admin.get("/v1/engines")).text)
    texts.append((await admin.get(f"/v1/engines/{engine_id}")).text)
    rotated = await admin.patch(f"/v1/engines/{engine_id}", json={"apiKey": OTHER_SECRET})
    assert rotated.status_code == 200 and rotated.json()["engine"]["hasApiKey"] is True
    texts.append(rotated.text)
    texts.append((await admin.patch(f"/v1/engines/{engine_id}", json={"maxLoraRank": 32})).text)
    texts.append((await admin.get("/v1/engines")).text)
    for text in texts:
        assert SECRET not in text and OTHER_SECRET not in text
        assert '"apiKey"' not in text

    # The key is stored for the gateway, and never copied into the audit log.
    async with sessionmaker() as session:
        row = (await session.execute(select(Engine).where(Engine.id == engine_id))).scalar_one()
        assert row.api_key == OTHER_SECRET
        catalogue = await all_engines(session, settings)
        assert [spec.api_key for spec in catalogue] == [OTHER_SECRET]
        assert SECRET not in catalogue[0].model_dump_json() and OTHER_SECRET not in repr(catalogue[0])
    events = await engine_audit(sessionmaker)
    assert [event.action for event in events] == ["engine.create", "engine.update", "engine.update"]
    for event in events:
        assert SECRET not in str(event.details) and OTHER_SECRET not in str(event.details)
    assert events[1].details["fields"] == ["apiKey"]


async def test_every_write_appends_a_change_and_an_audit_event(
    admin: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    engine = await create(admin)
    changes = await engine_changes(sessionmaker)
    assert [rid for _seq, rid in changes] == [engine["id"]]

    assert (await admin.patch(f"/v1/engines/{engine['id']}", json={"maxLoraRank": 32})).status_code == 200
    # A PATCH that changes nothing writes nothing.
    assert (await admin.patch(f"/v1/engines/{engine['id']}", json={"maxLoraRank": 32})).status_code == 200
    assert (await admin.patch(f"/v1/engines/{engine['id']}", json={})).status_code == 200
    assert (await admin.delete(f"/v1/engines/{engine['id']}")).status_code == 204

    changes = await engine_changes(sessionmaker)
    assert [rid for _seq, rid in changes] == [engine["id"]] * 3
    seqs = [seq for seq, _rid in changes]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    events = await engine_audit(sessionmaker)
    assert [(e.action, e.resource_id, e.org_id) for e in events] == [
        ("engine.create", engine["id"], None),
        ("engine.update", engine["id"], None),
        ("engine.delete", engine["id"], None),
    ]
    assert events[1].details == {"name": "gpu-0", "fields": ["maxLoraRank"]}
    assert all(event.actor_token_id for event in events)


async def test_names_are_unique(admin: httpx.AsyncClient, rows: RowCounter) -> None:
    first = await create(admin)
    second = await create(admin, name="gpu-1")
    before = await rows.snapshot()
    duplicate = await admin.post("/v1/engines", json=engine_body(url="http://10.0.0.6:8000"))
    assert duplicate.status_code == 409
    assert duplicate.json() == {"error": "An engine named 'gpu-0' already exists", "code": "engine_exists"}
    rename = await admin.patch(f"/v1/engines/{second['id']}", json={"name": "gpu-0"})
    assert rename.status_code == 409 and rename.json()["code"] == "engine_exists"
    assert await rows.snapshot() == before
    # Renaming to its own name is not a conflict.
    assert (await admin.patch(f"/v1/engines/{first['id']}", json={"name": "gpu-0"})).status_code == 200
    assert (await admin.get(f"/v1/engines/{second['id']}")).json()["engine"]["name"] == "gpu-1"


BAD_CREATE_BODIES: list[tuple[str, Any]] = [
    ("missing baseModel", {"name": "gpu-0", "url": "http://h:8000"}),
    ("not an object", [engine_body()]),
    ("null body", None),
    ("name wrong type", engine_body(name=5)),
    ("maxLoras as string", engine_body(maxLoras="4")),
    ("maxLoras as bool", engine_body(maxLoras=True)),
    ("maxLoras as float", engine_body(maxLoras=4.0)),
    ("enabled as string", engine_body(enabled="true")),
    ("apiKey as number", engine_body(apiKey=1234)),
    ("url wrong type", engine_body(url=["http://h"])),
    ("ftp url", engine_body(url="ftp://h:8000")),
    ("relative url", engine_body(url="10.0.0.5:8000")),
    ("no scheme", engine_body(url="//h:8000")),
    ("no host", engine_body(url="http:///v1")),
    ("userinfo", engine_body(url="http://user:pw@h:8000")),
    ("query", engine_body(url="http://h:8000/?x=1")),
    ("empty query", engine_body(url="http://h:8000/?")),
    ("fragment", engine_body(url="http://h:8000/#frag")),
    ("bad port", engine_body(url="http://h:99999")),
    ("port zero", engine_body(url="http://h:0")),
    ("space in url", engine_body(url="http://h:8000/a b")),
    ("url too long", engine_body(url="http://h/" + "a" * 500)),
    ("uppercase name", engine_body(name="GPU-0")),
    ("name leading dash", engine_body(name="-gpu")),
    ("name with space", engine_body(name="gpu 0")),
    ("name with slash", engine_body(name="gpu/0")),
    ("name trailing newline", engine_body(name="gpu\n")),
    ("empty name", engine_body(name="")),
    ("long name", engine_body(name="a" * 101)),
    ("empty baseModel", engine_body(baseModel="")),
    ("long baseModel", engine_body(baseModel="m" * 301)),
    ("padded baseModel", engine_body(baseModel=" m ")),
    ("relative adapterRoot", engine_body(adapterRoot="store/adapters")),
    ("dotdot adapterRoot", engine_body(adapterRoot="/srv/../etc")),
    ("maxLoras zero", engine_body(maxLoras=0)),
    ("maxLoras huge", engine_body(maxLoras=2**40)),
    ("maxCpuLoras below maxLoras", engine_body(maxLoras=4, maxCpuLoras=2)),
    ("maxCpuLoras below default maxLoras", engine_body(maxCpuLoras=3)),
    ("maxLoraRank zero", engine_body(maxLoraRank=0)),
    ("maxLoraRank above 512", engine_body(maxLoraRank=1024)),
    ("apiKey with newline", engine_body(apiKey="abc\r\nX-Injected: 1")),
    ("empty apiKey", engine_body(apiKey="")),
    ("unknown field", engine_body(expandDns=True)),
    ("snake_case field", engine_body(base_model=BASE_MODEL)),
    ("client-chosen id", engine_body(id=str(uuid.uuid4()))),
    ("client-chosen source", engine_body(source="static")),
    ("hasApiKey is read-only", engine_body(hasApiKey=True)),
]


async def test_bad_create_input_changes_nothing(admin: httpx.AsyncClient, rows: RowCounter) -> None:
    await create(admin, name="existing")
    before = await rows.snapshot()
    malformed = await admin.post(
        "/v1/engines", content=b'{"name": "gpu-0",', headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400
    assert malformed.json() == {"error": "Request body is not valid JSON", "code": "invalid_request"}
    for label, body in BAD_CREATE_BODIES:
        response = await admin.post("/v1/engines", json=body)
        assert response.status_code == 400, (label, response.status_code, response.text)
        assert response.json()["code"] == "invalid_request", label
        assert set(response.json()) == {"error", "code"}, label
    assert await rows.snapshot() == before
    assert [e["name"] for e in (await admin.get("/v1/engines")).json()["engines"]] == ["existing"]


async def test_bad_patch_input_changes_nothing(admin: httpx.AsyncClient, rows: RowCounter) -> None:
    engine = await create(admin, maxLoras=2, maxCpuLoras=4, apiKey=SECRET)
    path = f"/v1/engines/{engine['id']}"
    before = await rows.snapshot()
    malformed = await admin.patch(path, content=b"{", headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    bad: list[tuple[str, Any]] = [
        ("null name", {"name": None}),
        ("null url", {"url": None}),
        ("null baseModel", {"baseModel": None}),
        ("null maxLoras", {"maxLoras": None}),
        ("null maxLoraRank", {"maxLoraRank": None}),
        ("null enabled", {"enabled": None}),
        ("maxLoras above stored maxCpuLoras", {"maxLoras": 8}),
        ("maxCpuLoras below stored maxLoras", {"maxCpuLoras": 1}),
        ("both inconsistent", {"maxLoras": 5, "maxCpuLoras": 4}),
        ("bad url", {"url": "http://h:8000?x"}),
        ("bad name", {"name": "Bad"}),
        ("wrong type", {"maxLoraRank": "16"}),
        ("unknown field", {"maxLora": 3}),
        ("slug-like field", {"slug": "x"}),
        ("not an object", [1]),
    ]
    for label, body in bad:
        response = await admin.patch(path, json=body)
        assert response.status_code == 400, (label, response.status_code, response.text)
        assert response.json()["code"] == "invalid_request", label
    assert await rows.snapshot() == before
    assert (await admin.get(path)).json() == {"engine": engine}
    # maxCpuLoras raised together with maxLoras is fine.
    ok = await admin.patch(path, json={"maxLoras": 8, "maxCpuLoras": 8})
    assert ok.status_code == 200 and ok.json()["engine"]["maxCpuLoras"] == 8


@pytest.mark.parametrize(
    "engine_id",
    ["nope", "00000000-0000-0000-0000-000000000000", "not-a-uuid-" + "x" * 60, "static:nope", "static:"],
)
async def test_unknown_or_malformed_id_is_404(
    admin: httpx.AsyncClient, rows: RowCounter, engine_id: str
) -> None:
    await create(admin)
    before = await rows.snapshot()
    for method in ("GET", "PATCH", "DELETE"):
        kwargs: dict[str, Any] = {"json": {"enabled": False}} if method == "PATCH" else {}
        response = await admin.request(method, f"/v1/engines/{engine_id}", **kwargs)
        assert response.status_code == 404, (method, response.text)
        assert response.json() == {"error": "Engine not found", "code": "engine_not_found"}
    assert await rows.snapshot() == before


async def make_org_token(sessionmaker: async_sessionmaker[AsyncSession]) -> str:
    plaintext = keys.issue(keys.TokenKind.ADMIN_TOKEN).plaintext
    async with sessionmaker() as session:
        org = Organization(slug="acme", name="Acme")
        session.add(org)
        await session.flush()
        session.add(admin_token_row(plaintext, kind="org", org_id=org.id, label="acme-admin"))
        await session.commit()
    return plaintext


async def test_org_tokens_are_forbidden(
    admin: httpx.AsyncClient,
    anonymous: httpx.AsyncClient,
    control_plane: FastAPI,
    sessionmaker: async_sessionmaker[AsyncSession],
    rows: RowCounter,
) -> None:
    engine = await create(admin)
    token = await make_org_token(sessionmaker)
    before = await rows.snapshot()
    async with client_for(control_plane, token) as org_client:
        calls: list[tuple[str, str, Any]] = [
            ("GET", "/v1/engines", None),
            ("POST", "/v1/engines", engine_body(name="org-engine")),
            ("POST", "/v1/engines", {"bad": "body"}),  # refused before the body is looked at
            ("GET", f"/v1/engines/{engine['id']}", None),
            ("PATCH", f"/v1/engines/{engine['id']}", {"enabled": False}),
            ("DELETE", f"/v1/engines/{engine['id']}", None),
            ("GET", "/v1/engines/nope", None),
        ]
        for method, path, body in calls:
            response = await org_client.request(method, path, json=body)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["code"] == "forbidden"
            assert SECRET not in response.text
    for method, path, body in calls:
        response = await anonymous.request(method, path, json=body)
        assert response.status_code == 401, (method, path)
        assert response.json()["code"] == "unauthorized"
    assert await rows.snapshot() == before
    assert (await admin.get(f"/v1/engines/{engine['id']}")).json() == {"engine": engine}


STATIC: list[dict[str, Any]] = [
    {"name": "static-a", "url": "http://static-a:8000/", "baseModel": BASE_MODEL, "apiKey": STATIC_SECRET},
    {
        "name": "static-b",
        "url": "https://static-b.internal",
        "baseModel": "org/other",
        "servedModelName": "other",
        "adapterRoot": "/models/adapters/",
        "maxLoras": 2,
        "maxCpuLoras": 8,
        "maxLoraRank": 64,
        "enabled": False,
    },
]


@pytest.fixture
async def static_app(settings: LorrySettings) -> AsyncIterator[FastAPI]:
    with_static = LorrySettings(**{**settings.model_dump(), "engines": STATIC})
    app = create_app(with_static)
    async with app.router.lifespan_context(app):
        yield app


async def test_static_engines_are_listed_first_and_read_only(
    static_app: FastAPI, settings: LorrySettings
) -> None:
    sessionmaker: async_sessionmaker[AsyncSession] = static_app.state.ctx.sessionmaker
    counter = RowCounter(sessionmaker)
    async with client_for(static_app, settings.bootstrap_admin_token) as admin:
        api_engine = await create(admin, name="api-engine")
        listed = await admin.get("/v1/engines")
        assert listed.status_code == 200
        assert STATIC_SECRET not in listed.text
        engines = listed.json()["engines"]
        assert [(e["id"], e["source"]) for e in engines] == [
            ("static:static-a", "static"),
            ("static:static-b", "static"),
            (api_engine["id"], "api"),
        ]
        a, b = engines[0], engines[1]
        assert set(a) == DTO_KEYS
        assert a == {
            "id": "static:static-a",
            "name": "static-a",
            "url": "http://static-a:8000",
            "baseModel": BASE_MODEL,
            "servedModelName": BASE_MODEL,
            "adapterRoot": settings.adapter_store.resolve().as_posix(),
            "maxLoras": 4,
            "maxCpuLoras": None,
            "maxLoraRank": 16,
            "enabled": True,
            "hasApiKey": True,
            "source": "static",
            "createdAt": None,
            "updatedAt": None,
        }
        assert (b["servedModelName"], b["adapterRoot"], b["maxLoras"], b["maxCpuLoras"]) == (
            "other",
            "/models/adapters",
            2,
            8,
        )
        assert (b["maxLoraRank"], b["enabled"], b["hasApiKey"]) == (64, False, False)

        one = await admin.get("/v1/engines/static:static-a")
        assert one.status_code == 200 and one.json() == {"engine": a}
        assert STATIC_SECRET not in one.text

        before = await counter.snapshot()
        for method, body in (("PATCH", {"enabled": False}), ("PATCH", {}), ("DELETE", None)):
            response = await admin.request(method, "/v1/engines/static:static-a", json=body)
            assert response.status_code == 409, (method, response.text)
            assert response.json()["code"] == "engine_read_only"
            assert "LORRY_ENGINES" in response.json()["error"]
        taken = await admin.post("/v1/engines", json=engine_body(name="static-b"))
        assert taken.status_code == 409 and taken.json()["code"] == "engine_exists"
        renamed = await admin.patch(f"/v1/engines/{api_engine['id']}", json={"name": "static-a"})
        assert renamed.status_code == 409 and renamed.json()["code"] == "engine_exists"
        assert await counter.snapshot() == before
        assert (await admin.get("/v1/engines")).json()["engines"] == engines


async def test_delete_leaves_deployments_without_an_engine(
    admin: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession], settings: LorrySettings
) -> None:
    engine = await create(admin)
    async with sessionmaker() as session:
        org = (await session.execute(select(Organization))).scalar_one()
        project = (await session.execute(select(Project))).scalar_one()
        session.add(
            Deployment(
                org_id=org.id,
                project_id=project.id,
                slug="only-engine",
                target={"kind": "base_model", "baseModel": BASE_MODEL},
                target_kind="base_model",
                base_model=BASE_MODEL,
            )
        )
        await session.commit()
    assert (await admin.delete(f"/v1/engines/{engine['id']}")).status_code == 204
    async with sessionmaker() as session:
        assert (await session.execute(select(Deployment.slug))).scalars().all() == ["only-engine"]
        assert await all_engines(session, settings) == []


def test_static_entries_get_the_api_checks(tmp_path: Path) -> None:
    def with_engines(engines: list[dict[str, Any]]) -> LorrySettings:
        return LorrySettings(adapter_store=tmp_path / "store", engines=engines)

    specs = static_engines(with_engines(STATIC))
    assert [(s.id, s.url, s.api_key) for s in specs] == [
        ("static:static-a", "http://static-a:8000", STATIC_SECRET),
        ("static:static-b", "https://static-b.internal", None),
    ]
    bad_entries: list[dict[str, Any]] = [
        {"name": "x", "url": "ftp://h", "baseModel": "m"},
        {"name": "Bad Name", "url": "http://h", "baseModel": "m"},
        {"name": "x", "url": "http://u:p@h", "baseModel": "m"},
        {"name": "x", "url": "http://h", "baseModel": "m", "adapterRoot": "relative"},
        {"name": "x", "url": "http://h", "baseModel": "m", "maxLoras": 4, "maxCpuLoras": 2},
        {"url": "http://h", "baseModel": "m"},
    ]
    for entry in bad_entries:
        with pytest.raises(ValueError, match=r"LORRY_ENGINES\[0\]"):
            static_engines(with_engines([entry]))
    duplicate = {"name": "x", "url": "http://h", "baseModel": "m"}
    with pytest.raises(ValueError, match=r"LORRY_ENGINES\[1\].*used twice"):
        static_engines(with_engines([duplicate, duplicate]))


async def test_malformed_static_engines_fail_the_start(tmp_path: Path) -> None:
    bad = LorrySettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'never.db'}",
        adapter_store=tmp_path / "store",
        engines=[{"name": "x", "url": "http://user:pw@h", "baseModel": "m"}],
    )
    app = create_app(bad)
    with pytest.raises(ValueError, match=r"LORRY_ENGINES\[0\].*credentials"):
        async with app.router.lifespan_context(app):
            pass
    assert not (tmp_path / "never.db").exists()
