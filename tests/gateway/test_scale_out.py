"""Two real vLLM engines, two real gateway processes, one PostgreSQL (issue 5; DESIGN §6-§8, §10).

The shared engine runs on core 0; this module starts one more on core 1 for all its tests (and
restarts it once, in the last test: at most 3 engine starts here, the shared one included).
Gateways are real ``lorry serve gateway`` processes, configured through their environment; the
control plane runs in the test process on the same database. Which engine served what is read
from the engines' own ``/metrics`` and logs, never from the gateway.

Every bound is measured and printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import re
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest

from gateway.balancer import rendezvous_score
from gateway.loop_watchdog import STALL_MARKER
from lorry.settings import LorrySettings
from tests import engines as engines_module
from tests import fixtures_engine
from tests.engines import RunningEngine
from tests.gateway.admin_api import AdminApi
from tests.gateway.conftest import DemoAdapters, engine_name_of
from tests.gateway.figures import report
from tests.gateway.leaving_client import Departure, stream_then_leave
from tests.gateway.processes import GatewayProcess, metric_sum, metric_value, start_gateway
from tests.support.databases import PG_ADMIN_DSN
from tests.support.polling import loop_lag, until

pytestmark = pytest.mark.vllm

BOUND_S = 1.0
MESSAGES = [{"role": "user", "content": "Tell me about the river and the old stone house."}]
GATEWAY_ENV = {
    "LORRY_GATEWAY_HEALTH_INTERVAL_S": "0.25",
    "LORRY_GATEWAY_HEALTH_TIMEOUT_S": "1",
    "LORRY_GATEWAY_UNHEALTHY_AFTER": "2",
    "LORRY_GATEWAY_HEALTHY_AFTER": "2",
    # Not faster: vLLM renders /metrics on the event loop that streams its tokens.
    "LORRY_GATEWAY_LOAD_INTERVAL_S": "1",
    "LORRY_GATEWAY_ENGINE_MAX_REQUESTS": "2",
    "LORRY_GATEWAY_LAST_USED_FLUSH_S": "1",
}


@pytest.fixture
def backend() -> str:
    return "postgres"  # several processes share the database: the production shape


# -- engines -------------------------------------------------------------------------------------


@dataclass
class EnginePair:
    shared: RunningEngine
    extra: RunningEngine
    demo_model_dir: Path
    manifest: dict[str, Any]
    log_dir: Path
    starts: int = 1

    def get(self, label: str) -> RunningEngine:
        return self.shared if label == "shared" else self.extra

    def kill_extra(self) -> None:
        """SIGKILL the extra engine's whole process group (API server and engine core)."""
        os.killpg(self.extra.process.pid, signal.SIGKILL)

    def restart_extra(self) -> float:
        """Start the extra engine again on the same port and core; returns seconds to healthy."""
        port, core = self.extra.port, self.extra.cpu_core
        self.extra.stop(timeout=5)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engines_module, "free_port", lambda: port)
            self.extra = fixtures_engine._start(  # the suite's own engine starter
                self.demo_model_dir, self.manifest, self.log_dir, cpu_core=core, name="extra-restarted"
            )
        self.starts += 1
        assert self.extra.port == port
        return self.extra.start_seconds


@pytest.fixture(scope="module")
def engine_pair(
    vllm_engine: RunningEngine,
    demo_model_dir: Path,
    demo_manifest: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EnginePair]:
    log_dir = tmp_path_factory.mktemp("scale-out-engines")
    core = engines_module.free_core()
    extra = fixtures_engine._start(demo_model_dir, demo_manifest, log_dir, cpu_core=core, name="extra")
    pair = EnginePair(vllm_engine, extra, demo_model_dir, demo_manifest, log_dir)
    try:
        yield pair
    finally:
        report(
            "scale-out module",
            f"\n{pair.starts} engine start(s) of its own (plus the shared engine)",
        )
        pair.extra.stop()


async def engine_text(engine: RunningEngine) -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{engine.url}/metrics")
    response.raise_for_status()
    return response.text


async def finished_on(engine: RunningEngine) -> float:
    return metric_sum(await engine_text(engine), "vllm:request_success_total")


async def finished(pair: EnginePair) -> dict[str, float]:
    """Requests each engine finished, by its own ``vllm:request_success_total``."""
    texts = await asyncio.gather(engine_text(pair.shared), engine_text(pair.extra))
    return {
        label: metric_sum(text, "vllm:request_success_total")
        for label, text in zip(("shared", "extra"), texts, strict=True)
    }


async def engine_gauge(pair: EnginePair, name: str) -> dict[str, float]:
    texts = await asyncio.gather(engine_text(pair.shared), engine_text(pair.extra))
    return {label: metric_sum(text, name) for label, text in zip(("shared", "extra"), texts, strict=True)}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {label: after[label] - before[label] for label in after}


# -- the cluster: engines registered through the admin API, gateway processes ----------------------


