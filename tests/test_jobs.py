"""Jobs API: directory imports, archive uploads, the store they fill, and job lifecycle.

Every test runs on SQLite and on PostgreSQL. Hostile inputs are in test_jobs_hostile.py.
"""

from __future__ import annotations

import asyncio
import io
import re
import uuid
import zipfile
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.jobs.store import listing
from lorry.db.models import AuditEvent, ChangeLogEntry, Deployment, Project
from lorry.db.types import utcnow
from lorry.settings import LorrySettings
from tests.conftest import DEFAULT_SCOPE, RowCounter
from tests.support.adapters import ALL_LINEAR, install_base_config, tar_gz, write_adapter, zip_bytes
from tests.test_adapter_store import expected_digest

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
GZIP = {"content-type": "application/gzip"}
ZIP = {"content-type": "application/zip"}


def import_root(settings: LorrySettings) -> Path:
    return settings.import_roots[0]


async def create_job(
    admin: httpx.AsyncClient, name: str = "job", model: str = "lorry/tiny-llama"
) -> dict[str, Any]:
    response = await admin.post(
        "/v1/jobs", params=DEFAULT_SCOPE, json={"name": name, "config": {"model": model}}
    )
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()["job"]
    return job


async def upload(
    admin: httpx.AsyncClient,
    job_id: str,
    body: bytes,
    *,
    kind: str = "final",
    step: int | None = None,
    headers: dict[str, str] = GZIP,
) -> httpx.Response:
    params: dict[str, Any] = {**DEFAULT_SCOPE, "kind": kind}
    if step is not None:
        params["step"] = step
    return await admin.post(f"/v1/jobs/{job_id}/artifacts", params=params, content=body, headers=headers)


def assert_stored(settings: LorrySettings, digest: str, source: Path) -> None:
    directory = settings.adapter_store / digest
    assert digest == expected_digest(source)
    assert oct(directory.stat().st_mode & 0o777) == oct(0o555)
    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert oct((directory / name).stat().st_mode & 0o777) == oct(0o444)
        assert (directory / name).read_bytes() == (source / name).read_bytes()


def store_dirs(settings: LorrySettings) -> list[str]:
    return sorted(p.name for p in settings.adapter_store.iterdir() if not p.name.startswith("."))


async def test_import_a_training_output_directory(
    admin: httpx.AsyncClient, settings: LorrySettings, rows: RowCounter
) -> None:
    install_base_config(settings.cache_dir)
    out = import_root(settings) / "run-1"
    write_adapter(out, rank=16, alpha=32, target_modules=ALL_LINEAR, seed=1)
    for step, seed in ((100, 2), (200, 3)):
        checkpoint = write_adapter(out / f"checkpoint-{step}", seed=seed)
        (checkpoint / "optimizer.pt").write_bytes(b"\x80\x04pickle")  # ignored, never read
        (checkpoint / "trainer_state.json").write_text("{}")
    (out / "training_args.bin").write_bytes(b"\x80\x04pickle")
    (out / "README.md").write_text("# run 1")
    (out / "logs").mkdir()
    before = await rows.snapshot()

    response = await admin.post(
        "/v1/jobs",
        params=DEFAULT_SCOPE,
        json={"name": "run 1", "source": {"kind": "directory", "path": str(out)}},
    )
    assert response.status_code == 201, response.text
    job = response.json()["job"]
    assert job["status"] == "completed"
    assert job["config"] == {"model": "lorry/tiny-llama"}  # from base_model_name_or_path
    assert job["name"] == "run 1"
    for field in ("createdAt", "startedAt", "completedAt"):
        assert TIMESTAMP.match(job[field]), job
    assert set(job) == {"id", "orgId", "projectId", "name", "status", "config"} | {
        "createdAt",
        "startedAt",
        "completedAt",
        "adapters",
    }
    adapters = job["adapters"]
    assert [(a["kind"], a["step"], a["rank"]) for a in adapters] == [
        ("final", None, 16),
        ("checkpoint", 100, 8),
        ("checkpoint", 200, 8),
    ]
    assert adapters[0]["targetModules"] == sorted(ALL_LINEAR)
    assert adapters[1]["targetModules"] == ["q_proj", "v_proj"]
    assert set(adapters[0]) == {"id", "kind", "step", "digest", "rank", "targetModules", "createdAt"}
    for adapter, source in zip(adapters, (out, out / "checkpoint-100", out / "checkpoint-200"), strict=True):
        assert_stored(settings, adapter["digest"], source)
    assert store_dirs(settings) == sorted(a["digest"] for a in adapters)
    assert list((settings.adapter_store / ".tmp").iterdir()) == []

    after = await rows.snapshot()
    assert after["jobs"] == before["jobs"] + 1
    assert after["adapters"] == before["adapters"] + 3
    assert after["change_log"] == before["change_log"] + 1
    assert after["audit_events"] == before["audit_events"] + 1

    fetched = await admin.get(f"/v1/jobs/{job['id']}", params=DEFAULT_SCOPE)
    assert fetched.status_code == 200 and fetched.json() == {"job": job}
    listed = await admin.get("/v1/jobs", params=DEFAULT_SCOPE)
    assert listed.status_code == 200 and listed.json() == {"jobs": [job]}


