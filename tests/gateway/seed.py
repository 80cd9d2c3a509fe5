"""Rows for gateway tests, written straight to the database like the control plane writes them.

Every write appends its change event in the same transaction (DESIGN §6), so a running gateway
sees it through the change feed exactly as it would see an admin-API write.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from lorry import keys
from lorry.changefeed import CHANGED_FLAG, ChangeKind, append_change
from lorry.db.models import Adapter, Deployment, DeploymentKey, Engine, Job, Organization, Project
from lorry.db.types import new_id, utcnow

BASE_MODEL = "lorry/tiny-llama"


def directory_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(name.encode() + b"\0" + (directory / name).read_bytes() + b"\0")
    return digest.hexdigest()


def store_adapter(source: Path, store: Path) -> str:
    """Copies an adapter directory into ``<store>/<digest>/`` (idempotent); returns the digest."""
    digest = directory_digest(source)
    target = store / digest
    if not target.is_dir():
        tmp = store / f".tmp-{new_id()}"
        tmp.mkdir(parents=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(source / name, tmp / name)
        try:
            tmp.rename(target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return digest


@dataclass(frozen=True)
class Scope:
    org_id: str
    project_id: str


@dataclass(frozen=True)
class IssuedKey:
    id: str
    plaintext: str
    kid: str


class Seed:
    """Writes rows; ``on_commit`` is called after each commit (e.g. an in-process notify)."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker

    async def _commit(self, session: AsyncSession) -> None:
        await session.commit()
        session.info.pop(CHANGED_FLAG, None)

    async def default_scope(self) -> Scope:
        async with self.sessionmaker() as session:
            org = (
                await session.execute(select(Organization).where(Organization.slug == "default"))
            ).scalar_one()
            project = (
                await session.execute(
                    select(Project).where(Project.org_id == org.id, Project.slug == "default")
                )
            ).scalar_one()
            return Scope(org_id=org.id, project_id=project.id)

    async def new_project(self, slug: str) -> Scope:
        async with self.sessionmaker() as session:
            org = Organization(slug=slug, name=slug)
            session.add(org)
            await session.flush()
            project = Project(org_id=org.id, slug="default", name="default")
            session.add(project)
            await session.flush()
            await append_change(session, ChangeKind.ORG, org.id)
            await self._commit(session)
            return Scope(org_id=org.id, project_id=project.id)

    async def job_with_adapter(
        self, scope: Scope, *, digest: str, rank: int = 8, model: str = BASE_MODEL, name: str = "job"
    ) -> tuple[str, str]:
        """(job id, adapter id) of a completed job with one final adapter."""
        async with self.sessionmaker() as session:
            now = utcnow()
            job = Job(
                org_id=scope.org_id,
                project_id=scope.project_id,
                name=name,
                model=model,
                status="completed",
                started_at=now,
                completed_at=now,
            )
            session.add(job)
            await session.flush()
            adapter = Adapter(
                job_id=job.id,
                kind="final",
                step=None,
                digest=digest,
                rank=rank,
                target_modules=["q_proj", "v_proj"],
                base_model=model,
            )
            session.add(adapter)
            await session.flush()
            await append_change(session, ChangeKind.JOB, job.id)
            await self._commit(session)
            return job.id, adapter.id

    async def deployment(
        self,
        scope: Scope,
        slug: str,
        *,
        job_id: str | None = None,
        adapter_id: str | None = None,
        base_model: str | None = None,
        auth_mode: str = "fixed_api_key",
    ) -> str:
        async with self.sessionmaker() as session:
            if adapter_id is not None:
                target = {"kind": "adapter", "adapter": {"kind": "final", "jobId": job_id}}
                kind = "adapter"
            else:
                target = {"kind": "base_model", "baseModel": base_model or BASE_MODEL}
                kind = "base_model"
            row = Deployment(
                org_id=scope.org_id,
                project_id=scope.project_id,
                slug=slug,
                target=target,
                target_kind=kind,
                job_id=job_id,
                adapter_id=adapter_id,
                base_model=base_model if adapter_id is None else None,
                auth_mode=auth_mode,
                enabled=True,
                run_retention_mode="days",
                run_retention_days=7,
            )
            if kind == "base_model" and row.base_model is None:
                row.base_model = BASE_MODEL
            session.add(row)
            await session.flush()
            await append_change(session, ChangeKind.DEPLOYMENT, row.id)
            await self._commit(session)
            return row.id

    async def update_deployment(self, deployment_id: str, **values: object) -> None:
        async with self.sessionmaker() as session:
            await session.execute(update(Deployment).where(Deployment.id == deployment_id).values(**values))
            await append_change(session, ChangeKind.DEPLOYMENT, deployment_id)
            await self._commit(session)

    async def key(self, deployment_id: str, *, expires_at: datetime | None = None) -> IssuedKey:
        issued = keys.issue(keys.TokenKind.DEPLOYMENT_KEY)
        async with self.sessionmaker() as session:
            row = DeploymentKey(
                deployment_id=deployment_id,
                kid=issued.kid,
                secret_hash=issued.secret_hash,
                label="test",
                prefix=issued.prefix,
                expires_at=expires_at,
            )
            session.add(row)
            await session.flush()
            await append_change(session, ChangeKind.DEPLOYMENT_KEY, row.id)
            await self._commit(session)
            return IssuedKey(id=row.id, plaintext=issued.plaintext, kid=issued.kid)

    async def revoke_key(self, key_id: str) -> None:
        async with self.sessionmaker() as session:
            await session.execute(
                update(DeploymentKey).where(DeploymentKey.id == key_id).values(revoked_at=utcnow())
            )
            await append_change(session, ChangeKind.DEPLOYMENT_KEY, key_id)
            await self._commit(session)

    async def engine(
        self,
        name: str,
        url: str,
        *,
        adapter_root: str,
        served_model_name: str = BASE_MODEL,
        max_lora_rank: int = 16,
        enabled: bool = True,
    ) -> str:
        async with self.sessionmaker() as session:
            row = Engine(
                name=name,
                url=url,
                base_model=BASE_MODEL,
                served_model_name=served_model_name,
                adapter_root=adapter_root,
                max_loras=4,
                max_cpu_loras=None,
                max_lora_rank=max_lora_rank,
                enabled=enabled,
                api_key=None,
                source="api",
            )
            session.add(row)
            await session.flush()
            await append_change(session, ChangeKind.ENGINE, row.id)
            await self._commit(session)
            return row.id
