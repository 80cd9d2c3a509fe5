"""`/v1/me`, `/v1/orgs`, `/v1/projects`: shapes, scope rules, and bad input that changes nothing."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from control_plane.tenancy.schemas import is_valid_slug
from lorry import keys
from tests.conftest import RowCounter, client_for

UUID_RE = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


async def make_org(admin: httpx.AsyncClient, slug: str = "acme", name: str = "Acme Inc") -> dict[str, Any]:
    response = await admin.post("/v1/orgs", json={"slug": slug, "name": name})
    assert response.status_code == 201, response.text
    org: dict[str, Any] = response.json()["org"]
    return org


async def make_org_token(admin: httpx.AsyncClient, org_slug: str = "acme") -> str:
    response = await admin.post(
        "/v1/admin-tokens", json={"label": "acme ops", "kind": "org", "orgSlug": org_slug}
    )
    assert response.status_code == 201, response.text
    plaintext: str = response.json()["token"]["plaintext"]
    return plaintext


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code"}, body
    assert body["code"] == code, body
    assert body["error"]


async def test_me_with_the_install_token(admin: httpx.AsyncClient) -> None:
    await make_org(admin)
    response = await admin.get("/v1/me")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"token", "orgSlug", "orgs"}
    assert set(body["token"]) == {"id", "label", "prefix", "kind"}
    assert body["token"]["kind"] == "install"
    assert body["token"]["label"] == "bootstrap"
    assert body["token"]["prefix"].startswith("lorry_admin_")
    assert body["orgSlug"] is None
    assert sorted(org["slug"] for org in body["orgs"]) == ["acme", "default"]
    assert re.match(UUID_RE, body["token"]["id"])
    for org in body["orgs"]:
        assert set(org) == {"id", "slug", "name"}
        assert re.match(UUID_RE, org["id"])


async def test_create_org_and_projects(admin: httpx.AsyncClient, rows: RowCounter) -> None:
    before = await rows.snapshot()
    org = await make_org(admin)
    assert org["slug"] == "acme" and org["name"] == "Acme Inc"
    assert set(org) == {"id", "slug", "name"}

    listed = await admin.get("/v1/projects", params={"orgSlug": "acme"})
    assert listed.status_code == 200, listed.text
    assert listed.json() == {"org": org, "projects": []}

    created = await admin.post(
        "/v1/projects", params={"orgSlug": "acme"}, json={"slug": "bots", "name": " Bots "}
    )
    assert created.status_code == 201, created.text
    project = created.json()["project"]
    assert set(project) == {"id", "slug", "name", "orgId"}
    assert project["slug"] == "bots" and project["name"] == "Bots" and project["orgId"] == org["id"]

    listed = await admin.get("/v1/projects", params={"orgSlug": "acme"})
    assert listed.json()["projects"] == [project]

    # The same project slug is free in another org, taken in the same one.
    other = await admin.post(
        "/v1/projects", params={"orgSlug": "default"}, json={"slug": "bots", "name": "B"}
    )
    assert other.status_code == 201, other.text
    assert other.json()["project"]["orgId"] != org["id"]
    assert_error(
        await admin.post("/v1/projects", params={"orgSlug": "acme"}, json={"slug": "bots", "name": "Again"}),
        409,
        "project_exists",
    )
    assert_error(await admin.post("/v1/orgs", json={"slug": "acme", "name": "Again"}), 409, "org_exists")
    assert_error(await admin.post("/v1/orgs", json={"slug": "default", "name": "Again"}), 409, "org_exists")

    after = await rows.snapshot()
    assert after["organizations"] == before["organizations"] + 1
    assert after["projects"] == before["projects"] + 2
    # One change and one audit event per successful write, none for the conflicts.
    assert after["change_log"] == before["change_log"] + 3
    assert after["audit_events"] == before["audit_events"] + 3

    events = (await admin.get("/v1/audit-events")).json()["events"]
    assert [e["action"] for e in events] == ["project.create", "project.create", "org.create"]
    assert events[-1]["resourceId"] == org["id"] and events[-1]["orgId"] == org["id"]
    assert events[-1]["details"] == {"slug": "acme", "name": "Acme Inc"}
    assert events[1]["resourceType"] == "project" and events[1]["resourceId"] == project["id"]


async def test_unknown_org_is_404_for_install_tokens(admin: httpx.AsyncClient) -> None:
    assert_error(await admin.get("/v1/projects", params={"orgSlug": "nope"}), 404, "org_not_found")


async def test_org_token_is_confined_to_its_org(
    admin: httpx.AsyncClient, control_plane: FastAPI, rows: RowCounter
) -> None:
    org = await make_org(admin)
    token = await make_org_token(admin)
    async with client_for(control_plane, token) as acme:
        me = (await acme.get("/v1/me")).json()
        assert me["token"]["kind"] == "org"
        assert me["token"]["label"] == "acme ops"
        assert me["orgSlug"] == "acme"
        assert me["orgs"] == [org]

        assert (await acme.get("/v1/projects", params={"orgSlug": "acme"})).status_code == 200
        created = await acme.post(
            "/v1/projects", params={"orgSlug": "acme"}, json={"slug": "p1", "name": "P1"}
        )
        assert created.status_code == 201, created.text

        before = await rows.snapshot()
        assert_error(await acme.get("/v1/projects", params={"orgSlug": "default"}), 403, "forbidden")
        # An org token learns nothing about other org slugs: 403 whether or not they exist.
        assert_error(await acme.get("/v1/projects", params={"orgSlug": "no-such-org"}), 403, "forbidden")
        assert_error(
            await acme.post("/v1/projects", params={"orgSlug": "default"}, json={"slug": "x1", "name": "X"}),
            403,
            "forbidden",
        )
        assert_error(await acme.post("/v1/orgs", json={"slug": "evil", "name": "Evil"}), 403, "forbidden")
        # 403 comes before body validation: a bad body does not tell an org token anything either.
        assert_error(await acme.post("/v1/orgs", content=b"{not json"), 403, "forbidden")
        assert await rows.snapshot() == before


async def test_unauthenticated_requests(anonymous: httpx.AsyncClient, control_plane: FastAPI) -> None:
    for path in ("/v1/me", "/v1/projects?orgSlug=default"):
        assert_error(await anonymous.get(path), 401, "unauthorized")
    assert_error(await anonymous.post("/v1/orgs", json={"slug": "acme", "name": "A"}), 401, "unauthorized")
    bad_tokens = [
        "nonsense",
        "lorry_admin_",
        "lorry_admin_AAAAAAAAAAAA_" + "A" * 49,  # right shape, wrong CRC
    ]
    bad_tokens.append(keys.issue(keys.TokenKind.DEPLOYMENT_KEY).plaintext)  # a deployment key
    bad_tokens.append(keys.issue(keys.TokenKind.ADMIN_TOKEN).plaintext)  # well-formed, unknown kid
    for token in bad_tokens:
        async with client_for(control_plane, token) as client:
            assert_error(await client.get("/v1/me"), 401, "unauthorized")
    async with client_for(control_plane) as client:
        assert_error(await client.get("/v1/me", headers={"authorization": "Basic abc"}), 401, "unauthorized")


BAD_SLUGS = ["a", "A1", "-ab", "ab-", "a--b", "a_b", "a b", "ab.", "x" * 51, "ümlaut", ""]


@pytest.mark.parametrize("slug", ["ab", "a1", "a-b", "0-9", "x" * 50, "default-2"])
def test_valid_slugs(slug: str) -> None:
    assert is_valid_slug(slug)


@pytest.mark.parametrize("slug", BAD_SLUGS)
def test_invalid_slugs(slug: str) -> None:
    assert not is_valid_slug(slug)


async def test_bad_input_changes_nothing(admin: httpx.AsyncClient, rows: RowCounter) -> None:
    await make_org(admin)
    before = await rows.snapshot()
    scope = {"orgSlug": "acme"}
    cases: list[tuple[str, dict[str, Any], str]] = []
    for slug in BAD_SLUGS:
        cases.append(("/v1/orgs", {"json": {"slug": slug, "name": "N"}}, "invalid_slug"))
        cases.append(("/v1/projects", {"params": scope, "json": {"slug": slug, "name": "N"}}, "invalid_slug"))
    for path, params in (("/v1/orgs", {}), ("/v1/projects", scope)):
        for body, code in [
            (b"{not json", "invalid_request"),
            (b"[]", "invalid_request"),
            (b'"acme"', "invalid_request"),
            (b"", "invalid_request"),
        ]:
            cases.append(
                (
                    path,
                    {"params": params, "content": body, "headers": {"content-type": "application/json"}},
                    code,
                )
            )
        for json_body in [
            {"slug": 12, "name": "N"},
            {"slug": "okay", "name": 12},
            {"slug": ["okay"], "name": "N"},
            {"slug": "okay", "name": None},
            {"slug": "okay"},
            {"name": "N"},
            {"slug": "okay", "name": "N", "extra": 1},
            {"slug": "okay", "name": ""},
            {"slug": "okay", "name": "   "},
            {"slug": "okay", "name": "n" * 201},
        ]:
            cases.append((path, {"params": params, "json": json_body}, "invalid_request"))
    cases.append(("/v1/projects", {"json": {"slug": "okay", "name": "N"}}, "scope_required"))
    cases.append(
        ("/v1/projects", {"params": {"orgSlug": ""}, "json": {"slug": "okay", "name": "N"}}, "scope_required")
    )
    for path, kwargs, code in cases:
        response = await admin.post(path, **kwargs)
        assert_error(response, 400, code)
    assert_error(await admin.get("/v1/projects"), 400, "scope_required")
    assert await rows.snapshot() == before
    # The right bodies would have worked: the failures above are the input's fault.
    assert (await admin.post("/v1/orgs", json={"slug": "okay", "name": "N"})).status_code == 201
    assert (
        await admin.post("/v1/projects", params=scope, json={"slug": "okay", "name": "N"})
    ).status_code == 201


async def test_openapi_describes_tenancy_routes(admin: httpx.AsyncClient) -> None:
    schema = (await admin.get("/openapi.json")).json()
    paths = schema["paths"]
    assert "201" in paths["/v1/orgs"]["post"]["responses"]
    assert "201" in paths["/v1/projects"]["post"]["responses"]
    assert "200" in paths["/v1/me"]["get"]["responses"]
    assert "422" not in paths["/v1/projects"]["post"]["responses"]
    me_schema = paths["/v1/me"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert me_schema == {"$ref": "#/components/schemas/MeResponse"}
