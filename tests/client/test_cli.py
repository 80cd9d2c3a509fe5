"""The `lorry` console script, end to end, against a real control plane on a real port.

Each command runs as its own process (`.venv/bin/lorry`), with `HOME` and the working directory
in a temporary folder and no `LORRY_*` variables, so `lorry login` writes the credentials every
later command resolves, and no command gets a scope flag.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from control_plane.app import create_app
from lorry import CloudApiClient, DeploymentScope
from lorry.settings import LorrySettings
from tests.client.support import adapter_archive, serve_in_thread, training_output
from tests.conftest import ADMIN_TOKEN
from tests.support.adapters import BASE_MODEL

LORRY = Path(sys.executable).parent / "lorry"
SCOPE = DeploymentScope(org_slug="default", project_slug="default")


@dataclass
class Cli:
    home: Path
    cwd: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if not name.startswith("LORRY_")}
        env.update(HOME=str(self.home), COLUMNS="200", NO_COLOR="1", **self.extra_env)
        return env

    def run(self, *args: str, ok: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(LORRY), *args],
            env=self.env(),
            cwd=self.cwd,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if ok:
            assert result.returncode == 0, f"lorry {' '.join(args)}: {result.stderr}"
        return result

    def json(self, *args: str) -> Any:
        """`--json` output must be JSON alone on stdout."""
        return json.loads(self.run(*args, "--json").stdout)

    def fails(self, *args: str) -> str:
        result = self.run(*args, ok=False)
        assert result.returncode != 0, f"lorry {' '.join(args)} should have failed: {result.stdout}"
        assert "Traceback" not in result.stderr
        return result.stderr


@dataclass
class Stack:
    url: str
    settings: LorrySettings
    cli: Cli


@pytest.fixture
def stack(settings: LorrySettings, tmp_path: Path) -> Iterator[Stack]:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    with serve_in_thread(create_app(settings)) as url:
        yield Stack(url, settings, Cli(home, work))


def test_deployment_and_key_lifecycle_with_no_scope_flags(stack: Stack, tmp_path: Path) -> None:
    cli = stack.cli
    assert "lorry login" in cli.fails("deployments", "list")

    # Login: checked against the server, saved under $HOME with mode 0600.
    assert "401" in cli.fails("login", "--token", "lorry_admin_wrong", "--url", stack.url)
    login = cli.run("login", "--url", stack.url, stdin=f"{ADMIN_TOKEN}\n")  # the token is prompted for
    assert ADMIN_TOKEN not in login.stdout + login.stderr
    saved = stack.cli.home / ".lorry" / "credentials.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text()) == {"token": ADMIN_TOKEN, "apiUrl": stack.url}

    # An adapter: imported from the server's disk, and one uploaded.
    output = training_output(stack.settings.import_roots[0], "run-7", steps=(10,))
    job = cli.json("jobs", "import", str(output))
    assert (job["name"], job["status"], job["config"]["model"]) == ("run-7", "completed", BASE_MODEL)
    uploaded = cli.run(
        "jobs", "upload", str(adapter_archive(tmp_path, "extra")), "--model", BASE_MODEL, "--json"
    )
    artifact = json.loads(uploaded.stdout)  # the progress bar went to stderr, not into the JSON
    assert artifact["job"]["status"] == "completed" and artifact["adapter"]["kind"] == "final"
    assert {j["id"] for j in cli.json("jobs", "list")} == {job["id"], artifact["job"]["id"]}

    # A deployment.
    created = cli.json("deployments", "create", "support-bot", "--job", job["id"])
    assert created["slug"] == "support-bot" and created["target"] == {
        "kind": "adapter",
        "adapter": {"kind": "final", "jobId": job["id"]},
    }
    assert created["createdAt"].endswith("Z") and len(created["createdAt"]) == len("2025-01-01T00:00:00.000Z")
    assert [d["id"] for d in cli.json("deployments", "list")] == [created["id"]]
    assert cli.json("deployments", "get", "support-bot")["id"] == created["id"]
    assert cli.json("deployments", "disable", "support-bot")["enabled"] is False
    assert cli.json("deployments", "enable", "support-bot")["enabled"] is True
    moved = cli.json("deployments", "update", "support-bot", "--job", job["id"], "--step", "10")
    assert moved["target"]["adapter"] == {"kind": "checkpoint", "jobId": job["id"], "step": 10}
    table = cli.run("deployments", "list").stdout
    assert "support-bot" in table and created["id"] in table

    # Keys: create, roll, revoke.
    key = cli.json(
        "keys",
        "create",
        "--deployment",
        "support-bot",
        "--label",
        "prod",
        "--expires-at",
        "2099-01-31T12:00:00+01:00",
    )
    assert key["plaintext"].startswith("lorry_") and key["label"] == "prod"
    assert key["expiresAt"] == "2099-01-31T11:00:00.000Z"
    plain = cli.run("keys", "create", "-d", "support-bot", "--label", "staging").stdout
    assert plain.startswith("Key: lorry_") and plain.count("\n") == 1
    second = plain.removeprefix("Key: ").strip()
    rolled = cli.json("keys", "roll", key["id"], "--deployment", "support-bot", "--grace", "0")
    assert rolled["previous"]["id"] == key["id"] and rolled["key"]["label"] == "prod"
    assert rolled["key"]["plaintext"] not in (key["plaintext"], second)
    assert cli.json("keys", "revoke", rolled["key"]["id"], "--deployment", "support-bot") == {
        "revoked": rolled["key"]["id"]
    }
    listed = cli.json("keys", "list", "--deployment", "support-bot")
    enabled = {
        k["label"]: k["enabled"] for k in listed if k["id"] != key["id"] and k["id"] != rolled["key"]["id"]
    }
    assert enabled == {"staging": True}
    assert {k["id"]: k["enabled"] for k in listed}[key["id"]] is False
    assert all("plaintext" not in k for k in listed)

    # An incident: roll every active key at once.
    incident = cli.json("keys", "roll", "--all", "--deployment", "support-bot", "--grace", "0")
    assert [r["key"]["label"] for r in incident] == ["staging"]
    assert all(
        not k["enabled"] for k in cli.json("keys", "list", "-d", "support-bot") if k["label"] == "prod"
    )

    # The server agrees with what the CLI printed.
    with CloudApiClient(stack.url, ADMIN_TOKEN) as client:
        keys = client.list_deployment_keys(created["id"], SCOPE)
        assert sorted(k.label for k in keys if k.enabled) == ["staging"]
        assert incident[0]["key"]["id"] in {k.id for k in keys if k.enabled}

    # A failing command: non-zero, the server's message on stderr, nothing on stdout.
    failed = cli.run("deployments", "create", "support-bot", "--base-model", BASE_MODEL, "--json", ok=False)
    assert failed.returncode != 0 and failed.stdout == ""
    assert "Deployment slug 'support-bot' is already taken" in failed.stderr and "409" in failed.stderr
    assert "in_use" in cli.fails("jobs", "delete", job["id"])
    assert "deployment_not_found" in cli.fails("deployments", "get", "00000000-0000-0000-0000-000000000000")
    assert "no deployment 'nope'" in cli.fails("keys", "list", "-d", "nope")

    assert cli.json("deployments", "delete", "support-bot") == {"deleted": created["id"]}
    assert cli.json("jobs", "delete", job["id"]) == {"deleted": job["id"]}
    with CloudApiClient(stack.url, ADMIN_TOKEN) as client:
        assert client.list_deployments(SCOPE) == []
        assert [j.id for j in client.list_jobs(SCOPE)] == [artifact["job"]["id"]]
    events = cli.json("audit", "list", "--action", "deployment.create", "--since", "2020-01-01")
    assert [e["resourceId"] for e in events] == [created["id"]]


# The commands below are client code only; one backend is enough for them (each CLI process costs
# about a second of CPU), while the lifecycle above runs on both.
ONE_BACKEND = pytest.mark.parametrize("backend", ["sqlite"])


@ONE_BACKEND
def test_scope_resolution_and_tenancy_commands(stack: Stack) -> None:
    cli = stack.cli
    cli.run("login", "--token", ADMIN_TOKEN, "--url", stack.url)
    assert [o["slug"] for o in cli.json("orgs", "list")] == ["default"]
    assert [p["slug"] for p in cli.json("projects", "list")] == ["default"]

    # A second project: "the only project" no longer resolves; the flag, env and credentials do.
    assert cli.json("projects", "create", "web", "--name", "Web")["slug"] == "web"
    assert "several projects" in cli.fails("deployments", "list")
    base = ("--base-model", BASE_MODEL)
    assert cli.json("deployments", "create", "in-web", *base, "--project", "web")["slug"] == "in-web"
    cli.extra_env["LORRY_PROJECT"] = "web"
    assert [d["slug"] for d in cli.json("deployments", "list")] == ["in-web"]
    assert cli.json("deployments", "list", "--project", "default") == []  # the flag beats the variable
    del cli.extra_env["LORRY_PROJECT"]
    cli.run("login", "--token", ADMIN_TOKEN, "--url", stack.url, "--project", "web")
    assert [d["slug"] for d in cli.json("deployments", "list")] == ["in-web"]
    assert "no project 'nope'" in cli.fails(
        "login", "--token", ADMIN_TOKEN, "--url", stack.url, "--project", "nope"
    )

    # A second org: the install token no longer has an only org.
    assert cli.json("orgs", "create", "acme", "--name", "Acme")["slug"] == "acme"
    cli.run("login", "--token", ADMIN_TOKEN, "--url", stack.url)
    assert "several orgs" in cli.fails("deployments", "list")
    cli.extra_env["LORRY_ORG"] = "acme"
    assert "org 'acme' has no projects" in cli.fails("deployments", "list")
    ops = cli.json("projects", "create", "ops")
    assert [p["id"] for p in cli.json("projects", "list")] == [ops["id"]]
    assert cli.json("deployments", "list") == []
    del cli.extra_env["LORRY_ORG"]

    # Admin tokens: an org token resolves its own org with no flag at all.
    created = cli.json("admin", "create-token", "--kind", "org", "--org", "acme", "--label", "acme-ci")
    assert created["token"].startswith("lorry_admin_") and created["kind"] == "org"
    tokens = cli.json("admin", "tokens", "list", "--org", "acme")
    assert [(t["id"], t["label"], t["enabled"]) for t in tokens] == [(created["id"], "acme-ci", True)]
    org_cli = Cli(stack.cli.home.parent / "org-home", stack.cli.cwd)
    org_cli.home.mkdir()
    org_cli.run("login", "--token", created["token"], "--url", stack.url)
    assert [d["slug"] for d in org_cli.json("deployments", "list")] == []  # acme/ops, resolved
    assert "403" in org_cli.fails("deployments", "list", "--org", "default", "--project", "default")
    assert "403" in org_cli.fails("orgs", "create", "mine")
    rolled = cli.json("admin", "tokens", "roll", created["id"], "--grace", "0")
    assert rolled["previous"]["id"] == created["id"] and rolled["token"]["label"] == "acme-ci"
    assert "401" in org_cli.fails("deployments", "list")  # the old token stopped at once
    assert cli.json("admin", "tokens", "revoke", rolled["token"]["id"]) == {"revoked": rolled["token"]["id"]}
    assert not any(t["enabled"] for t in cli.json("admin", "tokens", "list", "--org", "acme"))


@ONE_BACKEND
def test_first_token_from_the_database_then_engine_commands(stack: Stack) -> None:
    cli = stack.cli
    # No credentials yet: `admin create-token` mints the first token straight in the database.
    cli.extra_env["LORRY_DATABASE_URL"] = stack.settings.database_url
    first = cli.json("admin", "create-token", "--label", "operator")
    del cli.extra_env["LORRY_DATABASE_URL"]
    assert first["token"].startswith("lorry_admin_") and first["kind"] == "install"
    cli.run("login", "--token", first["token"], "--url", stack.url)
    assert "operator" in {t["label"] for t in cli.json("admin", "tokens", "list")}
    engine = cli.json(
        "engines",
        "add",
        "cpu-1",
        "--url",
        "http://127.0.0.1:9",
        "--base-model",
        BASE_MODEL,
        "--api-key",
        "k1",
    )
    assert engine["name"] == "cpu-1" and engine["hasApiKey"] is True and "k1" not in json.dumps(engine)
    assert [e["id"] for e in cli.json("engines", "list")] == [engine["id"]]
    changed = cli.json("engines", "update", engine["id"], "--max-loras", "2", "--disabled", "--no-api-key")
    assert (changed["maxLoras"], changed["enabled"], changed["hasApiKey"]) == (2, False, False)
    assert "cpu-1" in cli.run("engines", "list").stdout
    assert "invalid_request" in cli.fails("engines", "update", engine["id"], "--max-loras", "0")
    assert cli.json("engines", "remove", engine["id"]) == {"deleted": engine["id"]}
    assert cli.json("engines", "list") == []
    assert "engine_not_found" in cli.fails("engines", "remove", engine["id"])
