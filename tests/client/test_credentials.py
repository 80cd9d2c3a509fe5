"""Where the client finds its token and control-plane URL (DESIGN §10)."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from lorry import CloudApiClient, Credentials, default_cloud_api_url, ensure_credentials
from lorry.credentials import (
    DEFAULT_CLOUD_API_URL,
    CredentialsNotFoundError,
    home_credentials_path,
    local_credentials_path,
    save_credentials,
)


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A home and a working directory of our own, and no LORRY_* variables."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    for name in list(os.environ):
        if name.startswith("LORRY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home, work


def write(path: Path, data: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_no_credentials_is_a_clear_error(clean_env: tuple[Path, Path]) -> None:
    with pytest.raises(CredentialsNotFoundError) as caught:
        ensure_credentials()
    message = str(caught.value)
    assert "LORRY_TOKEN" in message and "lorry login" in message
    with pytest.raises(CredentialsNotFoundError):
        CloudApiClient()


def test_resolution_order_env_then_local_then_home(
    clean_env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, work = clean_env
    assert home_credentials_path() == home / ".lorry" / "credentials.json"
    assert local_credentials_path() == work / ".lorry" / "credentials.json"

    write(home / ".lorry" / "credentials.json", {"token": "from-home", "apiUrl": "http://home:1"})
    found = ensure_credentials()
    assert (found.token, found.api_url, found.source) == (
        "from-home",
        "http://home:1",
        str(home_credentials_path()),
    )

    write(
        work / ".lorry" / "credentials.json", {"token": "from-here", "orgSlug": "acme", "projectSlug": "web"}
    )
    found = ensure_credentials()
    assert (found.token, found.org_slug, found.project_slug) == ("from-here", "acme", "web")
    assert found.api_url is None

    monkeypatch.setenv("LORRY_TOKEN", "from-env")
    found = ensure_credentials()
    assert (found.token, found.source) == ("from-env", "env")

    monkeypatch.setenv("LORRY_TOKEN", "")  # empty is unset
    assert ensure_credentials().token == "from-here"


def test_a_corrupt_file_names_itself(clean_env: tuple[Path, Path]) -> None:
    home, _ = clean_env
    path = home / ".lorry" / "credentials.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(CredentialsNotFoundError, match=re.escape(f"{path} is not a valid credentials file")):
        ensure_credentials()
    write(path, {"apiUrl": "http://x"})  # no token
    with pytest.raises(CredentialsNotFoundError, match=re.escape(str(path))):
        ensure_credentials()


def test_default_cloud_api_url(clean_env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    stored = Credentials(token="t", apiUrl="http://stored:8081")
    assert default_cloud_api_url() == DEFAULT_CLOUD_API_URL == "http://127.0.0.1:8081"
    assert default_cloud_api_url(Credentials(token="t")) == DEFAULT_CLOUD_API_URL
    assert default_cloud_api_url(stored) == "http://stored:8081"
    monkeypatch.setenv("LORRY_CLOUD_API_URL", "http://env:9")
    assert default_cloud_api_url(stored) == "http://env:9"
    monkeypatch.setenv("LORRY_CLOUD_API_URL", "")  # honoured, so a misconfiguration fails loudly
    assert default_cloud_api_url(stored) == ""


def test_client_defaults_come_from_the_credentials(
    clean_env: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, _ = clean_env
    write(home / ".lorry" / "credentials.json", {"token": "lorry_admin_x", "apiUrl": "http://stored:8081/"})
    with CloudApiClient() as client:
        assert client.base_url == "http://stored:8081"
        assert client.credentials.token == "lorry_admin_x"
    monkeypatch.setenv("LORRY_CLOUD_API_URL", "http://env:1")
    with CloudApiClient() as client:
        assert client.base_url == "http://env:1"
    with CloudApiClient("http://explicit:2", "lorry_admin_y") as client:
        assert (client.base_url, client.credentials.token) == ("http://explicit:2", "lorry_admin_y")


def test_saved_atomically_with_mode_0600(clean_env: tuple[Path, Path]) -> None:
    home, _ = clean_env
    old_umask = os.umask(0)  # even a permissive umask must not widen the file
    try:
        path = save_credentials(Credentials(token="secret-1", apiUrl="http://a:1", orgSlug="acme"))
    finally:
        os.umask(old_umask)
    assert path == home / ".lorry" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"token": "secret-1", "apiUrl": "http://a:1", "orgSlug": "acme"}
    before = path.stat().st_ino
    save_credentials(Credentials(token="secret-2"))
    assert path.stat().st_ino != before  # replaced by rename, never rewritten in place
    assert json.loads(path.read_text()) == {"token": "secret-2"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["credentials.json"]  # no temp file left
    assert ensure_credentials().token == "secret-2"
