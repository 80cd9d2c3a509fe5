"""Engine DNS names → addresses (DESIGN §8: one engine per A/AAAA record).

Resolution runs the (blocking) resolver in a worker thread under a timeout. A name that fails to
resolve keeps its previous addresses; a name never resolved is left to httpx (one engine entry,
as written). :meth:`AddressBook.refresh` re-resolves every name; the gateway calls it periodically
and re-syncs its engine pool when an answer changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from gateway.options import Resolver

logger = logging.getLogger("lorry.gateway.dns")

Name = tuple[str, int]


class AddressBook:
    def __init__(self, resolver: Resolver, *, timeout_s: float = 2.0) -> None:
        self._resolver = resolver
        self._timeout_s = timeout_s
        self.addresses: dict[Name, list[str]] = {}
        self.resolved_at: dict[Name, float] = {}
        self.lookups = 0
        self._last_error_log: dict[Name, float] = {}

    async def _resolve(self, name: Name) -> list[str] | None:
        self.lookups += 1
        host, port = name
        try:
            async with asyncio.timeout(self._timeout_s):
                found = await asyncio.to_thread(self._resolver, host, port)
        except (OSError, TimeoutError, UnicodeError, ValueError) as exc:
            now = time.monotonic()
            if now - self._last_error_log.get(name, 0.0) > 60.0:
                self._last_error_log[name] = now
                logger.warning("could not resolve engine host %s: %s", host, type(exc).__name__)
            return None
        addresses = sorted(set(found))  # order carries no meaning; round-robin DNS must not churn
        return addresses or None

    async def update(self, names: Iterable[Name], *, only_missing: bool) -> bool:
        """Resolves ``names`` (only those never resolved when ``only_missing``); True if any changed.

        Names no longer asked about are forgotten.
        """
        wanted = set(names)
        changed = False
        for stale in set(self.addresses) - wanted:
            del self.addresses[stale]
            self.resolved_at.pop(stale, None)
            changed = True
        todo = sorted(name for name in wanted if not (only_missing and name in self.addresses))
        results = await asyncio.gather(*(self._resolve(name) for name in todo))
        for name, found in zip(todo, results, strict=True):
            if found is None:
                continue  # keep what we had (or nothing: httpx resolves the name itself)
            self.resolved_at[name] = time.monotonic()
            if self.addresses.get(name) != found:
                if name in self.addresses:
                    logger.info("engine host %s now resolves to %s", name[0], ", ".join(found))
                self.addresses[name] = found
                changed = True
        return changed
