"""Control plane and gateway in one process (`lorry serve all`, `lorry up`).

They share one database engine (on SQLite: the single writer) and the control plane wakes the
gateway after every commit that changed configuration, so nothing waits for the poll.
"""

from __future__ import annotations

import asyncio

from lorry.settings import LorrySettings


async def serve_control_plane_and_gateway(
    settings: LorrySettings,
    *,
    host: str,
    port: int,
    admin_port: int,
    ops_port: int,
    stop: asyncio.Event | None = None,
    install_signal_handlers: bool = True,
) -> None:
    from control_plane.app import create_app as create_control_plane
    from control_plane.app import create_context
    from gateway.app import create_app as create_gateway
    from gateway.server import ExtraServer, serve

    ctx = create_context(settings)
    control_plane = create_control_plane(settings, ctx)
    gateway = create_gateway(settings, db_engine=ctx.engine)
    ctx.change_listeners.append(gateway.notify)
    try:
        await serve(
            settings,
            host=host,
            port=port,
            ops_port=ops_port,
            gateway=gateway,
            extra=[ExtraServer(control_plane, host, admin_port)],
            stop=stop,
            install_signal_handlers=install_signal_handlers,
        )
    finally:
        await ctx.engine.dispose()