async def test_import_with_checkpoints_only_stays_queued(
    admin: httpx.AsyncClient, settings: LorrySettings
) -> None:
    out = import_root(settings) / "partial"
    write_adapter(out / "checkpoint-5")
    (out / "checkpoint-notes").mkdir()  # not a checkpoint-<step> name: ignored
    response = await admin.post(
        "/v1/jobs",
        params=DEFAULT_SCOPE,
        json={
            "name": "partial",
            "config": {"model": "my/model"},
            "source": {"kind": "directory", "path": str(out)},
        },
    )
    assert response.status_code == 201, response.text
    job = response.json()["job"]
    assert job["status"] == "queued" and job["completedAt"] is None and job["startedAt"] is not None
    assert job["config"] == {"model": "my/model"}  # an explicit model wins
    assert [(a["kind"], a["step"]) for a in job["adapters"]] == [("checkpoint", 5)]

    # The final adapter arrives later by upload and completes the job.
    final = write_adapter(settings.adapter_store.parent / "final", seed=9)
    response = await upload(admin, job["id"], zip_bytes(final), headers=ZIP)
    assert response.status_code == 201, response.text
    assert response.json()["job"]["status"] == "completed"


async def test_upload_archives(
    admin: httpx.AsyncClient, settings: LorrySettings, rows: RowCounter, tmp_path: Path
) -> None:
    job = await create_job(admin)
    assert job["status"] == "queued" and job["adapters"] == [] and job["startedAt"] is None
    cases = [
        ("tar.gz at the root", tar_gz, "", GZIP),
        ("tar.gz in one directory", tar_gz, "my-adapter", GZIP),
        ("zip at the root", zip_bytes, "", ZIP),
        ("zip in one directory", zip_bytes, "out", {"content-type": "application/zip; charset=binary"}),
    ]
    digests = []
    for step, (label, pack, prefix, headers) in enumerate(cases):
        source = write_adapter(tmp_path / label, seed=100 + step, rank=4 + step)
        (source / "training_args.bin").write_bytes(b"ignored")
        before = await rows.snapshot()
        response = await upload(
            admin, job["id"], pack(source, prefix=prefix), kind="checkpoint", step=step, headers=headers
        )
        assert response.status_code == 201, (label, response.text)
        body = response.json()
        adapter = body["adapter"]
        assert (adapter["kind"], adapter["step"], adapter["rank"]) == ("checkpoint", step, 4 + step)
        assert body["job"]["status"] == "queued"
        assert_stored(settings, adapter["digest"], source)
        digests.append(adapter["digest"])
        after = await rows.snapshot()
        assert after["adapters"] == before["adapters"] + 1 and after["change_log"] == before["change_log"] + 1
        assert after["audit_events"] == before["audit_events"] + 1

    final = write_adapter(tmp_path / "final", seed=7)
    response = await upload(admin, job["id"], tar_gz(final))
    assert response.status_code == 201, response.text
    completed = response.json()["job"]
    assert completed["status"] == "completed" and TIMESTAMP.match(completed["completedAt"])
    assert [a["kind"] for a in completed["adapters"]] == ["final"] + ["checkpoint"] * 4
    assert [a["step"] for a in completed["adapters"]][1:] == [0, 1, 2, 3]

    # A second final, or a repeated step, is a conflict and stores nothing.
    before, files = await rows.snapshot(), listing(settings.adapter_store)
    other = write_adapter(tmp_path / "other", seed=8)
    second = await upload(admin, job["id"], tar_gz(other))
    assert second.status_code == 409 and second.json()["code"] == "adapter_exists"
    again = await upload(admin, job["id"], tar_gz(other), kind="checkpoint", step=2)
    assert again.status_code == 409 and again.json()["code"] == "adapter_exists"
    assert await rows.snapshot() == before and listing(settings.adapter_store) == files