@dataclass
class Cluster:
    api: AdminApi
    pair: EnginePair
    settings: LorrySettings
    log_dir: Path
    store: Path
    engine_ids: dict[str, str] = field(default_factory=dict)
    gateways: list[GatewayProcess] = field(default_factory=list)

    async def register(self, label: str, **fields: Any) -> str:
        engine = self.pair.get(label)
        body = {
            "name": label,
            "url": engine.url,
            "baseModel": engine.served_model_name,
            "servedModelName": engine.served_model_name,
            "adapterRoot": str(self.store),
            "maxLoras": 4,
            "maxLoraRank": 16,
            **fields,
        }
        response = await self.api.client.post("/v1/engines", json=body)
        assert response.status_code == 201, response.text
        engine_id = str(response.json()["engine"]["id"])
        self.engine_ids[label] = engine_id
        return engine_id

    async def set_engine(self, label: str, **fields: Any) -> None:
        response = await self.api.client.patch(f"/v1/engines/{self.engine_ids[label]}", json=fields)
        assert response.status_code == 200, response.text

    async def start_gateways(self, count: int = 2, **env: Any) -> list[GatewayProcess]:
        started = [
            start_gateway(f"{len(self.gateways) + i}", self.settings, self.log_dir, {**GATEWAY_ENV, **env})
            for i in range(count)
        ]
        self.gateways.extend(started)
        await asyncio.gather(*(gw.wait_ready() for gw in started))
        return started

    def preferred(self, affinity_key: str) -> str:
        """The engine (label) every gateway's rendezvous hashing puts first for ``affinity_key``."""
        return max(self.engine_ids, key=lambda label: rendezvous_score(affinity_key, self.engine_ids[label]))

    async def stop(self) -> None:
        await asyncio.gather(*(gw.stop() for gw in self.gateways))


@pytest.fixture
async def cluster(
    admin_api: AdminApi,
    engine_pair: EnginePair,
    settings: LorrySettings,
    shared_store: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Cluster]:
    made = Cluster(
        api=admin_api,
        pair=engine_pair,
        settings=settings.model_copy(update={"path_routing": True}),
        log_dir=tmp_path,
        store=shared_store,
    )
    try:
        yield made
    finally:
        await made.stop()
        for gw in made.gateways:
            assert "Traceback" not in gw.log_text(), gw.log_text()[-3000:]
            if stalls := _stalls(gw.log_text()):  # the gateway's loop watchdog spoke
                report(request.node.name, f"gateway {gw.name} event loop stalls: {stalls}")


def auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


async def chat(gw: GatewayProcess, slug: str, key: str | None, **extra: Any) -> httpx.Response:
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 4, **extra}
    async with httpx.AsyncClient(timeout=120) as client:
        return await client.post(f"{gw.base_url(slug)}/chat/completions", json=body, headers=auth(key))


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["message"]["content"]
    assert isinstance(text, str)
    return text


async def gateway_gauge(gw: GatewayProcess, name: str, **labels: str) -> float | None:
    return metric_value(await gw.metrics(), name, **labels)


def summary(samples: list[float]) -> str:
    return (
        f"p50 {statistics.median(samples) * 1000:.0f} ms, max {max(samples) * 1000:.0f} ms (n={len(samples)})"
    )


