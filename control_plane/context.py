"""What one control-plane process shares between requests, built once by the app factory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from control_plane.principal import AdminTokenVerifier
from lorry.settings import LorrySettings


@dataclass
class AppContext:
    settings: LorrySettings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    verifier: AdminTokenVerifier
    # Called after every commit that appended to the change log: `serve all` wires the
    # in-process gateway here so it does not wait for its poll.
    change_listeners: list[Callable[[], None]] = field(default_factory=list)

    def changes_committed(self) -> None:
        for listener in self.change_listeners:
            listener()
