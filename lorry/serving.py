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


class _Server(uvicorn.Server):
    """uvicorn's server minus its own signal capture: `serve_all` owns the signals."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass(frozen=True)
class Listener:
    app: ASGIApp
    host: str
    port: int
    name: str


def _config(listener: Listener, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        listener.app,
        host=listener.host,
        port=listener.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=log_level,
        log_config=log_config(log_level),
        access_log=False,
        server_header=False,
        # Streams are long-lived; the shutdown deadline, not uvicorn, bounds them.
        timeout_graceful_shutdown=None,
    )


async def serve_all(
    listeners: Sequence[Listener],
    *,
    log_level: str = "info",
    on_started: Callable[[], None] | None = None,
    on_signal: Callable[[], None] | None = None,
) -> None:
    """Serve every listener until SIGINT/SIGTERM; `on_signal` runs first (e.g. to start a drain)."""
    servers = [_Server(_config(listener, log_level)) for listener in listeners]
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