async def test_identical_content_is_stored_once(
    admin: httpx.AsyncClient, settings: LorrySettings, tmp_path: Path
) -> None:
    source = write_adapter(tmp_path / "adapter")
    first, second = await create_job(admin, "a"), await create_job(admin, "b")
    one = await upload(admin, first["id"], tar_gz(source))
    two = await upload(admin, second["id"], zip_bytes(source, prefix="x"), headers=ZIP)
    assert one.status_code == two.status_code == 201
    digest = one.json()["adapter"]["digest"]
    assert two.json()["adapter"]["digest"] == digest
    assert one.json()["adapter"]["id"] != two.json()["adapter"]["id"]
    assert store_dirs(settings) == [digest]
    # An import of the same files shares the directory too.
    imported = import_root(settings) / "same"
    write_adapter(imported)
    response = await admin.post(
        "/v1/jobs",
        params=DEFAULT_SCOPE,
        json={"name": "c", "source": {"kind": "directory", "path": str(imported)}},
    )
    assert response.status_code == 201 and response.json()["job"]["adapters"][0]["digest"] == digest
    assert store_dirs(settings) == [digest]


async def test_concurrent_identical_uploads(
    admin: httpx.AsyncClient, settings: LorrySettings, tmp_path: Path
) -> None:
    source = write_adapter(tmp_path / "adapter", rank=16, target_modules=ALL_LINEAR)
    body = tar_gz(source)
    jobs = [await create_job(admin, f"job-{i}") for i in range(3)]
    responses = await asyncio.gather(*(upload(admin, job["id"], body) for job in jobs))
    assert [r.status_code for r in responses] == [201, 201, 201], [r.text for r in responses]
    digests = {r.json()["adapter"]["digest"] for r in responses}
    assert len(digests) == 1
    assert store_dirs(settings) == sorted(digests)
    assert list((settings.adapter_store / ".tmp").iterdir()) == []
    assert_stored(settings, digests.pop(), source)


async def test_concurrent_finals_for_one_job(
    admin: httpx.AsyncClient, settings: LorrySettings, tmp_path: Path
) -> None:
    job = await create_job(admin)
    bodies = [tar_gz(write_adapter(tmp_path / str(i), seed=i)) for i in range(3)]
    responses = await asyncio.gather(*(upload(admin, job["id"], body) for body in bodies))
    assert sorted(r.status_code for r in responses) == [201, 409, 409], [r.text for r in responses]
    fetched = (await admin.get(f"/v1/jobs/{job['id']}", params=DEFAULT_SCOPE)).json()["job"]
    assert [a["kind"] for a in fetched["adapters"]] == ["final"]


async def test_shapes_checked_only_for_known_base_models(
    admin: httpx.AsyncClient, settings: LorrySettings, tmp_path: Path
) -> None:
    wide = write_adapter(tmp_path / "wide", hidden=256)
    unknown = await create_job(admin, model="someone/unknown-model")
    assert (await upload(admin, unknown["id"], tar_gz(wide))).status_code == 201
    install_base_config(settings.cache_dir)
    known = await create_job(admin)
    refused = await upload(admin, known["id"], tar_gz(wide))
    assert refused.status_code == 400 and refused.json()["code"] == "tensor_shape_mismatch"


async def test_delete_job(
    admin: httpx.AsyncClient,
    settings: LorrySettings,
    rows: RowCounter,
    sessionmaker: async_sessionmaker[AsyncSession],
    tmp_path: Path,
) -> None:
    source = write_adapter(tmp_path / "adapter")
    job = await create_job(admin)
    adapter = (await upload(admin, job["id"], tar_gz(source))).json()["adapter"]
    async with sessionmaker() as session:
        deployment = Deployment(
            org_id=job["orgId"],
            project_id=job["projectId"],
            slug="support-bot",
            target={"kind": "adapter", "adapter": {"kind": "final", "jobId": job["id"]}},
            target_kind="adapter",
            job_id=job["id"],
            adapter_id=adapter["id"],
        )
        session.add(deployment)
        await session.commit()

    before = await rows.snapshot()
    refused = await admin.delete(f"/v1/jobs/{job['id']}", params=DEFAULT_SCOPE)
    assert refused.status_code == 409 and refused.json()["code"] == "in_use"
    assert "support-bot" in refused.json()["error"]
    assert await rows.snapshot() == before

    async with sessionmaker() as session:
        row = await session.get(Deployment, deployment.id)
        assert row is not None
        row.deleted_at = utcnow()
        await session.commit()
    deleted = await admin.delete(f"/v1/jobs/{job['id']}", params=DEFAULT_SCOPE)
    assert deleted.status_code == 204 and deleted.content == b""
    after = await rows.snapshot()
    assert after["jobs"] == before["jobs"] - 1 and after["adapters"] == before["adapters"] - 1
    assert after["deployments"] == before["deployments"]  # the slug stays reserved
    assert after["change_log"] == before["change_log"] + 1
    assert_stored(settings, adapter["digest"], source)  # store files are kept
    async with sessionmaker() as session:
        kept = await session.get(Deployment, deployment.id)
        assert kept is not None and kept.job_id is None and kept.adapter_id is None
        audit = (
            (await session.execute(select(AuditEvent).where(AuditEvent.action == "job.delete")))
            .scalars()
            .all()
        )
        assert [event.resource_id for event in audit] == [job["id"]]
        change = (
            await session.execute(select(ChangeLogEntry).order_by(ChangeLogEntry.seq.desc()).limit(1))
        ).scalar_one()
        assert (change.kind, change.resource_id) == ("job", job["id"])

    for method in ("get", "delete"):
        gone = await admin.request(method.upper(), f"/v1/jobs/{job['id']}", params=DEFAULT_SCOPE)
        assert gone.status_code == 404 and gone.json()["code"] == "job_not_found"


