"""SQLAlchemy 2 models for every table of DESIGN §3. Relationships are never lazy-loaded."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from lorry.db.types import JSONType, UTCDateTime, new_id, utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(AsyncAttrs, DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


def _id() -> Mapped[str]:
    return mapped_column(String(36), primary_key=True, default=new_id)


def _created_at() -> Mapped[datetime]:
    return mapped_column(default=utcnow)


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[str] = _id()
    slug: Mapped[str] = mapped_column(String(50), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = _created_at()


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("org_id", "slug"),)

    id: Mapped[str] = _id()
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    slug: Mapped[str] = mapped_column(String(50))
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = _created_at()


class AdminToken(Base):
    __tablename__ = "admin_tokens"
    __table_args__ = (
        CheckConstraint("kind IN ('install', 'org')", name="kind"),
        CheckConstraint("(kind = 'org') = (org_id IS NOT NULL)", name="org_scope"),
    )

    id: Mapped[str] = _id()
    kind: Mapped[str] = mapped_column(String(16))
    org_id: Mapped[str | None] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    kid: Mapped[str] = mapped_column(String(12), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(200))
    label: Mapped[str] = mapped_column(String(80))
    prefix: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    rolled_from: Mapped[str | None] = mapped_column(String(36))


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = _id()
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    created_at: Mapped[datetime] = _created_at()
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (
        CheckConstraint("kind IN ('final', 'checkpoint')", name="kind"),
        CheckConstraint("kind = 'final' OR step IS NOT NULL", name="checkpoint_step"),
        Index(
            "uq_adapters_job_final",
            "job_id",
            unique=True,
            postgresql_where=text("kind = 'final'"),
            sqlite_where=text("kind = 'final'"),
        ),
        Index(
            "uq_adapters_job_checkpoint_step",
            "job_id",
            "step",
            unique=True,
            postgresql_where=text("kind = 'checkpoint'"),
            sqlite_where=text("kind = 'checkpoint'"),
        ),
    )

    id: Mapped[str] = _id()
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    step: Mapped[int | None] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    target_modules: Mapped[list[str]] = mapped_column(JSONType)
    base_model: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = _created_at()


class Engine(Base):
    __tablename__ = "engines"

    id: Mapped[str] = _id()
    name: Mapped[str] = mapped_column(String(100), unique=True)
    url: Mapped[str] = mapped_column(String(500))
    base_model: Mapped[str] = mapped_column(String(300), index=True)
    served_model_name: Mapped[str] = mapped_column(String(300))
    adapter_root: Mapped[str] = mapped_column(String(500))
    max_loras: Mapped[int] = mapped_column(Integer, default=4)
    max_cpu_loras: Mapped[int | None] = mapped_column(Integer)
    max_lora_rank: Mapped[int] = mapped_column(Integer, default=16)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    api_key: Mapped[str | None] = mapped_column(String(500))
    source: Mapped[str] = mapped_column(String(16), default="api")
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (
        CheckConstraint("auth_mode IN ('fixed_api_key', 'none')", name="auth_mode"),
        CheckConstraint("target_kind IN ('adapter', 'base_model')", name="target_kind"),
    )

    id: Mapped[str] = _id()
    org_id: Mapped[str] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    # Unique across the install, deleted rows included: a slug is a hostname and is never reused.
    slug: Mapped[str] = mapped_column(String(50), unique=True)
    # Echoed exactly as posted; the columns below are its resolved, indexed form.
    target: Mapped[dict[str, Any]] = mapped_column(JSONType)
    target_kind: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="RESTRICT"), index=True)
    adapter_id: Mapped[str | None] = mapped_column(ForeignKey("adapters.id", ondelete="RESTRICT"), index=True)
    base_model: Mapped[str | None] = mapped_column(String(300))
    auth_mode: Mapped[str] = mapped_column(String(16), default="fixed_api_key")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    run_retention_mode: Mapped[str] = mapped_column(String(16), default="days")
    run_retention_days: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]


class DeploymentKey(Base):
    __tablename__ = "deployment_keys"

    id: Mapped[str] = _id()
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"), index=True)
    kid: Mapped[str] = mapped_column(String(12), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(200))
    label: Mapped[str] = mapped_column(String(80))
    prefix: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    rolled_from: Mapped[str | None] = mapped_column(String(36))


class ChangeCounter(Base):
    """One row; updating it serialises change-log appends so seq commits in order (DESIGN §6)."""

    __tablename__ = "change_counter"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class ChangeLogEntry(Base):
    __tablename__ = "change_log"

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    )
    kind: Mapped[str] = mapped_column(String(40))
    resource_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_org_id_created_at", "org_id", "created_at"),)

    id: Mapped[str] = _id()
    org_id: Mapped[str | None] = mapped_column(String(36))
    actor_token_id: Mapped[str | None] = mapped_column(String(36))
    action: Mapped[str] = mapped_column(String(60), index=True)
    resource_type: Mapped[str] = mapped_column(String(40))
    resource_id: Mapped[str] = mapped_column(String(36))
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[datetime] = _created_at()
