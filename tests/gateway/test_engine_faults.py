"""Engine faults a real vLLM cannot produce on demand, with fault-injecting stand-ins (DESIGN §7, §8).

- a stall before the first byte is retried on another engine; a stall or a malformed event after
  it ends the stream with an error event and is never retried;
- active health checks eject and re-admit; a refused connection ejects at once;
- engine DNS names expand to one engine per address, re-resolved while running;
- the shutdown deadline ends streams with an error event and answers waiting requests 503;
- engines created, changed, disabled and deleted through the admin API reach a running gateway.

The same behaviours against real engines and real gateway processes: ``test_scale_out.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.app import Gateway
from gateway.balancer import rendezvous_score
from gateway.options import GatewayOptions
from tests.engines import free_port
from tests.gateway.conftest import FAST_OPTIONS, MakeGateway, http_server, ops_client
from tests.gateway.figures import report
from tests.gateway.processes import metric_value
from tests.gateway.seed import BASE_MODEL, Seed
from tests.gateway.standin import StandInEngine, running_standin
from tests.support.polling import until

FIRST_BYTE_S = 0.6
IDLE_S = 0.6


@pytest.fixture
def backend() -> str:
    """Engine faults do not depend on the database: SQLite here, both for the admin-API test."""
    return "sqlite"


HEALTH = dataclasses.replace(
    FAST_OPTIONS, health_interval_s=0.1, health_timeout_s=0.5, unhealthy_after=3, healthy_after=2
)


def static_engine(name: str, url: str) -> dict[str, Any]:
    return {"name": name, "url": url, "baseModel": BASE_MODEL}


def slug_preferring(gw: Gateway, engine_name: str, prefix: str) -> str:
    """A deployment slug whose rendezvous order puts ``engine_name`` first."""
    keys = {state.name: state.key for state in gw.pool.states()}
    assert engine_name in keys, keys
    for i in range(200):
        slug = f"{prefix}-{i}"
        best = max(keys, key=lambda name: rendezvous_score(f"slug:{slug}", keys[name]))
        if best == engine_name:
            return slug
    raise AssertionError("no slug found")


async def open_deployment(seed: Seed, gw: Gateway, slug: str) -> None:
    scope = await seed.default_scope()
    await seed.deployment(scope, slug, auth_mode="none")
    await gw.follower.sync_now()


def body(content: str = "hi", *, stream: bool = True) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "stream": stream}


def parse_events(raw: bytes) -> list[bytes]:
    return [event for event in raw.split(b"\n\n") if event]


def error_of(event: bytes) -> dict[str, Any]:
    assert event.startswith(b"data: "), event
    error: dict[str, Any] = orjson.loads(event[len(b"data: ") :])["error"]
    return error


@pytest.fixture
async def two_standins() -> AsyncIterator[tuple[StandInEngine, StandInEngine, str, str]]:
    a, b = StandInEngine("a"), StandInEngine("b")
    async with running_standin(a) as url_a, running_standin(b) as url_b:
        yield a, b, url_a, url_b


async def two_engine_gateway(
    make_gateway: MakeGateway, urls: tuple[str, str], options: GatewayOptions = HEALTH, **update: Any
) -> Gateway:
    return await make_gateway(
        options=options,
        update={
            "path_routing": True,
            "engines": [static_engine("a", urls[0]), static_engine("b", urls[1])],
            "upstream_first_byte_timeout_s": FIRST_BYTE_S,
            "upstream_idle_timeout_s": IDLE_S,
            **update,
        },
    )


# -- before and after the first byte ------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "stream"), [("stall_headers", True), ("stall_headers", False), ("stall_first_event", True)]
)
async def test_stall_before_first_byte_is_retried_on_another_engine(
    make_gateway: MakeGateway,
    seed: Seed,
    two_standins: tuple[StandInEngine, StandInEngine, str, str],
    mode: str,
    stream: bool,
) -> None:
    a, b, url_a, url_b = two_standins
    gw = await two_engine_gateway(make_gateway, (url_a, url_b))
    slug = slug_preferring(gw, "a", "stall")
    await open_deployment(seed, gw, slug)
    a.mode = mode
    async with http_server(gw.app) as url, httpx.AsyncClient(timeout=30) as client:
        started = time.monotonic()
        response = await client.post(f"{url}/d/{slug}/v1/chat/completions", json=body(stream=stream))
        elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    if stream:
        events = parse_events(response.content)
        assert events[-1] == b"data: [DONE]" and b"from b" in response.content
    else:
        assert response.json()["choices"][0]["message"]["content"] == "from b"
    assert (len(a.requests), len(b.requests)) == (1, 1)
    report(
        "test_stall_before_first_byte_is_retried_on_another_engine",
        f"\n{mode} (stream={stream}): answered by the other engine after {elapsed * 1000:.0f} ms",
    )
    assert FIRST_BYTE_S <= elapsed < FIRST_BYTE_S + 1.5
    state = gw.pool.get("static:a")
    assert state is not None and state.healthy  # slow is not dead: a stall does not eject


async def test_both_engines_stalled_is_a_timeout(
    make_gateway: MakeGateway, seed: Seed, two_standins: tuple[StandInEngine, StandInEngine, str, str]
) -> None:
    a, b, url_a, url_b = two_standins
    gw = await two_engine_gateway(make_gateway, (url_a, url_b))
    await open_deployment(seed, gw, "both-stalled")
    a.mode = b.mode = "stall_headers"
    async with http_server(gw.app) as url, httpx.AsyncClient(timeout=30) as client:
        started = time.monotonic()
        response = await client.post(f"{url}/d/both-stalled/v1/chat/completions", json=body())
        elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert (len(a.requests), len(b.requests)) == (1, 1)  # max_attempts = 2
    assert 2 * FIRST_BYTE_S <= elapsed < 2 * FIRST_BYTE_S + 1.5


@pytest.mark.parametrize(
    ("mode", "code"), [("stall_mid", "upstream_timeout"), ("malformed", "upstream_error")]
)
async def test_fault_after_first_byte_ends_with_error_event_and_is_not_retried(
    make_gateway: MakeGateway,
    seed: Seed,
    two_standins: tuple[StandInEngine, StandInEngine, str, str],
    mode: str,
    code: str,
) -> None:
    a, b, url_a, url_b = two_standins
    gw = await two_engine_gateway(make_gateway, (url_a, url_b))
    slug = slug_preferring(gw, "a", "mid")
    await open_deployment(seed, gw, slug)
    a.mode = mode
    async with http_server(gw.app) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            started = time.monotonic()
            response = await client.post(f"{url}/d/{slug}/v1/chat/completions", json=body())
            elapsed = time.monotonic() - started
        assert response.status_code == 200
        events = parse_events(response.content)
        assert b"from a" in events[1]
        error = error_of(events[-1])
        assert error["code"] == code and error["type"] == "server_error"
        assert b"[DONE]" not in response.content
        await until(lambda: a.cancelled >= 1, timeout=2)  # the engine request was closed
        limit = IDLE_S + 1.0 if mode == "stall_mid" else 1.0
        assert elapsed < limit
        # The openai SDK raises on such a stream, after the content it already received.
        sdk = openai.AsyncOpenAI(base_url=f"{url}/d/{slug}/v1", api_key="unused", max_retries=0)
        received: list[str] = []
        with pytest.raises(openai.APIError):
            stream = await sdk.chat.completions.create(
                model="x", messages=[{"role": "user", "content": "again"}], stream=True
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    received.append(chunk.choices[0].delta.content)
        await sdk.close()
    assert received == ["from a"]
    assert len(b.requests) == 0  # never retried after the first byte
    report(
        "test_fault_after_first_byte_ends_with_error_event_and_is_not_retried",
        f"\n{mode}: error event {code} after {elapsed * 1000:.0f} ms; other engine asked 0 times",
    )


# -- health --------------------------------------------------------------------------------------


async def test_active_health_checks_eject_and_readmit(
    make_gateway: MakeGateway, seed: Seed, two_standins: tuple[StandInEngine, StandInEngine, str, str]
) -> None:
    a, _, url_a, url_b = two_standins
    gw = await two_engine_gateway(make_gateway, (url_a, url_b))
    slug = slug_preferring(gw, "a", "health")
    await open_deployment(seed, gw, slug)
    state = gw.pool.get("static:a")
    assert state is not None

    async def ask() -> str:
        async with http_server(gw.app) as url, httpx.AsyncClient(timeout=10) as client:
            response = await client.post(f"{url}/d/{slug}/v1/chat/completions", json=body(stream=False))
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])

    assert await ask() == "from a"
    a.health_status = 503
    checks = a.health_checks
    ejected_after = await until(lambda: not state.healthy, timeout=3)
    failed_checks = a.health_checks - checks
    assert failed_checks >= 3  # unhealthy_after
    assert [await ask() for _ in range(3)] == ["from b"] * 3
    async with ops_client(gw) as ops:
        text = (await ops.get("/metrics")).text
    assert metric_value(text, "lorry_gateway_engine_up", engine="a") == 0
    assert metric_value(text, "lorry_gateway_engine_ejections_total", engine="a") == 1

    a.health_status = 200
    listings = a.model_listings
    checks = a.health_checks
    readmitted_after = await until(lambda: state.healthy, timeout=3)
    assert a.health_checks - checks >= 2  # healthy_after
    await until(lambda: a.model_listings > listings, timeout=2)  # what it registered is read again
    assert await ask() == "from a"
    report(
        "test_active_health_checks_eject_and_readmit",
        f"\nejected {ejected_after * 1000:.0f} ms after /health turned 503 ({failed_checks} checks); "
        f"re-admitted {readmitted_after * 1000:.0f} ms after it recovered",
    )


async def test_slow_health_checks_do_not_eject_an_engine_that_is_streaming(
    make_gateway: MakeGateway, seed: Seed, two_standins: tuple[StandInEngine, StandInEngine, str, str]
) -> None:
    a, _, url_a, url_b = two_standins
    a.long_chunks, a.chunk_interval_s = 50, 0.05  # a 2.5 s stream
    gw = await two_engine_gateway(make_gateway, (url_a, url_b))
    slug = slug_preferring(gw, "a", "busy")
    await open_deployment(seed, gw, slug)
    state = gw.pool.get("static:a")
    assert state is not None
    a.health_stalls = True  # every check now times out (health_timeout_s 0.5 s)
    async with http_server(gw.app) as url, httpx.AsyncClient(timeout=10) as client:
        response = await client.post(f"{url}/d/{slug}/v1/chat/completions", json=body("mode:long"))
    assert response.status_code == 200 and parse_events(response.content)[-1] == b"data: [DONE]"
    assert b"from a" in response.content
    assert state.healthy and state.ejections == 0  # 2.5 s of timed-out checks while it answered
    ejected_after = await until(lambda: not state.healthy, timeout=5)  # silent and slow: ejected
    a.health_stalls = False
    a.release.set()
    report(
        "test_slow_health_checks_do_not_eject_an_engine_that_is_streaming",
        f"\n/health timing out: kept while streaming (2.5 s); ejected {ejected_after * 1000:.0f} ms "
        "after the stream ended",
    )


async def test_refused_connection_ejects_at_once(
    make_gateway: MakeGateway, seed: Seed, two_standins: tuple[StandInEngine, StandInEngine, str, str]
) -> None:
    _, b, _, url_b = two_standins
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    slow_checks = dataclasses.replace(HEALTH, health_interval_s=60.0)  # only the passive check acts
    gw = await make_gateway(
        options=slow_checks,
        update={
            "path_routing": True,
            "engines": [static_engine("dead", dead_url), static_engine("b", url_b)],
        },
    )
    slug = slug_preferring(gw, "dead", "refused")
    await open_deployment(seed, gw, slug)
    dead = gw.pool.get("static:dead")
    assert dead is not None and dead.healthy  # one failed probe at start is below the threshold
    async with http_server(gw.app) as url, httpx.AsyncClient(timeout=10) as client:
        first = await client.post(f"{url}/d/{slug}/v1/chat/completions", json=body(stream=False))
        assert first.status_code == 200 and first.json()["choices"][0]["message"]["content"] == "from b"
        assert not dead.healthy and dead.ejections == 1
        started = time.monotonic()
        second = await client.post(f"{url}/d/{slug}/v1/chat/completions", json=body(stream=False))
        assert second.status_code == 200
    assert len(b.requests) == 2 and dead.ejections == 1
    elapsed_ms = (time.monotonic() - started) * 1000
    report(
        "test_refused_connection_ejects_at_once",
        f"\nrefused connection: ejected on first use; the next request answered in {elapsed_ms:.0f} ms",
    )


# -- DNS -----------------------------------------------------------------------------------------


async def test_dns_name_expands_to_one_engine_per_address(make_gateway: MakeGateway, seed: Seed) -> None:
    port = free_port()
    first, second = StandInEngine("first"), StandInEngine("second")
    answers = {"engines.test": ["127.0.0.1", "127.0.0.2"]}
    on_loop_thread: list[bool] = []

    def resolver(host: str, _port: int) -> list[str]:
        on_loop_thread.append(threading.current_thread() is threading.main_thread())
        return list(answers[host])

    options = dataclasses.replace(HEALTH, resolver=resolver, dns_refresh_s=0.2)
    async with running_standin(first, "127.0.0.1", port), running_standin(second, "127.0.0.2", port):
        gw = await make_gateway(
            options=options,
            update={"path_routing": True, "engines": [static_engine("pool", f"http://engines.test:{port}")]},
        )
        assert sorted(state.name for state in gw.pool.states()) == ["pool@127.0.0.1", "pool@127.0.0.2"]
        slug_1 = slug_preferring(gw, "pool@127.0.0.1", "dns")
        slug_2 = slug_preferring(gw, "pool@127.0.0.2", "dns")
        await open_deployment(seed, gw, slug_1)
        await open_deployment(seed, gw, slug_2)

        async def ask(slug: str) -> str:
            async with http_server(gw.app) as url, httpx.AsyncClient(timeout=10) as client:
                response = await client.post(f"{url}/d/{slug}/v1/chat/completions", json=body(stream=False))
            assert response.status_code == 200, response.text
            return str(response.json()["choices"][0]["message"]["content"])

        assert (await ask(slug_1), await ask(slug_2)) == ("from first", "from second")
        assert first.hosts == [f"engines.test:{port}"]  # the name, not the address, as Host

        answers["engines.test"] = ["127.0.0.2"]  # the name now resolves to one address
        dropped_after = await until(lambda: len(gw.pool.states()) == 1, timeout=3)
        assert gw.pool.states()[0].name == "pool@127.0.0.2"
        assert await ask(slug_1) == "from second"
        assert len(first.requests) == 1
    assert on_loop_thread and not any(on_loop_thread)  # resolved in a worker thread
    report(
        "test_dns_name_expands_to_one_engine_per_address",
        f"\nDNS: 2 addresses → 2 engines; an address gone from DNS dropped after "
        f"{dropped_after * 1000:.0f} ms",
    )


# -- shutdown deadline ----------------------------------------------------------------------------


async def test_shutdown_deadline_ends_streams_with_error_event(make_gateway: MakeGateway, seed: Seed) -> None:
    engine = StandInEngine("long", long_chunks=400, chunk_interval_s=0.025)  # a 10 s stream
    async with running_standin(engine) as engine_url:
        gw = await make_gateway(
            options=HEALTH, update={"path_routing": True, "engines": [static_engine("long", engine_url)]}
        )
        await open_deployment(seed, gw, "draining")
        async with http_server(gw.app) as url, httpx.AsyncClient(timeout=30) as client:
            endpoint = f"{url}/d/draining/v1/chat/completions"
            events: list[bytes] = []
            first = asyncio.Event()

            async def long_stream() -> None:
                async with client.stream("POST", endpoint, json=body("mode:long")) as response:
                    assert response.status_code == 200
                    buffer = b""
                    async for chunk in response.aiter_raw():
                        buffer += chunk
                        first.set()
                    events.extend(parse_events(buffer))

            streaming = asyncio.create_task(long_stream())
            waiting = asyncio.create_task(client.post(endpoint, json=body("mode:stall_headers")))
            await asyncio.wait_for(first.wait(), timeout=5)
            await until(lambda: len(engine.requests) == 2, timeout=5)
            started = time.monotonic()
            gw.begin_drain(0.5)
            async with ops_client(gw) as ops:
                ready = await ops.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            refused = await client.post(endpoint, json=body())
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert refused.headers["retry-after"]
            await asyncio.wait_for(streaming, timeout=5)
            stream_ended = time.monotonic() - started
            waited = await asyncio.wait_for(waiting, timeout=5)
            pending_answered = time.monotonic() - started
    error = error_of(events[-1])
    assert error["code"] == "shutting_down"
    assert b"[DONE]" not in b"".join(events)
    assert len(events) > 3  # it streamed until the deadline
    assert waited.status_code == 503 and waited.json()["error"]["code"] == "shutting_down"
    assert 0.5 <= stream_ended < 1.5 and pending_answered < 1.5
    assert engine.cancelled >= 1
    report(
        "test_shutdown_deadline_ends_streams_with_error_event",
        f"\ndrain deadline 0.5 s: stream ended with an error event after {stream_ended * 1000:.0f} ms, "
        f"request waiting for its first byte answered 503 after {pending_answered * 1000:.0f} ms",
    )


# -- engines through the admin API ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_engine_changes_through_admin_api_reach_a_running_gateway(
    admin: httpx.AsyncClient,
    make_gateway: MakeGateway,
    seed: Seed,
    two_standins: tuple[StandInEngine, StandInEngine, str, str],
    backend: str,
) -> None:
    a, b, url_a, url_b = two_standins
    gw = await make_gateway(options=HEALTH, update={"path_routing": True}, in_process=False)
    await open_deployment(seed, gw, "via-api")
    timings: dict[str, float] = {}

    async def ask() -> httpx.Response:
        async with http_server(gw.app) as url, httpx.AsyncClient(timeout=10) as client:
            return await client.post(f"{url}/d/via-api/v1/chat/completions", json=body(stream=False))

    assert (await ask()).json()["error"]["code"] == "no_engine"
    started = time.monotonic()
    created = await admin.post(
        "/v1/engines", json={"name": "api-engine", "url": url_a, "baseModel": BASE_MODEL}
    )
    assert created.status_code == 201, created.text
    engine_id = created.json()["engine"]["id"]
    await until(lambda: gw.pool.get(engine_id) is not None, timeout=2)
    timings["added"] = time.monotonic() - started
    assert (await ask()).json()["choices"][0]["message"]["content"] == "from a"

    started = time.monotonic()
    patched = await admin.patch(f"/v1/engines/{engine_id}", json={"url": url_b})
    assert patched.status_code == 200, patched.text
    await until(
        lambda: (state := gw.pool.get(engine_id)) is not None and state.endpoint.url == url_b, timeout=2
    )
    timings["url changed"] = time.monotonic() - started
    assert (await ask()).json()["choices"][0]["message"]["content"] == "from b"

    started = time.monotonic()
    assert (await admin.patch(f"/v1/engines/{engine_id}", json={"enabled": False})).status_code == 200
    await until(lambda: (state := gw.pool.get(engine_id)) is not None and not state.routable, timeout=2)
    timings["disabled"] = time.monotonic() - started
    assert (await ask()).json()["error"]["code"] == "no_engine"
    asked_b = len(b.requests)

    started = time.monotonic()
    assert (await admin.delete(f"/v1/engines/{engine_id}")).status_code == 204
    await until(lambda: gw.pool.get(engine_id) is None, timeout=2)
    timings["deleted"] = time.monotonic() - started
    assert len(b.requests) == asked_b and len(a.requests) == 1
    report(
        "test_engine_changes_through_admin_api_reach_a_running_gateway",
        f"\n[{backend}] engine changes seen by a separate gateway: "
        + ", ".join(f"{name} {value * 1000:.0f} ms" for name, value in timings.items()),
    )
    assert max(timings.values()) < 1.0


# -- a connection that breaks before the answer -----------------------------------------------------


class DroppingEngine:
    """A minimal HTTP/1.1 engine that closes the connection, without a word, on the first
    ``drops`` chat requests it reads (what a kept-alive connection closed by the engine as the
    gateway reuses it looks like); it answers everything else."""

    def __init__(self, drops: int) -> None:
        self.drops = drops
        self.chats = 0
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.split(": ", 1) for line in header_lines if ": " in line)
                await reader.readexactly(
                    int(headers.get("content-length", headers.get("Content-Length", "0")))
                )
                path = request_line.split(" ")[1]
                if path == "/v1/chat/completions":
                    self.chats += 1
                    if self.drops > 0:
                        self.drops -= 1
                        return
                    payload = orjson.dumps(
                        {
                            "id": "chatcmpl-dropping",
                            "object": "chat.completion",
                            "created": 1,
                            "model": BASE_MODEL,
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": "from dropping"},
                                    "finish_reason": "stop",
                                }
                            ],
                        }
                    )
                elif path == "/v1/models":
                    payload = orjson.dumps(
                        {"object": "list", "data": [{"id": BASE_MODEL, "object": "model"}]}
                    )
                else:
                    payload = b""
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def dropping_engine(drops: int) -> AsyncIterator[tuple[DroppingEngine, str]]:
    engine = DroppingEngine(drops)
    server = await asyncio.start_server(engine.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield engine, f"http://127.0.0.1:{port}"
    finally:
        server.close()


@pytest.mark.parametrize(("drops", "status"), [(1, 200), (2, 503)])
async def test_connection_broken_before_the_answer_is_sent_again_once(
    make_gateway: MakeGateway, seed: Seed, drops: int, status: int
) -> None:
    async with dropping_engine(drops) as (engine, engine_url):
        gw = await make_gateway(
            options=HEALTH, update={"path_routing": True, "engines": [static_engine("solo", engine_url)]}
        )
        await open_deployment(seed, gw, "dropped")
        async with http_server(gw.app) as url, httpx.AsyncClient(timeout=10) as client:
            response = await client.post(f"{url}/d/dropped/v1/chat/completions", json=body(stream=False))
        assert response.status_code == status, response.text
        if status == 200:
            assert response.json()["choices"][0]["message"]["content"] == "from dropping"
        else:
            assert response.json()["error"]["code"] == "upstream_unavailable"
        assert engine.chats == 2  # sent again once, never more
        state = gw.pool.get("static:solo")
        assert state is not None and state.healthy  # a broken connection is not a dead engine
