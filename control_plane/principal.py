"""Who is calling: admin-token verification with a short positive cache (DESIGN §2, §5)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from lorry import keys
from lorry.db.models import AdminToken
from lorry.db.types import utcnow
from lorry.errors import Forbidden, Unauthorized
from lorry.ttl_cache import TTLCache

INSTALL = "install"
ORG = "org"


@dataclass(frozen=True, slots=True)
class Principal:
    token_id: str
    kind: str
    org_id: str | None
    expires_at: datetime | None

    @property
    def is_install(self) -> bool:
        return self.kind == INSTALL

    def require_install(self) -> None:
        if not self.is_install:
            raise Forbidden("This operation needs an install token")

    def require_org(self, org_id: str) -> None:
        if not self.is_install and self.org_id != org_id:
            raise Forbidden()


class AdminTokenVerifier:
    """Verifies admin tokens, caching successes briefly under a keyed hash of the whole token."""

    def __init__(
        self, *, ttl_s: float = 2.0, max_entries: int = 10_000, max_concurrent_verifies: int = 4
    ) -> None:
        self._key = secrets.token_bytes(32)
        self._positive: TTLCache[bytes, Principal] = TTLCache(max_entries=max_entries, ttl_s=ttl_s)
        self._verify_slots = asyncio.Semaphore(max_concurrent_verifies)
        self.verifications = 0

    def _fingerprint(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode(), hashlib.sha256).digest()

    def forget(self, token_id: str) -> None:
        self._positive.discard_where(lambda _key, principal: principal.token_id == token_id)

    async def authenticate(self, session: AsyncSession, token: str) -> Principal:
        fingerprint = self._fingerprint(token)
        now = utcnow()
        cached = self._positive.get(fingerprint)
        if cached is not None and (cached.expires_at is None or cached.expires_at > now):
            return cached
        parsed = keys.parse(token)
        if parsed is None or parsed.kind is not keys.TokenKind.ADMIN_TOKEN:
            raise Unauthorized()
        row = (
            await session.execute(select(AdminToken).where(AdminToken.kid == parsed.kid))
        ).scalar_one_or_none()
        if (
            row is None
            or row.revoked_at is not None
            or (row.expires_at is not None and row.expires_at <= now)
        ):
            raise Unauthorized()
        async with self._verify_slots:
            self.verifications += 1
            ok = await asyncio.to_thread(keys.verify_secret, row.secret_hash, parsed.secret)
        if not ok:
            raise Unauthorized()
        principal = Principal(token_id=row.id, kind=row.kind, org_id=row.org_id, expires_at=row.expires_at)
        self._positive.put(fingerprint, principal)
        return principal
