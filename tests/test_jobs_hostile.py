"""Hostile and invalid inputs to the jobs API: each is refused and leaves NO new row and NO new file.

Every case compares the row counts of every table and a recursive listing (with modes) of the
adapter store — which holds the work areas of requests in progress — before and after.

Each rejection is marked:
- POLICY: Lorry's own rules (import roots, archive attacks, pickled weights, rank limit, sizes);
- FORMAT: outside the PEFT LoRA format vLLM serves (the FORMAT_REJECTS fixtures, also checked
  against a real engine elsewhere).
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.jobs.store import listing
from lorry.settings import LorrySettings
from tests.conftest import DEFAULT_SCOPE, RowCounter
from tests.support.adapters import (
    EXPECTED_CODES,
    FORMAT_REJECTS,
    POLICY_REJECTS,
    install_base_config,
    tar_gz,
    write_adapter,
    zip_bytes,
)

UPLOAD_LIMIT = 1 << 20
GZIP = {"content-type": "application/gzip"}
ZIP = {"content-type": "application/zip"}
ALL_REJECTS = {**FORMAT_REJECTS, **POLICY_REJECTS}


@pytest.fixture
def settings(settings: LorrySettings) -> LorrySettings:
    """A small upload limit, so zip bombs and oversize bodies are cheap to build."""
    install_base_config(settings.cache_dir)
    return settings.model_copy(update={"max_upload_bytes": UPLOAD_LIMIT})


class Unchanged:
    """Row counts and the store listing (work areas included) before == after."""

    def __init__(self, rows: RowCounter, settings: LorrySettings) -> None:
        self.rows = rows
        self.store = settings.adapter_store

    async def __aenter__(self) -> Unchanged:
        self.before = (await self.rows.snapshot(), listing(self.store))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if exc[0] is None:
            assert (await self.rows.snapshot(), listing(self.store)) == self.before


async def refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    assert set(body) == {"error", "code"} and body["error"]


@pytest.fixture(autouse=True)
def store_root(settings: LorrySettings) -> Path:
    """The store as the first request leaves it (the empty work directory exists), so listings
    compare only what a refused request leaves behind."""
    settings.adapter_store.joinpath(".tmp").mkdir(parents=True, mode=0o700)
    return settings.adapter_store


@pytest.fixture
async def job(admin: httpx.AsyncClient) -> dict[str, Any]:
    response = await admin.post(
        "/v1/jobs", params=DEFAULT_SCOPE, json={"name": "target", "config": {"model": "lorry/tiny-llama"}}
    )
    assert response.status_code == 201
    created: dict[str, Any] = response.json()["job"]
    return created


async def import_dir(admin: httpx.AsyncClient, path: str | Path, **config: str) -> httpx.Response:
    body = {"name": "import", "config": config, "source": {"kind": "directory", "path": str(path)}}
    return await admin.post("/v1/jobs", params=DEFAULT_SCOPE, json=body)


async def upload(
    admin: httpx.AsyncClient, job_id: str, body: bytes, headers: dict[str, str] = GZIP, **params: Any
) -> httpx.Response:
    query = {**DEFAULT_SCOPE, "kind": "final", **params}
    return await admin.post(f"/v1/jobs/{job_id}/artifacts", params=query, content=body, headers=headers)


# --------------------------------------------------------------------------- import paths (POLICY)

IMPORT_ESCAPES = (
    "dotdot",
    "absolute_elsewhere",
    "symlink_out",
    "symlinked_checkpoint",
    "symlinked_file",
    "relative",
)


def escape_path(case: str, root: Path, elsewhere: Path) -> str:
    inside = root / f"run-{case}"
    if case == "dotdot":
        return f"{root}/../elsewhere"
    if case == "absolute_elsewhere":
        return str(elsewhere)
    if case == "symlink_out":
        (root / "link").symlink_to(elsewhere, target_is_directory=True)
        return str(root / "link")
    if case == "symlinked_checkpoint":
        write_adapter(inside)
        (inside / "checkpoint-1").symlink_to(elsewhere, target_is_directory=True)
        return str(inside)
    if case == "symlinked_file":
        inside.mkdir()
        (inside / "adapter_config.json").write_bytes((elsewhere / "adapter_config.json").read_bytes())
        (inside / "adapter_model.safetensors").symlink_to(elsewhere / "adapter_model.safetensors")
        return str(inside)
    assert case == "relative"
    return "imports/run"


async def test_import_outside_the_roots(
    admin: httpx.AsyncClient, settings: LorrySettings, rows: RowCounter, tmp_path: Path, subtests: Any
) -> None:
    """POLICY: only directories inside LORRY_IMPORT_ROOTS, symlinks followed, may be imported."""
    root = settings.import_roots[0]
    elsewhere = write_adapter(tmp_path / "elsewhere")
    for case in IMPORT_ESCAPES:
        with subtests.test(case=case):
            path = escape_path(case, root, elsewhere)
            async with Unchanged(rows, settings):
                response = await import_dir(admin, path)
                await refused(response, 400, "import_path_not_allowed")
            if case.startswith("symlink"):  # the path as given is echoed, a symlink's target never
                assert str(elsewhere) not in response.json()["error"]


async def test_import_paths_that_do_not_exist(
    admin: httpx.AsyncClient, settings: LorrySettings, rows: RowCounter, tmp_path: Path
) -> None:
    root = settings.import_roots[0]
    (root / "file").write_text("x")
    (root / "empty").mkdir()
    async with Unchanged(rows, settings):
        await refused(await import_dir(admin, root / "missing"), 400, "import_path_not_found")
        await refused(await import_dir(admin, root / "file"), 400, "import_path_not_found")
        await refused(await import_dir(admin, root / "empty"), 400, "invalid_adapter")
        # Outside the roots, existing or not, the answer is the same: no file-system oracle.
        await refused(await import_dir(admin, tmp_path / "missing"), 400, "import_path_not_allowed")
        await refused(await import_dir(admin, "/etc"), 400, "import_path_not_allowed")


async def test_import_special_files(
    admin: httpx.AsyncClient, settings: LorrySettings, rows: RowCounter
) -> None:
    """POLICY: kept files must be regular files; a FIFO must not hang the import."""
    root = settings.import_roots[0]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        run = write_adapter(root / f"fifo-{name}")
        (run / name).unlink()
        os.mkfifo(run / name)
        async with Unchanged(rows, settings):
            response = await import_dir(admin, run, model="lorry/tiny-llama")
            await refused(response, 400, "invalid_adapter")
            assert "regular file" in response.json()["error"]


async def test_import_with_no_roots_configured(
    admin: httpx.AsyncClient, settings: LorrySettings, rows: RowCounter, ctx: Any
) -> None:
    write_adapter(settings.import_roots[0] / "run")
    ctx.settings = settings.model_copy(update={"import_roots": []})
    try:
        async with Unchanged(rows, settings):
            response = await import_dir(admin, settings.import_roots[0] / "run")
            await refused(response, 400, "import_path_not_allowed")
    finally:
        ctx.settings = settings


# --------------------------------------------------------------------------- invalid adapters


def kind_of(name: str) -> str:
    return "FORMAT" if name in FORMAT_REJECTS else "POLICY"


async def test_invalid_adapter_imports(
    admin: httpx.AsyncClient, settings: LorrySettings, rows: RowCounter, subtests: Any
) -> None:
    """FORMAT and POLICY fixtures, as a final adapter and as a checkpoint next to a valid one."""
    root = settings.import_roots[0]
    for name, write in sorted(ALL_REJECTS.items()):
        with subtests.test(fixture=name, kind=kind_of(name)):
            write(root / name / "final")
            write_adapter(root / name / "with-checkpoint")
            write(root / name / "with-checkpoint" / "checkpoint-3")
            async with Unchanged(rows, settings):
                await refused(await import_dir(admin, root / name / "final"), 400, EXPECTED_CODES[name])
                response = await import_dir(admin, root / name / "with-checkpoint")
                await refused(response, 400, EXPECTED_CODES[name])
                assert response.json()["error"].startswith("checkpoint-3: ")


async def test_invalid_adapter_uploads(
    admin: httpx.AsyncClient,
    settings: LorrySettings,
    rows: RowCounter,
    job: dict[str, Any],
    tmp_path: Path,
    subtests: Any,
) -> None:
    for name, write in sorted(ALL_REJECTS.items()):
        with subtests.test(fixture=name, kind=kind_of(name)):
            write(tmp_path / name)
            async with Unchanged(rows, settings):
                response = await upload(admin, job["id"], tar_gz(tmp_path / name))
                await refused(response, 400, EXPECTED_CODES[name])
                body = zip_bytes(tmp_path / name, prefix="adapter")
                response = await upload(admin, job["id"], body, ZIP, kind="checkpoint", step=1)
                await refused(response, 400, EXPECTED_CODES[name])


# --------------------------------------------------------------------------- archive attacks (POLICY)


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _valid_tar_members(directory: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [(tarfile.TarInfo(p.name), p.read_bytes()) for p in sorted(directory.iterdir())]


def _typed(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for info, data in entries:
            zipped.writestr(info, data)
    return buffer.getvalue()


def _valid_zip_entries(directory: Path) -> list[tuple[zipfile.ZipInfo | str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(directory.iterdir())]


def _zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = 0o120777 << 16
    return info, target.encode()


def _raw_zip_name(name: str) -> tuple[zipfile.ZipInfo, bytes]:
    return zipfile.ZipInfo(name), b"x"


ArchiveCase = Callable[[Path], tuple[bytes, dict[str, str]]]

ARCHIVE_ATTACKS: dict[str, tuple[ArchiveCase, str]] = {
    "tar_dotdot_member": (
        lambda d: (_tar([*_valid_tar_members(d), (tarfile.TarInfo("../evil.txt"), b"x")]), GZIP),
        "unsafe_archive",
    ),
    "tar_nested_dotdot_member": (
        lambda d: (_tar([*_valid_tar_members(d), (tarfile.TarInfo("a/../../evil.txt"), b"x")]), GZIP),
        "unsafe_archive",
    ),
    "tar_absolute_member": (
        lambda d: (_tar([*_valid_tar_members(d), (tarfile.TarInfo("/tmp/evil.txt"), b"x")]), GZIP),
        "unsafe_archive",
    ),
    "tar_symlink_member": (
        lambda d: (_tar([*_valid_tar_members(d), _typed("README.md", tarfile.SYMTYPE, "/etc/passwd")]), GZIP),
        "unsafe_archive",
    ),
    "tar_symlinked_weights": (
        lambda d: (
            _tar(
                [
                    (tarfile.TarInfo("adapter_config.json"), (d / "adapter_config.json").read_bytes()),
                    _typed("adapter_model.safetensors", tarfile.SYMTYPE, "/etc/passwd"),
                ]
            ),
            GZIP,
        ),
        "unsafe_archive",
    ),
    "tar_hardlink_member": (
        lambda d: (
            _tar([*_valid_tar_members(d), _typed("copy", tarfile.LNKTYPE, "adapter_config.json")]),
            GZIP,
        ),
        "unsafe_archive",
    ),
    "tar_device_member": (
        lambda d: (_tar([*_valid_tar_members(d), _typed("dev", tarfile.CHRTYPE)]), GZIP),
        "unsafe_archive",
    ),
    "tar_fifo_member": (
        lambda d: (_tar([*_valid_tar_members(d), _typed("fifo", tarfile.FIFOTYPE)]), GZIP),
        "unsafe_archive",
    ),
    "tar_duplicate_member": (
        lambda d: (_tar([*_valid_tar_members(d), (tarfile.TarInfo("./adapter_config.json"), b"{}")]), GZIP),
        "unsafe_archive",
    ),
    "tar_bomb": (
        lambda d: (
            _tar([*_valid_tar_members(d), (tarfile.TarInfo("padding.bin"), bytes(4 * UPLOAD_LIMIT))]),
            GZIP,
        ),
        "unsafe_archive",
    ),
    "zip_dotdot_member": (
        lambda d: (_zip([*_valid_zip_entries(d), _raw_zip_name("../evil.txt")]), ZIP),
        "unsafe_archive",
    ),
    "zip_absolute_member": (
        lambda d: (_zip([*_valid_zip_entries(d), _raw_zip_name("/evil.txt")]), ZIP),
        "unsafe_archive",
    ),
    "zip_backslash_member": (
        lambda d: (_zip([*_valid_zip_entries(d), _raw_zip_name("..\\evil.txt")]), ZIP),
        "unsafe_archive",
    ),
    "zip_symlink_member": (
        lambda d: (_zip([*_valid_zip_entries(d), _zip_symlink("link", "/etc/passwd")]), ZIP),
        "unsafe_archive",
    ),
    "zip_bomb": (
        lambda d: (_zip([*_valid_zip_entries(d), ("padding.bin", bytes(4 * UPLOAD_LIMIT))]), ZIP),
        "unsafe_archive",
    ),
    "zip_many_members": (
        lambda d: (_zip([*_valid_zip_entries(d), *((f"f{i}", b"") for i in range(10_001))]), ZIP),
        "unsafe_archive",
    ),
    "not_gzip": (lambda d: (b"this is not an archive at all", GZIP), "invalid_archive"),
    "not_zip": (lambda d: (b"PK\x03\x04 but broken", ZIP), "invalid_archive"),
    "zip_sent_as_gzip": (lambda d: (zip_bytes(d), GZIP), "invalid_archive"),
    "truncated_tar_gz": (lambda d: (tar_gz(d)[:-200], GZIP), "invalid_archive"),
    "empty_body": (lambda d: (b"", GZIP), "invalid_archive"),
    "two_top_level_dirs": (
        lambda d: (
            _tar([(tarfile.TarInfo(f"{top}/{p.name}"), p.read_bytes()) for top in "ab" for p in d.iterdir()]),
            GZIP,
        ),
        "invalid_adapter",
    ),
    "adapter_too_deep": (
        lambda d: (_tar([(tarfile.TarInfo(f"a/b/{p.name}"), p.read_bytes()) for p in d.iterdir()]), GZIP),
        "invalid_adapter",
    ),
}


async def test_hostile_archives(
    admin: httpx.AsyncClient,
    settings: LorrySettings,
    rows: RowCounter,
    job: dict[str, Any],
    tmp_path: Path,
    subtests: Any,
) -> None:
    """POLICY: archive attacks; every one also carries a valid adapter that must not be stored."""
    adapter = write_adapter(tmp_path / "adapter", rank=4)
    for case, (build, code) in sorted(ARCHIVE_ATTACKS.items()):
        with subtests.test(case=case):
            body, headers = build(adapter)
            assert len(body) <= UPLOAD_LIMIT
            async with Unchanged(rows, settings):
                await refused(await upload(admin, job["id"], body, headers), 400, code)
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    # The same adapter, packed honestly, is accepted.
    assert (await upload(admin, job["id"], tar_gz(adapter))).status_code == 201


async def test_upload_limits_and_request_errors(
    admin: httpx.AsyncClient, settings: LorrySettings, rows: RowCounter, job: dict[str, Any], tmp_path: Path
) -> None:
    valid = tar_gz(write_adapter(tmp_path / "adapter", rank=4))
    oversize = os.urandom(UPLOAD_LIMIT + 1)

    async def chunked() -> Any:  # no content-length: the cap is enforced while receiving
        for start in range(0, len(oversize), 65536):
            yield oversize[start : start + 65536]

    async with Unchanged(rows, settings):
        # POLICY: the body size cap, declared or streamed.
        await refused(await upload(admin, job["id"], oversize), 413, "payload_too_large")
        await refused(await upload(admin, job["id"], chunked()), 413, "payload_too_large")
        # Content types and parameters.
        for headers in ({"content-type": "application/json"}, {"content-type": "text/plain"}, {}):
            await refused(await upload(admin, job["id"], valid, headers), 415, "unsupported_media_type")
        await refused(await upload(admin, job["id"], valid, kind="checkpoint"), 400, "invalid_request")
        await refused(
            await upload(admin, job["id"], valid, kind="checkpoint", step=-1), 400, "invalid_request"
        )
        await refused(
            await upload(admin, job["id"], valid, kind="checkpoint", step="x"), 400, "invalid_request"
        )
        await refused(
            await upload(admin, job["id"], valid, kind="checkpoint", step=2**31), 400, "invalid_request"
        )
        await refused(await upload(admin, job["id"], valid, kind="final", step=3), 400, "invalid_request")
        await refused(await upload(admin, job["id"], valid, kind="adapter"), 400, "invalid_request")
        await refused(await upload(admin, "not-a-uuid", valid), 404, "job_not_found")
    assert (await upload(admin, job["id"], valid)).status_code == 201


MALFORMED_BODIES = (
    b'{"name": "\\ud800", "config": {"model": "m"}}',
    b'{"name": "x", "config": {"model": "\\udfff\\ud800"}}',
    b'{"name": "x\\u0000y", "config": {"model": "m"}}',
    b'{"name": "x", "source": {"kind": "directory", "path": "/\\ud8bb"}}',
    b'{"name": "x", "source": {"kind": "directory", "path": "/tmp/\\u0000"}}',
    b"{",
    b"[]",
    b"null",
    b'{"name": 1, "config": {"model": "m"}}',
    b'{"name": "", "config": {"model": "m"}}',
    b'{"name": "x", "config": {"model": 5}}',
    b'{"name": "x", "config": "m"}',
    b'{"name": "x", "config": {"model": "m", "extra": 1}}',
    b'{"name": "x", "config": {"model": "m"}, "unknown": true}',
    b'{"name": "x", "source": {"kind": "s3", "path": "/x"}}',
    b'{"name": "x", "source": {"kind": "directory", "path": ["/x"]}}',
    b'{"name": "x", "source": {"kind": "directory"}}',
    b'{"config": {"model": "m"}}',
    b'{"name": "' + b"x" * 201 + b'", "config": {"model": "m"}}',
)


async def test_malformed_job_bodies(
    admin: httpx.AsyncClient, settings: LorrySettings, rows: RowCounter, subtests: Any
) -> None:
    for body in MALFORMED_BODIES:
        with subtests.test(body=body[:60]):
            async with Unchanged(rows, settings):
                response = await admin.post(
                    "/v1/jobs",
                    params=DEFAULT_SCOPE,
                    content=body,
                    headers={"content-type": "application/json"},
                )
                await refused(response, 400, "invalid_request")
