"""`lorry up`: the embedded default — SQLite under ./.lorry/, everything in one process (DESIGN §10)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lorry import keys
from lorry.private_files import write_private_json
from lorry.serving import Listener, serve_all
from lorry.settings import LorrySettings

STATE_DIR = Path(".lorry")
SECRETS_FILE = "secrets.json"
CREDENTIALS_FILE = "credentials.json"


@dataclass(frozen=True)
class UpOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    admin_port: int = 8081
    state_dir: Path = STATE_DIR


def load_secrets(state_dir: Path) -> dict[str, Any]:
    path = state_dir / SECRETS_FILE
    if path.exists():
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    secrets = {"adminToken": keys.issue(keys.TokenKind.ADMIN_TOKEN).plaintext}
    write_private_json(path, secrets)
    return secrets


def up_settings(options: UpOptions, admin_token: str) -> LorrySettings:
    state = options.state_dir.resolve()
    env = {k: v for k, v in os.environ.items() if k.startswith("LORRY_")}
    overrides: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{state / 'lorry.db'}",
        "adapter_store": state / "adapters",
        "auto_migrate": True,
        "path_routing": True,
        "public_url_template": f"http://{options.host}:{options.port}/d/{{slug}}/v1",
        "bootstrap_admin_token": admin_token,
    }
    # Explicit LORRY_ variables still win, so `lorry up` can be pointed elsewhere.
    settings = LorrySettings()
    return settings.model_copy(update={k: v for k, v in overrides.items() if f"LORRY_{k.upper()}" not in env})


def say(label: str, value: str) -> None:
    """One plain line, flushed at once: scripts and tests read these (no rich wrapping)."""
    sys.stdout.write(f"{label:<13}{value}\n")
    sys.stdout.flush()


async def _wait_until_answering(url: str, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            try:
                if (await client.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"control plane at {url} did not become ready")
            await asyncio.sleep(0.1)


async def run_up(options: UpOptions) -> None:
    from control_plane.app import create_app as create_control_plane

    secrets = load_secrets(options.state_dir)
    settings = up_settings(options, secrets["adminToken"])
    admin_url = f"http://{options.host}:{options.admin_port}"
    write_private_json(
        options.state_dir / CREDENTIALS_FILE, {"token": secrets["adminToken"], "apiUrl": admin_url}
    )
    control_plane = create_control_plane(settings)
    listeners = [Listener(control_plane, options.host, options.admin_port, "control-plane")]

    async def announce() -> None:
        await _wait_until_answering(admin_url)
        say("Admin API:", admin_url)
        say("Admin token:", secrets["adminToken"])

    serving = asyncio.create_task(serve_all(listeners, log_level="warning"))
    announcing = asyncio.create_task(announce())
    done, _ = await asyncio.wait({serving, announcing}, return_when=asyncio.FIRST_EXCEPTION)
    if announcing in done and announcing.exception() is not None:
        serving.cancel()
        raise announcing.exception()  # type: ignore[misc]
    await serving