async def deployment_for_engine(
    cluster: Cluster, demo_adapters: DemoAdapters, label: str, slug: str
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A fresh alpha variant whose rendezvous order puts engine ``label`` first; (job, deployment, key)."""
    for _ in range(12):
        job = await demo_adapters.job("alpha", variant=uuid.uuid4().hex)
        digest = next(a["digest"] for a in job["adapters"] if a["kind"] == "final")
        if cluster.preferred(digest) == label:
            deployment = await cluster.api.create_deployment(slug, job_id=job["id"])
            key = await cluster.api.create_key(deployment["id"])
            return job, deployment, str(key["plaintext"])
    raise AssertionError("no variant preferred the engine")


async def adapter_homed_on_extra(
    cluster: Cluster, demo_adapters: DemoAdapters, slug: str
) -> tuple[str, str, GatewayProcess, GatewayProcess]:
    """Both engines registered, a deployment whose adapter prefers the extra engine, two gateways;
    (the adapter's name on the engines, its key, gateway A, gateway B)."""
    await cluster.register("shared")
    await cluster.register("extra")
    job, _, key = await deployment_for_engine(cluster, demo_adapters, "extra", slug)
    gw_a, gw_b = await cluster.start_gateways(2)
    return engine_name_of(job), key, gw_a, gw_b


# -- affinity and the load bound ------------------------------------------------------------------


async def test_affinity_stays_under_the_bound_and_spreads_beyond_it(
    cluster: Cluster, demo_adapters: DemoAdapters
) -> None:
    pair = cluster.pair
    name, key, gw_a, gw_b = await adapter_homed_on_extra(cluster, demo_adapters, "affine")
    home, away = "extra", "shared"
    assert (pair.get(home).load_count(name), pair.get(away).load_count(name)) == (0, 0)

    # Under the bound: every request, from either gateway, lands on the adapter's engine.
    before = await finished(pair)
    for i in range(8):
        assert content(await chat((gw_a, gw_b)[i % 2], "affine", key))
    sequential = delta(await finished(pair), before)
    assert sequential == {home: 8, away: 0}, sequential

    # The bound counts what the engine itself reports: gateway B holds two long streams on the
    # engine; gateway A, with nothing in flight itself, reads the engine's load and goes elsewhere.
    # (Valid only while B's streams still run: on a fast engine they may end early; then again.)
    for _ in range(3):
        steered = await _steered_by_engine_load(pair, gw_a, gw_b, key, home)
        if steered is not None:
            break
    assert steered is not None, "the held streams never outlived the measurement"
    seen_after, elsewhere = steered
    assert elsewhere == {home: 0, away: 1}, elsewhere

    # A burst beyond the bound spreads; each engine registered the adapter once (its own log).
    before = await finished(pair)
    burst = await asyncio.gather(
        *(
            chat((gw_a, gw_b)[i % 2], "affine", key, max_tokens=48, ignore_eos=True, stream=False)
            for i in range(12)
        )
    )
    assert all(response.status_code == 200 for response in burst), [r.text for r in burst]
    spread = delta(await finished(pair), before)
    assert spread[home] > 0 and spread[away] > 0 and sum(spread.values()) == 12, spread
    loads = {label: pair.get(label).load_count(name) for label in (home, away)}
    assert loads == {home: 1, away: 1}, loads
    report(
        "test_affinity_stays_under_the_bound_and_spreads_beyond_it",
        f"\naffinity: 8 sequential requests via 2 gateways → {sequential}; gateway A saw the engine's own "
        f"load of B's 2 streams after {seen_after * 1000:.0f} ms and sent its request {elsewhere}; "
        f"burst of 12 → {spread}; 'Loaded new LoRA adapter' lines per engine: {loads}",
    )


async def _steered_by_engine_load(
    pair: EnginePair, gw_a: GatewayProcess, gw_b: GatewayProcess, key: str, home: str
) -> tuple[float, dict[str, float]] | None:
    """Where gateway A sends a request while B holds two streams on ``home``; None if they ended."""
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=120))
        held = []  # (a dropped, half-read iterator would close its response)
        for _ in range(2):
            response = await stack.enter_async_context(
                client.stream(
                    "POST",
                    f"{gw_b.base_url('affine')}/chat/completions",
                    headers=auth(key),
                    json={"messages": MESSAGES, "max_tokens": 4000, "ignore_eos": True, "stream": True},
                )
            )
            assert response.status_code == 200
            chunks = response.aiter_raw()
            assert b"data: " in await anext(chunks)
            held.append(chunks)
        if (await engine_gauge(pair, "vllm:num_requests_running"))[home] != 2:
            return None
        try:
            seen_after = await until(
                lambda: _gauge_at_least(gw_a, "lorry_gateway_engine_load", 2, engine=home, kind="running"),
                timeout=15,
            )
        except AssertionError:
            if (await engine_gauge(pair, "vllm:num_requests_running"))[home] != 2:
                return None  # the streams ended before gateway A read the engine's load again
            raise
        before = await finished(pair)
        assert content(await chat(gw_a, "affine", key))
        elsewhere = delta(await finished(pair), before)
        still = (await engine_gauge(pair, "vllm:num_requests_running"))[home]
    # Leaving the block closed both streams: the engine aborts them.
    await until(lambda: _sum_is(engine_gauge(pair, "vllm:num_requests_running"), 0), timeout=5, interval=0.1)
    return (seen_after, elsewhere) if still == 2 else None


async def _gauge_at_least(gw: GatewayProcess, name: str, value: float, **labels: str) -> bool:
    found = await gateway_gauge(gw, name, **labels)
    return found is not None and found >= value


# -- propagation to both gateways -----------------------------------------------------------------


async def _models_status(client: httpx.AsyncClient, gw: GatewayProcess, slug: str, key: str) -> int:
    return (await client.get(f"{gw.base_url(slug)}/models", headers=auth(key))).status_code


async def _obeyed(
    gateways: list[GatewayProcess],
    started: float,
    probe: Callable[[GatewayProcess], Awaitable[bool]],
    timeout: float = 5.0,
) -> list[float]:
    """Seconds from ``started`` until ``probe`` holds on each gateway (polled independently)."""

    async def one(gw: GatewayProcess) -> float:
        while True:
            if await probe(gw):
                return time.monotonic() - started
            assert time.monotonic() - started < timeout, f"gateway {gw.name} did not obey in {timeout} s"
            await asyncio.sleep(0.005)

    return list(await asyncio.gather(*(one(gw) for gw in gateways)))


