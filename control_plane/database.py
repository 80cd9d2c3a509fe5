"""One database session per request, committed in exactly one place."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.context import AppContext
from lorry.changefeed import CHANGED_FLAG


def get_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    ctx = get_context(request)
    async with ctx.sessionmaker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()
        if session.info.pop(CHANGED_FLAG, False):
            ctx.changes_committed()


ContextDep = Annotated[AppContext, Depends(get_context)]
# scope="function": commit before the response is sent, so a failed commit is the response.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
