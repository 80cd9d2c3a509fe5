"""Deployment-key authentication on the data plane (DESIGN §5).

Order of work, cheapest first:

1. header syntax and CRC (``lorry.keys.parse``) — no I/O;
2. the positive cache, keyed by an HMAC of the whole token under a per-process secret, with a
   hard TTL; the key's ``expiresAt`` is checked on every hit;
3. the negative caches: unknown kids (by kid) and rejected tokens (by the HMAC of the whole
   token, never by kid, so a stranger's wrong guesses cannot block the owner's right token);
4. the failure throttle per (kid, client address): a throttled attempt gets the same 401 without
   any lookup or argon2 — unless this exact token verified recently on this process;
5. one indexed lookup by kid (concurrency-capped) and one argon2 verify in a worker thread behind
   a semaphore. Concurrent misses for the same token share one lookup and one verify.

Every failure is the same 401 ``invalid_api_key``. A miss while the database is unreachable
fails closed with 503 and ``retry-after``; cached grants keep working until their hard TTL.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import InvalidApiKey, ServiceUnavailable
from lorry import keys
from lorry.db.models import DeploymentKey
from lorry.db.types import utcnow
from lorry.ttl_cache import TTLCache

logger = logging.getLogger("lorry.gateway.keys")

Outcome = str  # "cache_hit" | "verified" | "rejected" | "throttled"
OutcomeHook = Callable[[str, Outcome], None]


@dataclass(frozen=True, slots=True)
class KeyCheckOptions:
    positive_ttl_s: float = 300.0
    positive_max_entries: int = 100_000
    negative_ttl_s: float = 60.0
    negative_max_entries: int = 100_000
    recent_ttl_s: float = 3600.0
    max_concurrent_lookups: int = 8
    max_concurrent_verifies: int = 2
    # Failed attempts allowed per (kid, client address) in a fixed window before further attempts
    # are refused without work: at most `throttle_failures` argon2 runs per window per pair.
    throttle_failures: int = 5
    throttle_window_s: float = 60.0
    lookup_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class KeyGrant:
    key_id: str
    deployment_id: str
    expires_at: datetime | None

    def valid_at(self, now: datetime) -> bool:
        return self.expires_at is None or self.expires_at > now


@dataclass(frozen=True, slots=True)
class _KeyRow:
    id: str
    deployment_id: str
    secret_hash: str
    revoked_at: datetime | None
    expires_at: datetime | None


class _Rejected(Exception):
    """A definite failure: cache it under the token's fingerprint."""


class _Throttle:
    """Failure counts per (kid, client) in a fixed window; bounded like every cache here."""

    def __init__(self, *, limit: int, window_s: float, max_entries: int) -> None:
        self._limit = limit
        self._window_s = window_s
        self._counts: TTLCache[tuple[str, str], list[float]] = TTLCache(
            max_entries=max_entries, ttl_s=window_s
        )

    def blocked(self, kid: str, client: str) -> bool:
        entry = self._counts.get((kid, client))
        return entry is not None and entry[0] >= self._limit

    def record_failure(self, kid: str, client: str) -> None:
        key = (kid, client)
        entry = self._counts.get(key)
        if entry is None:
            self._counts.put(key, [1.0])
        else:
            entry[0] += 1