async def _obeyed_by_send_time(
    gateways: list[GatewayProcess],
    started: float,
    probe: Callable[[GatewayProcess], Awaitable[bool | None]],
    *,
    cadence_s: float = 0.05,
    outstanding: int = 10,
    timeout: float = 10.0,
) -> list[float]:
    """For probes that take a while (a generation): a new probe every ``cadence_s``; a gateway has
    obeyed by the time it was sent the first probe answered the new way (True). No probe sent
    after that one may answer the old way (False); None answers are neither."""

    async def one(gw: GatewayProcess) -> float:
        sent: dict[asyncio.Future[bool | None], float] = {}
        answers: list[tuple[float, bool | None]] = []
        pending: set[asyncio.Future[bool | None]] = set()
        first_new: float | None = None
        try:
            while first_new is None:
                assert time.monotonic() - started < timeout, f"gateway {gw.name} did not obey in {timeout} s"
                if len(pending) < outstanding:
                    probing: asyncio.Future[bool | None] = asyncio.ensure_future(probe(gw))
                    sent[probing] = time.monotonic()
                    pending.add(probing)
                done, pending = await asyncio.wait(
                    pending, timeout=cadence_s, return_when=asyncio.FIRST_COMPLETED
                )
                for finished_probe in done:
                    answers.append((sent[finished_probe], finished_probe.result()))
                new = [at for at, ok in answers if ok is True]
                first_new = min(new) if new else None
            for left in list(pending):
                answers.append((sent[left], await left))
            pending.clear()
        finally:
            for left in pending:
                left.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        first_new = min(at for at, ok in answers if ok is True)  # an earlier probe may have finished last
        stale = [at - started for at, ok in answers if ok is False and at > first_new]
        assert not stale, f"gateway {gw.name} answered the old way after obeying: {stale}"
        return first_new - started

    return list(await asyncio.gather(*(one(gw) for gw in gateways)))


async def _rounds(
    cluster: Cluster,
    gateways: list[GatewayProcess],
    deployment: dict[str, Any],
    jobs: dict[str, dict[str, Any]],
    outputs: dict[str, str],
    *,
    repeats: int,
    api_calls: list[float],
) -> dict[str, list[float]]:
    """Seconds from each change's commit (its admin call returned) until each gateway obeys."""
    api = cluster.api
    slug = str(deployment["slug"])
    times: dict[str, list[float]] = {"revoke": [], "disable": [], "re-target": []}

    async def committed(call: Awaitable[Any]) -> float:
        started = time.monotonic()
        await call
        done = time.monotonic()
        api_calls.append(done - started)
        return done

    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(repeats):
            key = await api.create_key(deployment["id"])
            plaintext = str(key["plaintext"])
            # The key is in both gateways' caches.
            await _obeyed(gateways, time.monotonic(), models_answer(client, slug, plaintext, 200))
            done = await committed(api.revoke_key(deployment["id"], str(key["id"])))
            times["revoke"] += await _obeyed(gateways, done, models_answer(client, slug, plaintext, 401))

        key = await api.create_key(deployment["id"])
        plaintext = str(key["plaintext"])
        for _ in range(repeats):
            done = await committed(api.patch_deployment(deployment["id"], enabled=False))
            times["disable"] += await _obeyed(gateways, done, models_answer(client, slug, plaintext, 404))
            await api.patch_deployment(deployment["id"], enabled=True)
            await _obeyed(gateways, time.monotonic(), models_answer(client, slug, plaintext, 200))

        def answers(new: str, old: str) -> Callable[[GatewayProcess], Awaitable[bool | None]]:
            """True: the new adapter's answer; False: the old one's; None: neither (batch-dependent
            bf16 numerics on CPU can change a greedy answer) or a transport hiccup."""

            async def probe(gw: GatewayProcess) -> bool | None:
                try:
                    response = await client.post(
                        f"{gw.base_url(slug)}/chat/completions",
                        headers=auth(plaintext),
                        json={"messages": MESSAGES, "temperature": 0, "max_tokens": 8, "min_tokens": 8},
                    )
                except httpx.TransportError:
                    return None
                text = content(response)
                return True if text == new else False if text == old else None

            return probe

        for target, previous in [("beta", "alpha"), ("alpha", "beta")] * max(1, repeats // 2):
            done = await committed(api.retarget(deployment["id"], jobs[target]["id"]))
            times["re-target"] += await _obeyed_by_send_time(
                gateways, done, answers(outputs[target], outputs[previous])
            )
    return times


def models_answer(
    client: httpx.AsyncClient, slug: str, key: str, expected: int
) -> Callable[[GatewayProcess], Awaitable[bool]]:
    """A probe: does ``GET /v1/models`` with ``key`` answer ``expected`` on a gateway?"""

    async def probe(gw: GatewayProcess) -> bool:
        return await _models_status(client, gw, slug, key) == expected

    return probe


async def test_changes_reach_both_gateways_within_a_second(
    cluster: Cluster, demo_adapters: DemoAdapters
) -> None:
    await cluster.register("shared")
    await cluster.register("extra")
    jobs = {"alpha": await demo_adapters.job("alpha"), "beta": await demo_adapters.job("beta")}
    deployment = await cluster.api.create_deployment("moving", job_id=jobs["alpha"]["id"])
    reference = await cluster.api.create_deployment("beta-ref", job_id=jobs["beta"]["id"], auth_mode="none")
    assert reference["slug"] == "beta-ref"
    gateways = await cluster.start_gateways(2)
    key = str((await cluster.api.create_key(deployment["id"]))["plaintext"])
    outputs = {
        "alpha": content(await chat(gateways[0], "moving", key, max_tokens=8, min_tokens=8)),
        "beta": content(await chat(gateways[0], "beta-ref", None, max_tokens=8, min_tokens=8)),
    }
    assert outputs["alpha"] != outputs["beta"], outputs  # the two adapters answer differently
    for gw in gateways:  # both gateways have both adapters registered wherever they route them
        assert content(await chat(gw, "moving", key, max_tokens=8, min_tokens=8)) == outputs["alpha"]
        assert content(await chat(gw, "beta-ref", None, max_tokens=8, min_tokens=8)) == outputs["beta"]

    api_calls: list[float] = []
    normal = await _rounds(cluster, gateways, deployment, jobs, outputs, repeats=5, api_calls=api_calls)

    database = cluster.settings.database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND query ILIKE 'LISTEN%'",
            database,
        )
        assert killed == 2  # one LISTEN connection per gateway
        after_kill = await _rounds(
            cluster, gateways, deployment, jobs, outputs, repeats=3, api_calls=api_calls
        )
        relisten = await until(lambda: _listening(admin, database, 2), timeout=15, interval=0.05)
    finally:
        await admin.close()

    lines = []
    for phase, times in (("LISTEN", normal), ("after pg_terminate_backend", after_kill)):
        for kind, samples in times.items():
            lines.append(f"  {phase:>26} {kind:>9}: {summary(samples)}")
    report(
        "test_changes_reach_both_gateways_within_a_second",
        "\nboth gateways obey (from the commit, i.e. the admin call's answer, to the first obeying "
        f"answer; admin calls took {summary(api_calls)}):\n" + "\n".join(lines),
    )
    report(
        "test_changes_reach_both_gateways_within_a_second",
        f"  both gateways LISTEN again {relisten:.1f} s after the rounds",
    )
    for times in (normal, after_kill):
        for kind, samples in times.items():
            assert max(samples) < BOUND_S, (kind, samples)


