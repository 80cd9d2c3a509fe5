"""Measurements: sequential overhead (gateway median - direct median, as the peers' independent
test), time to the first streamed byte, throughput under concurrency, and the gateway process's
own CPU time and memory per request (which, unlike requests per second, the load generator's
speed does not limit)."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from tests.bench.stack import Stack

MESSAGES = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "mode:long"}]
Request = Callable[[httpx.AsyncClient, str, str | None], Awaitable[float]]


def chat_body(model: str, *, stream: bool, long: bool = False, max_tokens: int = 16) -> dict[str, object]:
    return {
        "model": model,
        "messages": LONG if long else MESSAGES,
        "stream": stream,
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def answer(model: str, *, max_tokens: int = 16) -> Request:
    """A non-streamed chat completion; seconds until the whole answer."""

    async def one(client: httpx.AsyncClient, base: str, key: str | None) -> float:
        started = time.perf_counter()
        response = await client.post(
            f"{base}/chat/completions",
            json=chat_body(model, stream=False, max_tokens=max_tokens),
            headers=_auth(key),
        )
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return elapsed

    return one


def first_byte(model: str, *, long: bool = False, max_tokens: int = 16) -> Request:
    """A streamed chat completion read to its end; seconds until its first byte."""

    async def one(client: httpx.AsyncClient, base: str, key: str | None) -> float:
        started = time.perf_counter()
        body = chat_body(model, stream=True, long=long, max_tokens=max_tokens)
        async with client.stream(
            "POST", f"{base}/chat/completions", json=body, headers=_auth(key)
        ) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            first: float | None = None
            tail = b""
            async for chunk in response.aiter_raw():
                if first is None:
                    first = time.perf_counter() - started
                tail = (tail + chunk)[-32:]
            if not tail.rstrip().endswith(b"data: [DONE]"):
                raise RuntimeError(f"stream ended without [DONE]: {tail!r}")
        assert first is not None
        return first

    return one


def _auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


@dataclass(frozen=True)
class Overhead:
    direct_ms: float
    gateway_ms: float

    @property
    def added_ms(self) -> float:
        return self.gateway_ms - self.direct_ms


async def overhead(stack: Stack, request: Request, *, rounds: int = 7, per_round: int = 25) -> Overhead:
    """Median of round medians, direct and through the gateway, requests one at a time and the
    two interleaved by round (after a warm-up), as ``cuihuan/llm-gateway-bench`` measures it."""
    direct: list[float] = []
    gateway: list[float] = []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(5):
            await request(client, stack.upstream_url, None)
            await request(client, stack.gateway_url, stack.key)
        for _ in range(rounds):
            direct.append(
                statistics.median([await request(client, stack.upstream_url, None) for _ in range(per_round)])
            )
            gateway.append(
                statistics.median(
                    [await request(client, stack.gateway_url, stack.key) for _ in range(per_round)]
                )
            )
    return Overhead(statistics.median(direct) * 1000, statistics.median(gateway) * 1000)


@dataclass(frozen=True)
class Load:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    gateway_cpu_s: float
    gateway_rss_mib: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def cpu_ms_per_request(self) -> float:
        return self.gateway_cpu_s * 1000 / max(1, self.requests)


async def load(stack: Stack, request: Request, *, concurrency: int, seconds: float) -> Load:
    """``concurrency`` clients sending back to back for ``seconds`` through the gateway."""
    latencies: list[float] = []
    errors = 0
    pid = stack.gateway.process.pid
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(request(client, stack.gateway_url, stack.key) for _ in range(concurrency)))
        cpu_before = process_cpu_seconds(pid)
        started = time.perf_counter()
        stop_at = started + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                try:
                    latencies.append(await request(client, stack.gateway_url, stack.key))
                except (RuntimeError, httpx.HTTPError):
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = process_cpu_seconds(pid) - cpu_before
    return Load(concurrency, len(latencies), errors, elapsed, latencies, cpu, process_rss_mib(pid))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def process_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