def extract_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The presented key from ``Authorization: Bearer`` or ``x-api-key``; None if neither.

    Raises :class:`InvalidApiKey` when the two (or repeated headers) disagree, or when
    ``Authorization`` holds anything but a bearer token.
    """
    presented: set[str] = set()
    for name, raw in headers:
        if name == b"authorization":
            value = raw.decode("latin-1").strip()
            scheme, _, credential = value.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise InvalidApiKey()
            presented.add(credential.strip())
        elif name == b"x-api-key":
            presented.add(raw.decode("latin-1").strip())
    if len(presented) > 1:
        raise InvalidApiKey()
    return next(iter(presented)) if presented else None


class KeyChecker:
    def __init__(
        self,
        engine: AsyncEngine,
        options: KeyCheckOptions | None = None,
        *,
        on_outcome: OutcomeHook | None = None,
        on_verification: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self.options = opts = options or KeyCheckOptions()
        self._secret = secrets.token_bytes(32)
        self._positive: TTLCache[bytes, KeyGrant] = TTLCache(
            max_entries=opts.positive_max_entries, ttl_s=opts.positive_ttl_s
        )
        self._rejected: TTLCache[bytes, bool] = TTLCache(
            max_entries=opts.negative_max_entries, ttl_s=opts.negative_ttl_s
        )
        self._unknown_kids: TTLCache[str, bool] = TTLCache(
            max_entries=opts.negative_max_entries, ttl_s=opts.negative_ttl_s
        )
        self._recent: TTLCache[bytes, bool] = TTLCache(
            max_entries=opts.positive_max_entries, ttl_s=opts.recent_ttl_s
        )
        self._throttle = _Throttle(
            limit=opts.throttle_failures,
            window_s=opts.throttle_window_s,
            max_entries=opts.negative_max_entries,
        )
        self._lookup_slots = asyncio.Semaphore(opts.max_concurrent_lookups)
        self._verify_slots = asyncio.Semaphore(opts.max_concurrent_verifies)
        self._inflight: dict[bytes, asyncio.Future[KeyGrant]] = {}
        # Invalidation clocks: a grant resolved while its key (or everything) was forgotten is not
        # cached, so a revocation racing a lookup cannot be overwritten by the stale answer.
        self._clock = 0
        self._generation = 0
        self._forgotten: TTLCache[str, int] = TTLCache(
            max_entries=opts.negative_max_entries, ttl_s=max(60.0, 2 * opts.lookup_timeout_s)
        )
        self._on_outcome = on_outcome
        self._on_verification = on_verification
        # Counters for tests and metrics.
        self.verifications = 0
        self.lookups = 0
        self.cache_hits = 0
        self.throttled = 0
        self.rejections = 0

    # -- invalidation (change follower) -----------------------------------------------------------

    def forget_keys(self, key_ids: Iterable[str]) -> None:
        """A key was revoked, rolled, expired early or deleted: drop its grants at once."""
        ids = set(key_ids)
        if not ids:
            return
        self._clock += 1
        for key_id in ids:
            self._forgotten.put(key_id, self._clock)
        self._positive.discard_where(lambda _fp, grant: grant.key_id in ids)
        # A new key could (in theory) reuse a kid we cached as unknown.
        self._unknown_kids.clear()

    def forget_deployments(self, deployment_ids: Iterable[str]) -> None:
        ids = set(deployment_ids)
        if not ids:
            return
        self._clock += 1
        self._generation = self._clock
        self._positive.discard_where(lambda _fp, grant: grant.deployment_id in ids)

    def forget_unknown_kids(self) -> None:
        self._unknown_kids.clear()

    def cached_key_ids(self) -> set[str]:
        """Key ids with a positive entry (for the resync's revocation check)."""
        ids: set[str] = set()

        def collect(_fingerprint: bytes, grant: KeyGrant) -> bool:
            ids.add(grant.key_id)
            return False

        self._positive.discard_where(collect)
        return ids

    def forget_all(self) -> None:
        """Nothing cached can be trusted to be current."""
        self._clock += 1
        self._generation = self._clock
        self._positive.clear()
        self._unknown_kids.clear()
        self._rejected.clear()

    # -- the check ---------------------------------------------------------------------------------

    def _fingerprint(self, token: str) -> bytes:
        return hmac.new(self._secret, token.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def _outcome(self, deployment_id: str, outcome: Outcome) -> None:
        if self._on_outcome is not None:
            self._on_outcome(deployment_id, outcome)

    def _fail(self, deployment_id: str, outcome: Outcome = "rejected") -> InvalidApiKey:
        if outcome == "throttled":
            self.throttled += 1
        else:
            self.rejections += 1
        self._outcome(deployment_id, outcome)
        return InvalidApiKey()

    def cached_grant(self, token: str, deployment_id: str) -> KeyGrant | None:
        """The positive-cache answer alone (no I/O); None on a miss or a mismatch."""
        grant = self._positive.get(self._fingerprint(token))
        if grant is None or grant.deployment_id != deployment_id or not grant.valid_at(utcnow()):
            return None
        return grant

    async def check(self, token: str | None, deployment_id: str, client: str) -> KeyGrant:
        """The grant for ``token`` on ``deployment_id``, or :class:`InvalidApiKey` (401)."""
        if not token:
            raise self._fail(deployment_id)
        parsed = keys.parse(token)
        if parsed is None or parsed.kind is not keys.TokenKind.DEPLOYMENT_KEY:
            raise self._fail(deployment_id)
        fingerprint = self._fingerprint(token)
        now = utcnow()
        grant = self._positive.get(fingerprint)
        if grant is not None:
            if grant.deployment_id == deployment_id and grant.valid_at(now):
                self.cache_hits += 1
                self._outcome(deployment_id, "cache_hit")
                return grant
            if not grant.valid_at(now):
                self._positive.discard(fingerprint)
            else:  # a valid key of another deployment
                self._throttle.record_failure(parsed.kid, client)
                raise self._fail(deployment_id)
        if self._rejected.get(fingerprint) or self._unknown_kids.get(parsed.kid):
            self._throttle.record_failure(parsed.kid, client)
            raise self._fail(deployment_id)
        if self._throttle.blocked(parsed.kid, client) and not self._recent.get(fingerprint):
            self._throttle.record_failure(parsed.kid, client)
            raise self._fail(deployment_id, "throttled")

        task = self._inflight.get(fingerprint)
        if task is None:
            task = asyncio.create_task(self._resolve(parsed, fingerprint))
            self._inflight[fingerprint] = task
            task.add_done_callback(functools.partial(self._resolved, fingerprint))
        try:
            found = await asyncio.shield(task)
        except _Rejected:
            self._throttle.record_failure(parsed.kid, client)
            raise self._fail(deployment_id) from None
        if found.deployment_id != deployment_id or not found.valid_at(utcnow()):
            self._throttle.record_failure(parsed.kid, client)
            raise self._fail(deployment_id)
        self._outcome(deployment_id, "verified")
        return found

    def _resolved(self, fingerprint: bytes, task: asyncio.Task[KeyGrant]) -> None:
        if self._inflight.get(fingerprint) is task:
            del self._inflight[fingerprint]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone away

    async def _resolve(self, parsed: keys.ParsedToken, fingerprint: bytes) -> KeyGrant:
        """Lookup by kid and argon2 verify; caches the result. Raises _Rejected or 503."""
        started = self._clock
        row = await self._lookup(parsed.kid)
        now = utcnow()
        if row is None:
            if started == self._clock:
                self._unknown_kids.put(parsed.kid, True)
            raise _Rejected()
        if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
            self._rejected.put(fingerprint, True)
            raise _Rejected()
        async with self._verify_slots:
            self.verifications += 1
            if self._on_verification is not None:
                self._on_verification()
            ok = await asyncio.to_thread(keys.verify_secret, row.secret_hash, parsed.secret)
        if not ok:
            self._rejected.put(fingerprint, True)
            raise _Rejected()
        grant = KeyGrant(key_id=row.id, deployment_id=row.deployment_id, expires_at=row.expires_at)
        self._recent.put(fingerprint, True)
        # A revocation that arrived while we looked up must not be overwritten by a stale grant.
        forgotten = self._forgotten.get(row.id)
        if self._generation <= started and (forgotten is None or forgotten <= started):
            self._positive.put(fingerprint, grant)
        return grant

    async def _lookup(self, kid: str) -> _KeyRow | None:
        query = select(
            DeploymentKey.id,
            DeploymentKey.deployment_id,
            DeploymentKey.secret_hash,
            DeploymentKey.revoked_at,
            DeploymentKey.expires_at,
        ).where(DeploymentKey.kid == kid)
        async with self._lookup_slots:
            self.lookups += 1
            started = time.monotonic()
            try:
                async with asyncio.timeout(self.options.lookup_timeout_s):
                    async with self._engine.connect() as conn:
                        row = (await conn.execute(query)).first()
            except (OperationalError, DBAPIError, PoolTimeout, OSError, TimeoutError) as exc:
                logger.warning(
                    "key lookup failed after %.2f s: %s", time.monotonic() - started, type(exc).__name__
                )
                raise ServiceUnavailable(
                    "Authentication is temporarily unavailable", code="auth_unavailable", retry_after_s=2
                ) from exc
        if row is None:
            return None
        return _KeyRow(
            id=row.id,
            deployment_id=row.deployment_id,
            secret_hash=row.secret_hash,
            revoked_at=row.revoked_at,
            expires_at=row.expires_at,
        )