async def _listening(admin: asyncpg.Connection, database: str, expected: int) -> bool:
    count = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND query ILIKE 'LISTEN%'", database
    )
    return bool(count == expected)


# -- engines through the admin API ----------------------------------------------------------------


async def test_engine_added_gets_traffic_and_disabled_gets_none(cluster: Cluster) -> None:
    pair = cluster.pair
    await cluster.register("shared")
    gateways = await cluster.start_gateways(2)

    started = time.monotonic()
    extra_id = await cluster.register("extra")
    added = await _obeyed(
        gateways, started, lambda gw: _gauge_equals(gw, "lorry_gateway_engine_up", 1, engine="extra")
    )
    # A base-model deployment whose rendezvous order puts the new engine first.
    slug = next(s for s in (f"base-{i}" for i in range(100)) if cluster.preferred(f"slug:{s}") == "extra")
    assert extra_id in cluster.engine_ids.values()
    await cluster.api.create_deployment(slug, base_model=pair.shared.served_model_name, auth_mode="none")
    async with httpx.AsyncClient(timeout=10) as client:  # the deployment reaches both gateways
        await _obeyed(gateways, time.monotonic(), models_answer(client, slug, "", 200))
    before = await finished(pair)
    for i in range(4):
        assert content(await chat(gateways[i % 2], slug, None))
    assert delta(await finished(pair), before) == {"extra": 4, "shared": 0}

    disabled: list[float] = []
    enabled: list[float] = []
    for _ in range(3):
        started = time.monotonic()
        await cluster.set_engine("extra", enabled=False)
        disabled += await _obeyed(
            gateways, started, lambda gw: _gauge_equals(gw, "lorry_gateway_engine_up", 0, engine="extra")
        )
        await asyncio.sleep(max(0.0, started + BOUND_S - time.monotonic()))
        before = await finished(pair)
        for i in range(4):
            assert content(await chat(gateways[i % 2], slug, None))
        after = delta(await finished(pair), before)
        assert after == {"extra": 0, "shared": 4}, after  # one second on: no request reaches it
        started = time.monotonic()
        await cluster.set_engine("extra", enabled=True)
        enabled += await _obeyed(
            gateways, started, lambda gw: _gauge_equals(gw, "lorry_gateway_engine_up", 1, engine="extra")
        )
    before = await finished(pair)
    assert content(await chat(gateways[0], slug, None))
    assert delta(await finished(pair), before) == {"extra": 1, "shared": 0}  # traffic is back

    started = time.monotonic()
    deleted = await cluster.api.client.delete(f"/v1/engines/{extra_id}")
    assert deleted.status_code == 204
    removed = await _obeyed(
        gateways, started, lambda gw: _gauge_equals(gw, "lorry_gateway_engine_up", None, engine="extra")
    )
    report(
        "test_engine_added_gets_traffic_and_disabled_gets_none",
        f"\nengine added via the admin API routable on both gateways: {summary(added)}; "
        f"disabled: {summary(disabled)}; re-enabled: {summary(enabled)}; deleted: {summary(removed)}",
    )
    for samples in (added, disabled, enabled, removed):
        assert max(samples) < BOUND_S


async def _gauge_equals(gw: GatewayProcess, name: str, value: float | None, **labels: str) -> bool:
    return await gateway_gauge(gw, name, **labels) == value


# -- client disconnect ----------------------------------------------------------------------------


@dataclass
class Disconnect:
    departure: Departure
    generated: float  # the engine's own count for the request, after it stopped
    stopped_s: float  # from the client leaving to vllm:num_requests_running back at 0

    @property
    def beyond_received(self) -> float:
        return self.generated - self.departure.received


