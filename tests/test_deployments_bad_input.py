"""Bad input to `/v1/endpoints` and its keys: the documented 4xx envelope, and not one row changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from control_plane.deployments.slugs import slug_problem
from lorry import keys
from lorry.settings import LorrySettings
from tests.conftest import DEFAULT_SCOPE, RowCounter
from tests.test_deployments import assert_error, base_target, checkpoint_target, create

JSON = {"content-type": "application/json"}
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str  # `{dep}` and `{key}` are filled in with a live deployment and key
    status: int
    code: str
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] | None = None


def create_case(name: str, body: Any, status: int = 400, code: str = "invalid_request") -> Case:
    return Case(name, "POST", "/v1/endpoints", status, code, json=body)


def slug_case(slug: str) -> Case:
    return create_case(f"slug {slug!r}", {"slug": slug, "target": base_target()}, code="invalid_slug")


def patch_case(name: str, body: Any, code: str = "invalid_request") -> Case:
    return Case(name, "PATCH", "/v1/endpoints/{dep}", 400, code, json=body)


def raw_case(name: str, method: str, path: str, content: bytes) -> Case:
    return Case(name, method, path, 400, "invalid_request", content=content, headers=JSON)


CASES = [
    # Not a JSON object.
    raw_case("malformed JSON", "POST", "/v1/endpoints", b'{"slug": "abc", '),
    raw_case("JSON array", "POST", "/v1/endpoints", b'[{"slug": "abc"}]'),
    raw_case("JSON string", "POST", "/v1/endpoints", b'"abc"'),
    raw_case("JSON number", "POST", "/v1/endpoints", b"42"),
    raw_case("JSON null", "POST", "/v1/endpoints", b"null"),
    raw_case("empty body", "POST", "/v1/endpoints", b""),
    raw_case("malformed JSON on PATCH", "PATCH", "/v1/endpoints/{dep}", b"{enabled: false}"),
    raw_case("JSON array on PATCH", "PATCH", "/v1/endpoints/{dep}", b"[]"),
    raw_case("malformed JSON on key create", "POST", "/v1/endpoints/{dep}/keys", b'{"label": '),
    raw_case("JSON array on roll", "POST", "/v1/endpoints/{dep}/keys/{key}/roll", b"[]"),
    raw_case("lone surrogate in a label", "POST", "/v1/endpoints/{dep}/keys", b'{"label": "a\\ud800b"}'),
    raw_case(
        "NaN retention days",
        "POST",
        "/v1/endpoints",
        b'{"slug": "abc", "target": {"kind": "base_model", "baseModel": "x"}, "runRetentionDays": NaN}',
    ),
    Case(
        "lone surrogate in a slug",
        "POST",
        "/v1/endpoints",
        400,
        "invalid_slug",
        content=b'{"slug": "a\\ud800b", "target": {"kind": "base_model", "baseModel": "x"}}',
        headers=JSON,
    ),
    Case(
        "lone surrogate in a jobId",
        "POST",
        "/v1/endpoints",
        404,
        "job_not_found",
        content=b'{"slug": "abc", "target": {"kind": "adapter", "adapter": '
        b'{"kind": "final", "jobId": "\\ud800"}}}',
        headers=JSON,
    ),
    create_case(
        "NUL in a jobId",
        {"slug": "abc", "target": {"kind": "adapter", "adapter": {"kind": "final", "jobId": "\u0000"}}},
        404,
        "job_not_found",
    ),
    # Wrong types: nothing is coerced.
    create_case("slug as int", {"slug": 12345, "target": base_target()}),
    create_case("slug as null", {"slug": None, "target": base_target()}),
    create_case("step as string", {"slug": "abc", "target": checkpoint_target(UNKNOWN_ID, "3")}),
    create_case("step as float", {"slug": "abc", "target": checkpoint_target(UNKNOWN_ID, 3.0)}),
    create_case("step as bool", {"slug": "abc", "target": checkpoint_target(UNKNOWN_ID, True)}),
    create_case("negative step", {"slug": "abc", "target": checkpoint_target(UNKNOWN_ID, -1)}),
    create_case("step beyond int32", {"slug": "abc", "target": checkpoint_target(UNKNOWN_ID, 2**31)}),
    create_case(
        "jobId as int",
        {"slug": "abc", "target": {"kind": "adapter", "adapter": {"kind": "final", "jobId": 7}}},
    ),
    create_case("authMode as bool", {"slug": "abc", "target": base_target(), "authMode": True}),
    create_case("unknown authMode", {"slug": "abc", "target": base_target(), "authMode": "oauth"}),
    create_case(
        "runRetentionDays as string", {"slug": "abc", "target": base_target(), "runRetentionDays": "7"}
    ),
    patch_case("enabled as string", {"enabled": "true"}),
    patch_case("enabled as int", {"enabled": 1}),
    patch_case("enabled as null", {"enabled": None}),
    patch_case("target as null", {"target": None}),
    patch_case("authMode as null", {"authMode": None}),
    patch_case("unknown field on PATCH", {"enabled": False, "color": "blue"}),
    patch_case("slug on PATCH", {"slug": "new-name"}, code="immutable_field"),
    patch_case("days without runRetentionDays", {"runRetentionMode": "days"}),
    patch_case("runRetentionDays with another mode", {"runRetentionMode": "disabled", "runRetentionDays": 3}),
    patch_case("bad target on PATCH", {"target": {"kind": "adapter"}}),
    # Targets.
    create_case("missing target", {"slug": "abc"}),
    create_case("target as string", {"slug": "abc", "target": "base_model"}),
    create_case("unknown target kind", {"slug": "abc", "target": {"kind": "model_menu"}}),
    create_case("target kind missing", {"slug": "abc", "target": {"baseModel": "x"}}),
    create_case("target kind as int", {"slug": "abc", "target": {"kind": 1, "baseModel": "x"}}),
    create_case(
        "unknown adapter kind",
        {"slug": "abc", "target": {"kind": "adapter", "adapter": {"kind": "merged", "jobId": UNKNOWN_ID}}},
    ),
    create_case("adapter missing", {"slug": "abc", "target": {"kind": "adapter"}}),
    create_case(
        "checkpoint without step",
        {
            "slug": "abc",
            "target": {"kind": "adapter", "adapter": {"kind": "checkpoint", "jobId": UNKNOWN_ID}},
        },
    ),
    create_case(
        "final with a step",
        {
            "slug": "abc",
            "target": {"kind": "adapter", "adapter": {"kind": "final", "jobId": UNKNOWN_ID, "step": 1}},
        },
    ),
    create_case("extra field in target", {"slug": "abc", "target": {**base_target(), "revision": "main"}}),
    create_case("empty baseModel", {"slug": "abc", "target": base_target("")}),
    create_case("blank baseModel", {"slug": "abc", "target": base_target("   ")}),
    create_case("baseModel over 300 chars", {"slug": "abc", "target": base_target("m" * 301)}),
    create_case("NUL in baseModel", {"slug": "abc", "target": base_target("acme/\u0000model")}),
    create_case("unknown field", {"slug": "abc", "target": base_target(), "enabled": True, "region": "eu"}),
    create_case(
        "customDomain on create", {"slug": "abc", "target": base_target(), "customDomain": "x.example"}
    ),
    # Slugs: each rule, with its own message.
    slug_case("MyModel"),
    slug_case("dép-model"),
    slug_case("ab--cd"),
    slug_case("-abc"),
    slug_case("abc-"),
    slug_case("a"),
    slug_case(""),
    slug_case("a" * 51),
    slug_case("ab cd"),
    slug_case("ab_cd"),
    slug_case("ab.cd"),
    slug_case("abc\n"),
    slug_case("api"),
    slug_case("www"),
    slug_case("admin"),
    # Keys.
    Case("empty label", "POST", "/v1/endpoints/{dep}/keys", 400, "invalid_request", json={"label": ""}),
    Case("blank label", "POST", "/v1/endpoints/{dep}/keys", 400, "invalid_request", json={"label": "   "}),
    Case("label of 81", "POST", "/v1/endpoints/{dep}/keys", 400, "invalid_request", json={"label": "x" * 81}),
    Case("label as int", "POST", "/v1/endpoints/{dep}/keys", 400, "invalid_request", json={"label": 5}),
    Case("label missing", "POST", "/v1/endpoints/{dep}/keys", 400, "invalid_request", json={}),
    Case(
        "naive expiresAt",
        "POST",
        "/v1/endpoints/{dep}/keys",
        400,
        "invalid_request",
        json={"label": "x", "expiresAt": "2999-01-01T00:00:00"},
    ),
    Case(
        "past expiresAt",
        "POST",
        "/v1/endpoints/{dep}/keys",
        400,
        "invalid_request",
        json={"label": "x", "expiresAt": "2001-01-01T00:00:00Z"},
    ),
    Case(
        "expiresAt as epoch",
        "POST",
        "/v1/endpoints/{dep}/keys",
        400,
        "invalid_request",
        json={"label": "x", "expiresAt": 32503680000},
    ),
    Case(
        "expiresAt not a date",
        "POST",
        "/v1/endpoints/{dep}/keys",
        400,
        "invalid_request",
        json={"label": "x", "expiresAt": "next tuesday"},
    ),
    Case(
        "unknown key field",
        "POST",
        "/v1/endpoints/{dep}/keys",
        400,
        "invalid_request",
        json={"label": "x", "scopes": ["chat"]},
    ),
    Case(
        "negative grace",
        "POST",
        "/v1/endpoints/{dep}/keys/{key}/roll",
        400,
        "invalid_request",
        json={"gracePeriodSeconds": -1},
    ),
    Case(
        "grace over a week",
        "POST",
        "/v1/endpoints/{dep}/keys/{key}/roll",
        400,
        "invalid_request",
        json={"gracePeriodSeconds": 604_801},
    ),
    Case(
        "grace as string",
        "POST",
        "/v1/endpoints/{dep}/keys/{key}/roll",
        400,
        "invalid_request",
        json={"gracePeriodSeconds": "60"},
    ),
    Case(
        "unknown roll field",
        "POST",
        "/v1/endpoints/{dep}/keys/{key}/roll",
        400,
        "invalid_request",
        json={"gracePeriodSeconds": 60, "label": "renamed"},
    ),
    # Ids: malformed is 404, exactly like unknown.
    Case("malformed id GET", "GET", "/v1/endpoints/not-a-uuid", 404, "deployment_not_found"),
    Case("uppercase id GET", "GET", "/v1/endpoints/{DEP}", 404, "deployment_not_found"),
    Case("unknown id GET", "GET", f"/v1/endpoints/{UNKNOWN_ID}", 404, "deployment_not_found"),
    Case(
        "malformed id PATCH",
        "PATCH",
        "/v1/endpoints/x%00y",
        404,
        "deployment_not_found",
        json={"enabled": False},
    ),
    Case("malformed id DELETE", "DELETE", "/v1/endpoints/1' OR '1'='1", 404, "deployment_not_found"),
    Case("malformed id keys", "GET", "/v1/endpoints/%E2%98%83/keys", 404, "deployment_not_found"),
    Case("malformed key id", "DELETE", "/v1/endpoints/{dep}/keys/nope", 404, "key_not_found"),
    Case("malformed key id roll", "POST", "/v1/endpoints/{dep}/keys/%00/roll", 404, "key_not_found"),
    # Methods and routes.
    Case(
        "PUT on a deployment",
        "PUT",
        "/v1/endpoints/{dep}",
        405,
        "method_not_allowed",
        json={"enabled": False},
    ),
    Case("POST on a deployment", "POST", "/v1/endpoints/{dep}", 405, "method_not_allowed", json={}),
    Case("DELETE on the collection", "DELETE", "/v1/endpoints", 405, "method_not_allowed"),
    Case("GET on roll", "GET", "/v1/endpoints/{dep}/keys/{key}/roll", 405, "method_not_allowed"),
    Case("PATCH on a key", "PATCH", "/v1/endpoints/{dep}/keys/{key}", 405, "method_not_allowed", json={}),
    Case("unknown sub-route", "GET", "/v1/endpoints/{dep}/runs", 404, "not_found"),
    # Scope.
    Case("no scope", "GET", "/v1/endpoints", 400, "scope_required", params={}),
    Case(
        "unknown org",
        "POST",
        "/v1/endpoints",
        404,
        "org_not_found",
        json={"slug": "abc", "target": base_target()},
        params={"orgSlug": "nope", "projectSlug": "default"},
    ),
]


@pytest.fixture
async def live(admin: httpx.AsyncClient) -> dict[str, str]:
    deployment = await create(admin, "target-of-abuse")
    response = await admin.post(
        f"/v1/endpoints/{deployment['id']}/keys", params=DEFAULT_SCOPE, json={"label": "k"}
    )
    assert response.status_code == 201
    return {"dep": deployment["id"], "DEP": deployment["id"].upper(), "key": response.json()["key"]["id"]}


async def send(client: httpx.AsyncClient, case: Case, live: dict[str, str]) -> httpx.Response:
    path = case.path.replace("{dep}", live["dep"]).replace("{DEP}", live["DEP"]).replace("{key}", live["key"])
    return await client.request(
        case.method,
        path,
        params=DEFAULT_SCOPE if case.params is None else case.params,
        json=case.json,
        content=case.content,
        headers=case.headers,
    )


async def test_bad_input_changes_nothing(
    admin: httpx.AsyncClient, live: dict[str, str], rows: RowCounter
) -> None:
    """Every case in one database (a fresh one per case would cost minutes); failures are listed by name."""
    failures: list[str] = []
    for case in CASES:
        before = await rows.snapshot()
        response = await send(admin, case, live)
        try:
            body = assert_error(response, case.status, case.code)
            assert "detail" not in body
            assert await rows.snapshot() == before, "rows changed"
        except AssertionError as exc:
            failures.append(f"{case.name}: {exc}")
    assert not failures, "\n".join(failures)
    # The deployment and its key are untouched.
    deployment = await admin.get(f"/v1/endpoints/{live['dep']}", params=DEFAULT_SCOPE)
    assert deployment.status_code == 200 and deployment.json()["deployment"]["enabled"] is True
    keys_listed = await admin.get(f"/v1/endpoints/{live['dep']}/keys", params=DEFAULT_SCOPE)
    assert [k["enabled"] for k in keys_listed.json()["keys"]] == [True]


def test_case_names_are_unique() -> None:
    assert len({case.name for case in CASES}) == len(CASES)


async def test_slug_errors_name_the_rule(admin: httpx.AsyncClient) -> None:
    expectations = {
        "a": "2 to 50",
        "a" * 51: "2 to 50",
        "MyModel": "lowercase",
        "dép-model": "lowercase",
        "-abc": "start and end",
        "abc-": "start and end",
        "ab--cd": "'--'",
        "api": "reserved",
    }
    for slug, words in expectations.items():
        response = await admin.post(
            "/v1/endpoints", params=DEFAULT_SCOPE, json={"slug": slug, "target": base_target()}
        )
        body = assert_error(response, 400, "invalid_slug")
        assert words in body["error"], (slug, body)


def test_reserved_slugs_are_configurable() -> None:
    default = LorrySettings().reserved_slugs
    custom = LorrySettings(reserved_slugs="billing, Secret").reserved_slugs  # as LORRY_RESERVED_SLUGS reads
    assert slug_problem("billing", custom) == "Slug 'billing' is reserved"
    assert slug_problem("secret", custom) == "Slug 'secret' is reserved"
    assert slug_problem("api", custom) is None
    assert slug_problem("api", default) == "Slug 'api' is reserved"
    assert slug_problem("a" * 50, default) is None
    assert slug_problem("0x", default) is None


async def test_oversized_bodies_are_413(
    admin: httpx.AsyncClient, live: dict[str, str], rows: RowCounter, settings: LorrySettings
) -> None:
    before = await rows.snapshot()
    padding = "x" * settings.max_body_bytes
    for method, path, body in (
        ("POST", "/v1/endpoints", {"slug": "huge", "target": base_target(padding)}),
        ("PATCH", f"/v1/endpoints/{live['dep']}", {"target": base_target(padding)}),
        ("POST", f"/v1/endpoints/{live['dep']}/keys", {"label": padding}),
    ):
        response = await admin.request(method, path, params=DEFAULT_SCOPE, json=body)
        body_json = assert_error(response, 413, "payload_too_large")
        assert "detail" not in body_json
    assert await rows.snapshot() == before


async def test_credentials_are_required(
    anonymous: httpx.AsyncClient, admin: httpx.AsyncClient, live: dict[str, str], rows: RowCounter
) -> None:
    before = await rows.snapshot()
    well_formed_unknown = keys.issue(keys.TokenKind.ADMIN_TOKEN).plaintext
    deployment_key_as_admin = keys.issue(keys.TokenKind.DEPLOYMENT_KEY).plaintext
    requests: list[tuple[str, str, Any]] = [
        ("GET", "/v1/endpoints", None),
        ("POST", "/v1/endpoints", {"slug": "sneaky", "target": base_target()}),
        ("GET", f"/v1/endpoints/{live['dep']}", None),
        ("PATCH", f"/v1/endpoints/{live['dep']}", {"enabled": False}),
        ("DELETE", f"/v1/endpoints/{live['dep']}", None),
        ("GET", f"/v1/endpoints/{live['dep']}/keys", None),
        ("POST", f"/v1/endpoints/{live['dep']}/keys", {"label": "sneaky"}),
        ("DELETE", f"/v1/endpoints/{live['dep']}/keys/{live['key']}", None),
        ("POST", f"/v1/endpoints/{live['dep']}/keys/{live['key']}/roll", None),
    ]
    for headers in (
        {},
        {"authorization": "Bearer not-a-token"},
        {"authorization": f"Bearer {well_formed_unknown}"},
        {"authorization": f"Bearer {deployment_key_as_admin}"},
        {"authorization": f"Basic {well_formed_unknown}"},
    ):
        for method, path, body in requests:
            response = await anonymous.request(method, path, params=DEFAULT_SCOPE, json=body, headers=headers)
            payload = assert_error(response, 401, "unauthorized")
            assert "detail" not in payload
    assert await rows.snapshot() == before
