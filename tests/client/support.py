"""Helpers for the client and CLI tests: a real control plane on a real port, recording transports,
call recording for the reflection checks, and adapter archives."""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp

from tests.support.adapters import tar_gz, write_adapter

C = TypeVar("C")


# --------------------------------------------------------------------------- a real server


@contextmanager
def serve_in_thread(app: ASGIApp) -> Iterator[str]:
    """Run `app` (lifespan included) under uvicorn on 127.0.0.1 and a free port; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the control plane did not start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError("the control plane did not start within 60 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- what went over the wire


@dataclass
class Wire:
    """(method, path) of every request a client sent."""

    requests: list[tuple[str, str]] = field(default_factory=list)

    def routes_hit(self, app: FastAPI) -> set[tuple[str, str]]:
        """The app's route templates these requests matched."""
        routes = admin_routes(app)
        hit: set[tuple[str, str]] = set()
        for method, path in self.requests:
            for route_method, template, pattern in routes:
                if method == route_method and pattern.fullmatch(path):
                    hit.add((route_method, template))
        return hit


class RecordingTransport(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, wire: Wire) -> None:
        self._inner, self._wire = inner, wire

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self._wire.requests.append((request.method, request.url.path))
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


class AsyncRecordingTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, wire: Wire) -> None:
        self._inner, self._wire = inner, wire

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._wire.requests.append((request.method, request.url.path))
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


HTTP_METHODS = frozenset({"get", "post", "put", "patch", "delete"})


def admin_routes(app: FastAPI) -> list[tuple[str, str, re.Pattern[str]]]:
    """Every admin API route the app publishes (its OpenAPI paths under /v1/) as
    (method, template, regex)."""
    found: list[tuple[str, str, re.Pattern[str]]] = []
    for template, operations in app.openapi()["paths"].items():
        if not template.startswith("/v1/"):
            continue
        pattern = re.compile(re.sub(r"\{[^}]+\}", "[^/]+", template))
        found.extend((method.upper(), template, pattern) for method in operations if method in HTTP_METHODS)
    assert found, "the app publishes no admin routes"
    return found


# --------------------------------------------------------------------------- which methods were called


def public_methods(cls: type) -> set[str]:
    return {name for name, member in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


class _Recorder:
    def __init__(self, target: Any, called: set[str]) -> None:
        self._target = target
        self._called = called

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if name.startswith("_") or not callable(attribute):
            return attribute
        called = self._called

        @functools.wraps(attribute)
        def record(*args: Any, **kwargs: Any) -> Any:
            called.add(name)
            return attribute(*args, **kwargs)

        return record


def recording(client: C, called: set[str]) -> C:
    """`client`, noting in `called` the name of every public method called on it."""
    return cast(C, _Recorder(client, called))


class Awaitable:
    """A blocking client seen as an async one: each method runs in a worker thread.

    One async scenario then drives both clients; for the blocking one, every call still goes
    through its own code over a real socket.
    """

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attribute: Callable[..., Any] = getattr(self._target, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(attribute, *args, **kwargs)

        return call


# --------------------------------------------------------------------------- adapters


def adapter_archive(tmp: Path, name: str, *, seed: int = 0, rank: int = 8) -> Path:
    """A .tar.gz of a valid PEFT adapter for the tiny Llama."""
    source = write_adapter(tmp / f"{name}-src", seed=seed, rank=rank, alpha=2 * rank)
    archive = tmp / f"{name}.tar.gz"
    archive.write_bytes(tar_gz(source))
    return archive


def training_output(root: Path, name: str, *, steps: tuple[int, ...] = (5,)) -> Path:
    """A fine-tuning output directory: the final adapter at its root, `checkpoint-<step>/` beside it."""
    directory = write_adapter(root / name, seed=1)
    for step in steps:
        write_adapter(directory / f"checkpoint-{step}", seed=100 + step)
    return directory