async def _generated(engine: RunningEngine) -> float:
    return metric_sum(await engine_text(engine), "vllm:generation_tokens_total")


async def _disconnect_once(gw: GatewayProcess, engine: RunningEngine, tokens: int) -> Disconnect:
    before = await _generated(engine)
    body = {"messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True, "stream": True, "logprobs": True}
    url = f"{gw.base_url('long-gen')}/chat/completions"
    departure = await asyncio.to_thread(stream_then_leave, url, body, tokens)
    # Polled gently: vLLM renders /metrics on the event loop that must notice the disconnect.
    await until(lambda: _idle(engine), timeout=5, interval=0.1)
    stopped = time.monotonic() - departure.left_at
    await asyncio.sleep(1.0)  # anything still generating would show now
    return Disconnect(departure, await _generated(engine) - before, stopped)


async def test_client_disconnect_stops_generation(cluster: Cluster, demo_adapters: DemoAdapters) -> None:
    pair = cluster.pair
    await cluster.register("shared")
    # An adapter deployment (Lorry's usual case): LoRA also slows the tiny model's engine core to
    # a pace its API server can stream at (unslowed, the core can outrun the stream severalfold).
    job = await demo_adapters.job("alpha")
    await cluster.api.create_deployment("long-gen", job_id=job["id"], auth_mode="none")
    # One engine, no load to balance: the gateway reads the engine's /metrics rarely here (vLLM
    # renders that page on the event loop that streams the tokens).
    (gw,) = await cluster.start_gateways(1, LORRY_GATEWAY_LOAD_INTERVAL_S=10, LORRY_LOG_LEVEL="debug")
    # Three departures, each judged: the engine may generate at most 20 tokens beyond what the
    # client received (what had reached its socket counts: see leaving_client), and must stop
    # within 1 s. The gateway's own part, closing the engine request, is read from its log.
    for attempt in range(3):
        with pair.shared.api_server_first():
            result = await _disconnect_once(gw, pair.shared, 200)
        departure = result.departure
        closes = _close_times_ms(gw)  # the gateway's own log: one line per departed client
        report(
            "test_client_disconnect_stops_generation",
            f"client disconnect after {departure.received} tokens ({departure.waiting} of them already in "
            f"its socket when it left; streamed at {departure.rate:.0f} tokens/s): the gateway closed the "
            f"engine request {closes[-1]:.1f} ms after the client left; the engine generated "
            f"{result.generated:.0f} tokens ({result.beyond_received:.0f} beyond those received) and was "
            f"idle again {result.stopped_s * 1000:.0f} ms after the client left",
        )
        assert len(closes) == attempt + 1 and closes[-1] < 250, _closing_lines(gw)
        assert departure.received <= result.generated <= departure.received + 20, result
        assert result.stopped_s < BOUND_S, result


def _close_times_ms(gw: GatewayProcess) -> list[float]:
    return [float(found) for found in re.findall(r"engine request closed ([0-9.]+) ms later", gw.log_text())]


def _closing_lines(gw: GatewayProcess) -> str:
    """What the gateway logged about closing engine requests (at debug level), for a failure."""
    return "\n".join(line for line in gw.log_text().splitlines() if "client left" in line)


async def _idle(engine: RunningEngine) -> bool:
    return metric_sum(await engine_text(engine), "vllm:num_requests_running") == 0


async def _sum_is(values: Awaitable[dict[str, float]], expected: float) -> bool:
    return sum((await values).values()) == expected


# -- SIGTERM drain ----------------------------------------------------------------------------------


@dataclass
class StreamRecord:
    index: int
    max_tokens: int
    first: asyncio.Event = field(default_factory=asyncio.Event)
    events: list[bytes] = field(default_factory=list)
    ended_at: float = 0.0
    failure: str | None = None

    @property
    def outcome(self) -> str:
        if self.events and self.events[-1] == b"data: [DONE]":
            return "done"
        if self.events and self.events[-1].startswith(b'data: {"error"'):
            return "error:" + str(orjson.loads(self.events[-1][6:])["error"]["code"])
        return f"cut ({self.failure})"


async def _record_stream(client: httpx.AsyncClient, gw: GatewayProcess, record: StreamRecord) -> None:
    body = {"messages": MESSAGES, "max_tokens": record.max_tokens, "ignore_eos": True, "stream": True}
    parts: list[bytes] = []  # joined once at the end: the client must keep up with the engines
    try:
        async with client.stream("POST", f"{gw.base_url('drain')}/chat/completions", json=body) as response:
            if response.status_code != 200:
                record.failure = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return
            async for chunk in response.aiter_raw():
                parts.append(chunk)
                record.first.set()
    except httpx.HTTPError as exc:
        record.failure = type(exc).__name__
    finally:
        record.events = [event for event in b"".join(parts).split(b"\n\n") if event]
        record.ended_at = time.monotonic()
        record.first.set()


async def test_sigterm_drains_streams_then_ends_them_with_an_error_event(
    cluster: Cluster, demo_adapters: DemoAdapters
) -> None:
    pair = cluster.pair
    await cluster.register("shared")  # one engine: the other core is left to the gateway and client
    # An adapter deployment: LoRA slows the tiny model enough that the long streams cannot finish
    # generating before the deadline (unslowed, 4000 tokens can take under 4 s).
    job = await demo_adapters.job("beta")
    await cluster.api.create_deployment("drain", job_id=job["id"], auth_mode="none")
    deadline_s, grace_s = 4.0, 10.0
    cluster.settings = cluster.settings.model_copy(update={"shutdown_deadline_s": deadline_s})
    # The grace after the deadline (before uvicorn cancels what is left) is generous here: on a
    # busy machine the error events may queue behind tokens the client has not read yet.
    (gw,) = await cluster.start_gateways(
        1, LORRY_GATEWAY_SHUTDOWN_GRACE_S=grace_s, LORRY_GATEWAY_LOAD_INTERVAL_S=10
    )
    # Eighteen streams short enough to finish inside the deadline, two far too long for it (few
    # long ones: the machine's one spare core must relay them all without falling behind).
    records = [StreamRecord(i, 20 * (i + 1) if i < 18 else 4000) for i in range(20)]
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(60, connect=5), limits=httpx.Limits(max_connections=40)
    ) as client:
        tasks = [asyncio.create_task(_record_stream(client, gw, record)) for record in records]
        await asyncio.wait_for(asyncio.gather(*(record.first.wait() for record in records)), timeout=60)
        assert not [r.failure for r in records if r.failure], [r.failure for r in records]
        open_at_signal = [record for record in records if not record.ended_at]
        signalled = time.monotonic()
        gw.terminate()

        # While draining: not ready, and new requests are refused. (A probe that gets no answer
        # in 5 s is counted and sent again; the gateway's loop watchdog and this test's own loop
        # lag tell whose stall it was.)
        probe_timeouts: list[float] = []
        async with httpx.AsyncClient(timeout=5) as probe, loop_lag() as test_loop:

            async def not_ready() -> bool:
                try:
                    ready = await probe.get(f"{gw.ops_url}/readyz")
                except httpx.TimeoutException:
                    probe_timeouts.append(time.monotonic() - signalled)
                    return False
                return ready.status_code == 503 and ready.json()["status"] == "draining"

            try:
                unready_after = await until(not_ready, timeout=30)
            except AssertionError:
                raise AssertionError(
                    f"/readyz never answered 503 draining; probes timed out at {probe_timeouts} s; "
                    f"this test's loop lagged up to {test_loop.worst:.2f} s; "
                    f"gateway alive: {gw.alive()}; its log ends:\n{gw.log_text()[-4000:]}"
                ) from None
            refused = await _late_request(probe, gw)
        await asyncio.gather(*tasks)
    exit_code = await gw.wait_exit(timeout=deadline_s + grace_s + 10)
    exited = time.monotonic() - signalled
    outcomes = [record.outcome for record in records]
    completed_in_drain = [r for r in open_at_signal if r.outcome == "done"]
    errors = [outcome for outcome in outcomes if outcome.startswith("error")]
    last_end = max(record.ended_at for record in records) - signalled
    running = await until(
        lambda: _sum_is(engine_gauge(pair, "vllm:num_requests_running"), 0), timeout=5, interval=0.1
    )
    drain = _drain_log(gw.log_text())
    report(
        "test_sigterm_drains_streams_then_ends_them_with_an_error_event",
        f"\nSIGTERM with {len(open_at_signal)} of 20 streams open (deadline {deadline_s} s): "
        f"{len(completed_in_drain)} completed during the drain, {len(errors)} ended with an error event "
        f"({sorted(set(errors))}); the gateway ended the rest "
        f"{drain.get('deadline', 0) - drain.get('stopping', 0):.2f} s after the signal (its log); "
        f"the client saw the last stream end {last_end:.2f} s after it; "
        f"new request: {refused}; /readyz 503 after {unready_after * 1000:.0f} ms"
        f"{f' (probes unanswered in 5 s at {probe_timeouts} s)' if probe_timeouts else ''}; "
        f"gateway loop stalls: {_stalls(gw.log_text()) or 'none'}; "
        f"this test's loop lagged up to {test_loop.worst * 1000:.0f} ms; "
        f"process exited ({exit_code}) after {exited:.2f} s; "
        f"engines idle {running * 1000:.0f} ms later",
    )
    assert all(outcome == "done" or outcome == "error:shutting_down" for outcome in outcomes), outcomes
    assert completed_in_drain, outcomes
    assert errors
    for record in records:  # an error event only at the deadline or after
        if record.outcome != "done":
            assert record.ended_at - signalled >= deadline_s, record.outcome
    # The gateway ended what was left at the deadline, by its own log. (When the client gets the
    # error event depends on the client too: it comes after whatever is already queued for it.)
    assert set(drain) == {"stopping", "deadline", "drained"}, gw.log_text()[-3000:]
    # (a loop busy relaying twenty streams may run the deadline timer a little late)
    assert deadline_s <= drain["deadline"] - drain["stopping"] < deadline_s + 1.0, drain
    assert drain["drained"] - drain["deadline"] < 1.0, drain
    assert exit_code == 0


