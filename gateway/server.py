"""Serving the gateway: the data plane and the operations app on two ports (uvicorn + httptools).

``await serve(settings, host=…, port=…, ops_host=…, ops_port=…)`` runs until SIGTERM/SIGINT.
``lorry serve all`` passes its own :class:`~gateway.app.Gateway` (to wire ``notify``) and the
control-plane app as an extra server, so all stop together.

On SIGTERM the gateway drains: readiness fails at once, the listening socket closes (new
connections are refused, and requests on kept-alive connections get 503 ``shutting_down``),
requests in flight get up to ``LORRY_SHUTDOWN_DEADLINE_S`` to finish; then streams still running
end with an error event (see :meth:`gateway.app.Gateway.begin_drain`). uvicorn's own graceful
timeout is that deadline plus ``shutdown_grace_s``, so the error events go out before it cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from gateway.app import Gateway, create_app
from lorry.serving import QuietServer, uvicorn_config
from lorry.settings import LorrySettings

logger = logging.getLogger("lorry.gateway.server")


@dataclass(frozen=True, slots=True)
class ExtraServer:
    """Another ASGI app served alongside (the control plane under ``lorry serve all``)."""

    app: ASGIApp
    host: str
    port: int
    lifespan: str = "on"


def _config(
    app: ASGIApp, host: str, port: int, *, lifespan: str, settings: LorrySettings, grace_s: float = 3.0
) -> uvicorn.Config:
    graceful = max(1, math.ceil(settings.shutdown_deadline_s + grace_s))
    return uvicorn_config(
        app, host, port, log_level=settings.log_level, lifespan=lifespan, graceful_timeout_s=graceful
    )


async def serve(
    settings: LorrySettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    ops_host: str | None = None,
    ops_port: int = 9090,
    gateway: Gateway | None = None,
    extra: Sequence[ExtraServer] = (),
    install_signal_handlers: bool = True,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until a signal (or ``stop`` is set); the data app's lifespan starts the gateway."""
    gw = gateway if gateway is not None else create_app(settings)
    grace = gw.options.shutdown_grace_s
    data = QuietServer(_config(gw.app, host, port, lifespan="on", settings=settings, grace_s=grace))
    ops = QuietServer(_config(gw.ops_app, ops_host or host, ops_port, lifespan="off", settings=settings))
    others = [
        QuietServer(_config(e.app, e.host, e.port, lifespan=e.lifespan, settings=settings)) for e in extra
    ]
    stop_event = stop if stop is not None else asyncio.Event()

    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop_event.set)
                installed.append(sig)

    servers = [data, ops, *others]
    tasks = [asyncio.create_task(server.serve(), name=f"uvicorn-{i}") for i, server in enumerate(servers)]

    async def on_stop() -> None:
        await stop_event.wait()
        logger.info("stopping: draining for up to %.1f s", settings.shutdown_deadline_s)
        signalled = loop.time()
        gw.begin_drain(settings.shutdown_deadline_s)
        data.should_exit = True
        await asyncio.gather(tasks[0], return_exceptions=True)
        logger.info("stopped serving requests %.2f s after the signal", loop.time() - signalled)
        for server in servers[1:]:
            server.should_exit = True

    stopper = asyncio.create_task(on_stop())
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if any(not server.started for server in servers) or not stop_event.is_set():
            # One server ended on its own (failed to bind, startup failed): stop the rest.
            stop_event.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopper
        for sig in installed:
            loop.remove_signal_handler(sig)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