async def test_jobs_are_scoped_to_their_project(
    admin: httpx.AsyncClient, sessionmaker: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    job = await create_job(admin)
    async with sessionmaker() as session:
        session.add(Project(org_id=job["orgId"], slug="other", name="Other"))
        await session.commit()
    other = {"orgSlug": "default", "projectSlug": "other"}
    assert (await admin.get("/v1/jobs", params=other)).json() == {"jobs": []}
    for method, path in (("GET", f"/v1/jobs/{job['id']}"), ("DELETE", f"/v1/jobs/{job['id']}")):
        response = await admin.request(method, path, params=other)
        assert response.status_code == 404 and response.json()["code"] == "job_not_found"
    body = tar_gz(write_adapter(tmp_path / "a"))
    response = await admin.post(
        f"/v1/jobs/{job['id']}/artifacts", params={**other, "kind": "final"}, content=body, headers=GZIP
    )
    assert response.status_code == 404 and response.json()["code"] == "job_not_found"
    for bad in ("not-a-uuid", str(uuid.uuid4()), "x" * 300, job["id"].upper() + "0"):
        response = await admin.get(f"/v1/jobs/{bad}", params=DEFAULT_SCOPE)
        assert response.status_code == 404 and response.json()["code"] == "job_not_found", bad
    assert (await admin.get(f"/v1/jobs/{job['id']}", params=DEFAULT_SCOPE)).status_code == 200
    missing_scope = await admin.get("/v1/jobs")
    assert missing_scope.status_code == 400 and missing_scope.json()["code"] == "scope_required"


async def test_authentication_comes_first(
    anonymous: httpx.AsyncClient, admin: httpx.AsyncClient, rows: RowCounter
) -> None:
    job = await create_job(admin)
    before = await rows.snapshot()
    for method, path, kwargs in (
        ("GET", "/v1/jobs", {}),
        ("POST", "/v1/jobs", {"json": {"name": "x", "config": {"model": "m"}}}),
        ("POST", "/v1/jobs", {"content": b"{"}),
        ("POST", f"/v1/jobs/{job['id']}/artifacts", {"content": b"x", "headers": GZIP}),
        ("DELETE", f"/v1/jobs/{job['id']}", {}),
    ):
        params = {**DEFAULT_SCOPE, "kind": "final"}
        response = await anonymous.request(method, path, params=params, **kwargs)
        assert response.status_code == 401, (method, path, response.text)
    assert await rows.snapshot() == before


async def test_empty_job_needs_a_model(
    admin: httpx.AsyncClient, settings: LorrySettings, rows: RowCounter
) -> None:
    before = await rows.snapshot()
    response = await admin.post("/v1/jobs", params=DEFAULT_SCOPE, json={"name": "no model"})
    assert response.status_code == 400 and "config.model" in response.json()["error"]
    out = import_root(settings) / "anonymous-base"
    write_adapter(out, base_model=None)
    response = await admin.post(
        "/v1/jobs",
        params=DEFAULT_SCOPE,
        json={"name": "x", "source": {"kind": "directory", "path": str(out)}},
    )
    assert response.status_code == 400 and "config.model" in response.json()["error"]
    assert await rows.snapshot() == before
    response = await admin.post(
        "/v1/jobs",
        params=DEFAULT_SCOPE,
        json={
            "name": "  named  ",
            "config": {"model": "base/m"},
            "source": {"kind": "directory", "path": str(out)},
        },
    )
    assert response.status_code == 201, response.text
    job = response.json()["job"]
    assert job["name"] == "named" and job["config"]["model"] == "base/m"


async def test_upload_tolerates_finder_zip_extras(admin: httpx.AsyncClient, tmp_path: Path) -> None:
    """macOS Finder zips add __MACOSX/ and .DS_Store next to the adapter's directory."""
    source = write_adapter(tmp_path / "adapter")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for path in sorted(source.iterdir()):
            zipped.writestr(f"adapter/{path.name}", path.read_bytes())
            zipped.writestr(f"__MACOSX/adapter/._{path.name}", b"\0\5\26\7")
        zipped.writestr(".DS_Store", b"\0\0\0\1Bud1")
    job = await create_job(admin)
    response = await upload(admin, job["id"], buffer.getvalue(), headers=ZIP)
    assert response.status_code == 201, response.text
    assert response.json()["adapter"]["digest"] == expected_digest(source)
