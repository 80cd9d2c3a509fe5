"""The admin-token dependency every admin route uses."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from control_plane.database import ContextDep, SessionDep
from control_plane.principal import Principal
from lorry.errors import Unauthorized


def bearer_token(request: Request) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized()
    return value.strip()


async def get_principal(request: Request, ctx: ContextDep, session: SessionDep) -> Principal:
    return await ctx.verifier.authenticate(session, bearer_token(request))


PrincipalDep = Annotated[Principal, Depends(get_principal)]
