"""The README's "Admin API walkthrough (curl)" runs as written against a real control plane.

The one `sh` block of that section is run with `bash -euo pipefail` against uvicorn on a real port
(on SQLite and on PostgreSQL), with only `LORRY_ADMIN_URL` and `LORRY_ADMIN_TOKEN` set. It must
end with `walkthrough ok`, show the new key's plaintext exactly once (the create step) and never
in the listing, and leave the database as it says: the deployment disabled and soft-deleted, and
every one of its keys revoked.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import select

from control_plane.app import create_app
from lorry import keys
from lorry.db.engine import create_engine, create_sessionmaker
from lorry.db.models import AuditEvent, Deployment, DeploymentKey
from lorry.settings import LorrySettings
from tests.conftest import ADMIN_TOKEN
from tests.support.markdown import readme_block

HEADING = "## Admin API walkthrough (curl)"
TOKEN_LIKE = re.compile(r"lorry_(?:admin_)?[0-9A-Za-z]{12}_[0-9A-Za-z]{16,}")
"""Anything that looks like a whole key or token, not just its `lorry_<kid>` display prefix."""


def tools_or_skip() -> None:
    missing = [tool for tool in ("bash", "curl", "jq") if shutil.which(tool) is None]
    if missing:
        reason = f"the README walkthrough needs {', '.join(missing)} (Debian: apt-get install -y jq curl)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """`app` (lifespan included) under uvicorn on 127.0.0.1 and a free port, in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        async with asyncio.timeout(60):
            while not server.started:
                assert thread.is_alive(), "the control plane failed to start"
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.to_thread(thread.join, 30)
        sock.close()


async def run_walkthrough(url: str) -> tuple[int, str, str]:
    script = readme_block(HEADING, "sh")
    # Only what the README names: no proxies, no LORRY_* settings leaking in from the test run.
    env = {
        "PATH": os.environ["PATH"],
        "LANG": "C.UTF-8",
        "LORRY_ADMIN_URL": url,
        "LORRY_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        "-c",
        script,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def json_lines(output: str) -> list[dict[str, Any]]:
    parsed = []
    for line in output.splitlines():
        if line.startswith("{"):
            value = json.loads(line)
            assert isinstance(value, dict)
            parsed.append(value)
    return parsed


async def test_the_readme_walkthrough_runs_as_written(settings: LorrySettings) -> None:
    tools_or_skip()
    async with serving(create_app(settings)) as url:
        status, out, err = await run_walkthrough(url)
    assert status == 0, f"exit {status}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert out.splitlines()[-1] == "walkthrough ok", out
    assert ADMIN_TOKEN not in out + err

    # The plaintext: shown once, by the create step, and nothing else that looks like a key.
    [plaintext_line] = [line for line in out.splitlines() if line.startswith("plaintext: ")]
    plaintext = plaintext_line.removeprefix("plaintext: ")
    parsed = keys.parse(plaintext)
    assert parsed is not None and parsed.kind is keys.TokenKind.DEPLOYMENT_KEY, plaintext_line
    assert TOKEN_LIKE.findall(out + err) == [plaintext]
    assert out.count(parsed.secret) == 1

    shown = json_lines(out)
    deployment = next(item for item in shown if set(item) == {"id", "slug", "baseUrl", "status"})
    listed = [item for item in shown if set(item) == {"id", "label", "prefix", "enabled"}]
    assert listed == [
        {
            "id": listed[0]["id"],
            "label": "support bot",
            "prefix": keys.display_prefix(keys.TokenKind.DEPLOYMENT_KEY, parsed.kid),
            "enabled": True,
        }
    ]
    assert deployment["status"] == "no_engine"
    assert deployment["baseUrl"] == settings.public_url(deployment["slug"])
    rolled = next(item for item in shown if set(item) == {"new", "previous"})
    assert rolled["previous"]["id"] == listed[0]["id"]
    assert {"id": deployment["id"], "enabled": False} in shown

    # What the database says afterwards.
    engine = create_engine(settings.database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            row = await session.get(Deployment, deployment["id"])
            assert row is not None and row.deleted_at is not None and row.enabled is False
            found = (
                (await session.execute(select(DeploymentKey).where(DeploymentKey.deployment_id == row.id)))
                .scalars()
                .all()
            )
            by_id = {key.id: key for key in found}
            assert set(by_id) == {listed[0]["id"], rolled["new"]}
            assert all(key.revoked_at is not None for key in found)
            assert by_id[rolled["new"]].rolled_from == listed[0]["id"]
            assert by_id[listed[0]["id"]].kid == parsed.kid
            audited = (await session.execute(select(AuditEvent.details))).scalars().all()
            assert audited and parsed.secret not in json.dumps(audited)
    finally:
        await engine.dispose()