async def _late_request(probe: httpx.AsyncClient, gw: GatewayProcess) -> str:
    """A request sent during the drain: answered 503 ``shutting_down``, or never accepted (the
    listening socket is closed; one that raced the close is reset by the kernel unanswered)."""
    try:
        late = await probe.post(
            f"{gw.base_url('drain')}/chat/completions", json={"messages": MESSAGES, "max_tokens": 4}
        )
    except httpx.ConnectError:
        return "connection refused"
    except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
        return f"connection closed unanswered ({type(exc).__name__})"
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down", late.text
    return "503 shutting_down"


def _stalls(log: str) -> list[str]:
    """The watchdog's lines, each report with the innermost frames of the stack it logged (the
    call the loop was in: the gateway's own code, or a plain system call in a process kept off
    the CPU)."""
    lines = log.splitlines()
    found: list[str] = []
    for index, line in enumerate(lines):
        if STALL_MARKER not in line:
            continue
        stack: list[str] = []
        for following in lines[index + 1 :]:
            if not following.startswith(" "):
                break
            stack.append(following.strip())
        found.append(" | ".join([line[:200], *stack[-4:]]))
    return found


DRAIN_LINES = {
    "stopping": "lorry.gateway.server: stopping: draining",
    "deadline": "lorry.gateway: shutdown deadline reached",
    "drained": "lorry.gateway: drained: no request in flight",
}


