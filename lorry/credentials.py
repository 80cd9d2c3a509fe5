"""Where the CLI and the client find their admin token and control-plane URL (DESIGN §10)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorry.private_files import write_private_json

DEFAULT_CLOUD_API_URL = "http://127.0.0.1:8081"
CREDENTIALS_FILE = "credentials.json"


class CredentialsNotFoundError(RuntimeError):
    pass


class Credentials(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore", frozen=True)

    token: str
    api_url: str | None = Field(default=None, alias="apiUrl")
    org_slug: str | None = Field(default=None, alias="orgSlug")
    project_slug: str | None = Field(default=None, alias="projectSlug")
    # Where these came from: "env" or the file path. Not serialised.
    source: str = Field(default="", exclude=True)


def local_credentials_path() -> Path:
    return Path.cwd() / ".lorry" / CREDENTIALS_FILE


def home_credentials_path() -> Path:
    return Path.home() / ".lorry" / CREDENTIALS_FILE


def _read(path: Path) -> Credentials | None:
    try:
        data = json.loads(path.read_text())
        return Credentials.model_validate(data).model_copy(update={"source": str(path)})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, ValidationError) as exc:
        raise CredentialsNotFoundError(f"{path} is not a valid credentials file: {exc}") from exc


def ensure_credentials() -> Credentials:
    """`LORRY_TOKEN`, then `./.lorry/credentials.json`, then `~/.lorry/credentials.json`."""
    token = os.environ.get("LORRY_TOKEN")
    if token:
        return Credentials(token=token, source="env")
    for path in (local_credentials_path(), home_credentials_path()):
        found = _read(path)
        if found is not None:
            return found
    raise CredentialsNotFoundError(
        "No Lorry credentials: set LORRY_TOKEN, run `lorry login`, or start `lorry up` in this directory"
    )


def default_cloud_api_url(credentials: Credentials | None = None) -> str:
    """`LORRY_CLOUD_API_URL` (an empty value is honoured, so a mistake fails loudly), then the
    URL stored with the credentials, then the local default."""
    env = os.environ.get("LORRY_CLOUD_API_URL")
    if env is not None:
        return env
    if credentials is not None and credentials.api_url:
        return credentials.api_url
    return DEFAULT_CLOUD_API_URL


def save_credentials(credentials: Credentials, path: Path | None = None) -> Path:
    """Atomic write with mode 0600, in a directory only the user can read when it is new."""
    target = path or home_credentials_path()
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_json(target, credentials.model_dump(by_alias=True, exclude_none=True))
    return target
