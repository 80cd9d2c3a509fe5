"""Real gateway processes for tests: ``lorry serve gateway`` with its own environment and log.

Each process reads ``LORRY_*`` settings and ``LORRY_GATEWAY_*`` tunables (``gateway.options``)
from its environment, like a deployed replica. Its output goes to ``<name>.log`` (searched for
plaintext keys at the end of the session with every other log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from lorry.settings import LorrySettings
from tests.engines import free_port

LORRY = Path(sys.executable).with_name("lorry")
START_TIMEOUT_S = 60.0


def settings_environ(settings: LorrySettings, **extra: Any) -> dict[str, str]:
    """The environment that gives a process ``settings`` (only the fields gateways read)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LORRY_", "PYTEST_")) and key not in ("COV_CORE_SOURCE",)
    }
    env.update(
        {
            "LORRY_DATABASE_URL": settings.database_url,
            "LORRY_BASE_DOMAIN": settings.base_domain,
            "LORRY_PATH_ROUTING": "true" if settings.path_routing else "false",
            "LORRY_ADAPTER_STORE": str(settings.adapter_store),
            "LORRY_ENGINES": json.dumps(settings.engines),
            "LORRY_SHUTDOWN_DEADLINE_S": str(settings.shutdown_deadline_s),
            "LORRY_UPSTREAM_CONNECT_TIMEOUT_S": str(settings.upstream_connect_timeout_s),
            "LORRY_UPSTREAM_FIRST_BYTE_TIMEOUT_S": str(settings.upstream_first_byte_timeout_s),
            "LORRY_UPSTREAM_IDLE_TIMEOUT_S": str(settings.upstream_idle_timeout_s),
            "LORRY_UPSTREAM_TOTAL_TIMEOUT_S": str(settings.upstream_total_timeout_s),
            "LORRY_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({key: str(value) for key, value in extra.items()})
    return env


@dataclass(eq=False)
class GatewayProcess:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    ops_port: int
    log_path: Path
    started_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    def base_url(self, slug: str) -> str:
        """The OpenAI base URL of a deployment through this gateway (path mode)."""
        return f"{self.url}/d/{slug}/v1"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        started = time.monotonic()
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if not self.alive():
                    code = self.process.returncode
                    raise RuntimeError(f"gateway {self.name} exited with {code}:\n{self.log_text()[-4000:]}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{self.ops_url}/readyz")).status_code == 200:
                        self.started_s = time.monotonic() - started
                        return
                if time.monotonic() - started > timeout:
                    raise RuntimeError(f"gateway {self.name} not ready:\n{self.log_text()[-4000:]}")
                await asyncio.sleep(0.1)

    async def metrics(self) -> str:
        async with httpx.AsyncClient(timeout=5.0) as client:
            response = await client.get(f"{self.ops_url}/metrics")
        response.raise_for_status()
        return response.text

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway {self.name} still running after {timeout} s")
            await asyncio.sleep(0.05)
        return self.process.returncode

    async def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            self.terminate()
            try:
                await self.wait_exit(timeout)
            except TimeoutError:
                self.process.kill()
                self.process.wait(5)


def start_gateway(
    name: str, settings: LorrySettings, log_dir: Path, env: Mapping[str, Any] | None = None
) -> GatewayProcess:
    port, ops_port = free_port(), free_port()
    log_path = log_dir / f"gateway-{name}.log"
    environ = settings_environ(settings, **(env or {}))
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                str(LORRY),
                "serve",
                "gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--ops-port",
                str(ops_port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=str(log_dir),
        )
    return GatewayProcess(name=name, process=process, port=port, ops_port=ops_port, log_path=log_path)


def _samples(text: str, name: str, labels: dict[str, str]) -> Iterator[float]:
    """The values of the samples of ``name`` in a Prometheus text page whose labels include ``labels``."""
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        present = set(label_text.rstrip("}").split(",")) if label_text else set()
        if wanted <= present:
            yield float(value)


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of a Prometheus text page (None when absent)."""
    return next(_samples(text, name, labels), None)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include ``labels``."""
    return sum(_samples(text, name, labels), 0.0)
