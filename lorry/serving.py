"""Running one or more ASGI apps under uvicorn in this process, with one signal handler for all."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Generator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp

from lorry.logs import log_config

# Longer than a reverse proxy keeps an idle upstream connection (nginx `keepalive_timeout` 60 s in
# deploy/proxy, ingress-nginx and AWS ALB 60 s): the proxy, not this server, closes idle connections.
# The other way round, the server may close one just as the proxy reuses it for a POST, which the
# proxy cannot retry: the client gets a 502.
KEEP_ALIVE_S = 75


class QuietServer(uvicorn.Server):
    """uvicorn's server minus its own signal capture: the caller owns the signals (several
    servers share one event loop)."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def uvicorn_config(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    log_level: str,
    lifespan: str = "on",
    graceful_timeout_s: int | None = None,
    access_log: bool = True,
) -> uvicorn.Config:
    """The one uvicorn configuration of Lorry's servers (control plane, gateway, operations)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http="httptools",
        loop="none",  # served inside the caller's running loop
        lifespan=lifespan,  # type: ignore[arg-type]
        log_level=log_level,
        log_config=log_config(log_level),
        access_log=access_log,
        server_header=False,
        date_header=True,
        timeout_graceful_shutdown=graceful_timeout_s,
        timeout_keep_alive=KEEP_ALIVE_S,
    )


@dataclass(frozen=True)
class Listener:
    app: ASGIApp
    host: str
    port: int
    name: str


def _config(listener: Listener, log_level: str) -> uvicorn.Config:
    # Streams are long-lived; the shutdown deadline, not uvicorn, bounds them.
    return uvicorn_config(listener.app, listener.host, listener.port, log_level=log_level, access_log=False)


async def serve_all(
    listeners: Sequence[Listener],
    *,
    log_level: str = "info",
    on_started: Callable[[], None] | None = None,
    on_signal: Callable[[], None] | None = None,
) -> None:
    """Serve every listener until SIGINT/SIGTERM; `on_signal` runs first (e.g. to start a drain)."""
    servers = [QuietServer(_config(listener, log_level)) for listener in listeners]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if on_signal is not None:
            on_signal()
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        if on_started is not None:
            while not all(server.started for server in servers):
                if any(task.done() for task in tasks):
                    break
                await asyncio.sleep(0.05)
            else:
                on_started()
        await asyncio.gather(*tasks)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
