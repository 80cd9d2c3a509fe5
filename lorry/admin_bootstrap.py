"""Minting an admin token straight in the database: how an operator gets the first one."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from lorry import keys
from lorry.changefeed import ChangeKind, append_change
from lorry.db.engine import create_engine, create_sessionmaker
from lorry.db.models import AdminToken, AuditEvent, Organization
from lorry.settings import LorrySettings


@dataclass(frozen=True)
class MintedToken:
    id: str
    plaintext: str
    prefix: str


async def mint_admin_token(
    settings: LorrySettings, *, kind: str, org_slug: str | None, label: str
) -> MintedToken:
    if kind not in ("install", "org"):
        raise ValueError("--kind must be install or org")
    if (kind == "org") != (org_slug is not None):
        raise ValueError("--org is required with --kind org, and only then")
    engine = create_engine(settings.database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            org_id = None
            if org_slug is not None:
                org = (
                    await session.execute(select(Organization).where(Organization.slug == org_slug))
                ).scalar_one_or_none()
                if org is None:
                    raise ValueError(f"no organization '{org_slug}'")
                org_id = org.id
            issued = keys.issue(keys.TokenKind.ADMIN_TOKEN)
            row = AdminToken(
                kind=kind,
                org_id=org_id,
                kid=issued.kid,
                secret_hash=issued.secret_hash,
                label=label,
                prefix=issued.prefix,
            )
            session.add(row)
            await session.flush()
            session.add(
                AuditEvent(
                    org_id=org_id,
                    actor_token_id=None,
                    action="admin_token.create",
                    resource_type="admin_token",
                    resource_id=row.id,
                    details={"label": label, "via": "cli"},
                )
            )
            await append_change(session, ChangeKind.ADMIN_TOKEN, row.id)
            await session.commit()
            return MintedToken(id=row.id, plaintext=issued.plaintext, prefix=issued.prefix)
    finally:
        await engine.dispose()