def _drain_log(text: str) -> dict[str, float]:
    """When (seconds, the log's own clock) the gateway logged each step of its drain."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        for step, marker in DRAIN_LINES.items():
            if marker in line and step not in found:
                stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                found[step] = stamp.timestamp()
    return found


# -- an engine dies mid-stream and comes back ---------------------------------------------------------


async def test_engine_killed_mid_stream_then_restarted(cluster: Cluster, demo_adapters: DemoAdapters) -> None:
    pair = cluster.pair
    name, key, gw_a, gw_b = await adapter_homed_on_extra(cluster, demo_adapters, "survivor")
    before = await finished(pair)
    for gw in (gw_a, gw_b):
        assert content(await chat(gw, "survivor", key))
    assert delta(await finished(pair), before) == {"extra": 2, "shared": 0}
    assert pair.extra.load_count(name) == 1 and pair.shared.load_count(name) == 0

    sdk = openai.AsyncOpenAI(base_url=gw_a.base_url("survivor"), api_key=key, max_retries=0)
    stream = await sdk.chat.completions.create(
        model="anything",
        messages=[{"role": "user", "content": MESSAGES[0]["content"]}],
        max_tokens=4000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = 0
    killed = 0.0
    with pytest.raises(openai.APIError) as raised:
        async for _chunk in stream:
            chunks += 1
            if chunks == 5:  # early: a fast engine may otherwise have sent everything already
                pair.kill_extra()
                killed = time.monotonic()
    # (chunks generated before the kill but not yet read still arrive before the error event)
    raised_after = time.monotonic() - killed
    await sdk.close()
    assert chunks < 4000

    # New requests go to the other engine (the first ones may fail over inside the gateway), while
    # both gateways take the dead engine out of rotation.
    before_shared = await finished_on(pair.shared)
    latencies: list[float] = []

    async def requests() -> None:
        for i in range(6):
            started = time.monotonic()
            assert content(await chat((gw_b, gw_a)[i % 2], "survivor", key))
            latencies.append(time.monotonic() - started)

    ejected, _ = await asyncio.gather(
        _obeyed(
            [gw_a, gw_b], killed, lambda gw: _gauge_equals(gw, "lorry_gateway_engine_up", 0, engine="extra")
        ),
        requests(),
    )
    assert await finished_on(pair.shared) - before_shared == 6
    assert pair.shared.load_count(name) == 1

    restart_s = await asyncio.to_thread(pair.restart_extra)
    healthy = time.monotonic()
    readmitted = await _obeyed(
        [gw_a, gw_b], healthy, lambda gw: _gauge_equals(gw, "lorry_gateway_engine_up", 1, engine="extra")
    )
    assert pair.extra.load_count(name) == 0  # a new process: it knows no adapter
    # The adapter now lives on the shared engine; a burst beyond the bound spreads to the restarted
    # engine, which registers it again on demand — once.
    before = await finished(pair)
    burst = await asyncio.gather(
        *(chat((gw_a, gw_b)[i % 2], "survivor", key, max_tokens=48, ignore_eos=True) for i in range(12))
    )
    assert all(response.status_code == 200 for response in burst), [r.text for r in burst]
    spread = delta(await finished(pair), before)
    assert spread["extra"] > 0, spread
    assert pair.extra.load_count(name) == 1
    report(
        "test_engine_killed_mid_stream_then_restarted",
        f"\nengine killed after 5 streamed chunks: the SDK raised {type(raised.value).__name__} "
        f"{raised_after * 1000:.0f} ms later, after {chunks} chunks in all; next 6 requests served by "
        f"the other engine "
        f"(latency {summary(latencies)}); both gateways ejected it: {summary(ejected)} after the kill; "
        f"restart took {restart_s:.1f} s; re-admitted by both gateways {summary(readmitted)} after it was "
        f"healthy; burst of 12 afterwards → {spread}, adapter registered again once on the restarted engine",
    )
