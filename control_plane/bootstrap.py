"""First start on an empty database: org and project `default`, and the bootstrap install token."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from lorry import keys
from lorry.changefeed import ChangeKind, append_change
from lorry.db.models import AdminToken, Organization, Project
from lorry.errors import InvalidRequest

DEFAULT_SLUG = "default"


def admin_token_row(plaintext: str, *, kind: str, org_id: str | None, label: str) -> AdminToken:
    """A row for a token whose plaintext the operator chose (bootstrap) or was just issued."""
    parsed = keys.parse(plaintext)
    if parsed is None or parsed.kind is not keys.TokenKind.ADMIN_TOKEN:
        raise InvalidRequest("Not a well-formed lorry_admin_ token")
    return AdminToken(
        kind=kind,
        org_id=org_id,
        kid=parsed.kid,
        secret_hash=keys.hash_secret(parsed.secret),
        label=label,
        prefix=parsed.prefix,
    )


async def ensure_bootstrapped(session: AsyncSession, bootstrap_token: str | None) -> bool:
    """Idempotent; the caller commits. Returns whether this call initialised the database.

    The configured token is stored only on an empty database; without one, an operator mints
    the first install token with `lorry admin create-token`.
    """
    if (await session.execute(select(func.count()).select_from(Organization))).scalar_one():
        return False
    org = Organization(slug=DEFAULT_SLUG, name="Default")
    session.add(org)
    await session.flush()
    project = Project(org_id=org.id, slug=DEFAULT_SLUG, name="Default")
    session.add(project)
    if bootstrap_token:
        session.add(admin_token_row(bootstrap_token, kind="install", org_id=None, label="bootstrap"))
    await session.flush()
    await append_change(session, ChangeKind.ORG, org.id)
    await append_change(session, ChangeKind.PROJECT, project.id)
    return True
