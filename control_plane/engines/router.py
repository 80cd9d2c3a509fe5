"""Routes for engines (install tokens only): `/v1/engines` and `/v1/engines/{id}`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from control_plane.auth import PrincipalDep
from control_plane.database import ContextDep, SessionDep
from control_plane.engines import service
from control_plane.engines.schemas import EngineCreate, EngineEnvelope, EngineList, EngineUpdate
from control_plane.principal import Principal

router = APIRouter(prefix="/v1/engines", tags=["engines"])


def require_install(principal: PrincipalDep) -> Principal:
    # A dependency, so an org token is refused (403) before its body is even validated.
    principal.require_install()
    return principal


InstallPrincipalDep = Annotated[Principal, Depends(require_install)]


@router.get("", response_model=EngineList, summary="List engines (static ones first)")
async def list_engines(ctx: ContextDep, session: SessionDep, _principal: InstallPrincipalDep) -> EngineList:
    return EngineList(engines=await service.list_engines(session, ctx.settings))


@router.post("", response_model=EngineEnvelope, status_code=201, summary="Register an engine")
async def create_engine(
    body: EngineCreate, ctx: ContextDep, session: SessionDep, principal: InstallPrincipalDep
) -> EngineEnvelope:
    return EngineEnvelope(engine=await service.create_engine(session, ctx.settings, principal, body))


@router.get("/{engine_id}", response_model=EngineEnvelope, summary="Get an engine")
async def get_engine(
    engine_id: str, ctx: ContextDep, session: SessionDep, _principal: InstallPrincipalDep
) -> EngineEnvelope:
    return EngineEnvelope(engine=await service.get_engine(session, ctx.settings, engine_id))


@router.patch(
    "/{engine_id}",
    response_model=EngineEnvelope,
    summary="Change an engine (partial); static engines are read-only (409 engine_read_only)",
)
async def update_engine(
    engine_id: str, body: EngineUpdate, ctx: ContextDep, session: SessionDep, principal: InstallPrincipalDep
) -> EngineEnvelope:
    return EngineEnvelope(
        engine=await service.update_engine(session, ctx.settings, principal, engine_id, body)
    )


@router.delete(
    "/{engine_id}",
    status_code=204,
    response_class=Response,
    summary="Remove an engine; static engines are read-only (409 engine_read_only)",
)
async def delete_engine(
    engine_id: str, ctx: ContextDep, session: SessionDep, principal: InstallPrincipalDep
) -> Response:
    await service.delete_engine(session, ctx.settings, principal, engine_id)
    return Response(status_code=204)
