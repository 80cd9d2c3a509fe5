"""``python -m tests.bench [--no-engine] [--seconds S]``: prints Lorry's figures.

1. The gateway's own cost, against a mock upstream that answers at once (the peers' method):
   sequential overhead, time to first streamed byte, throughput and the gateway's CPU time and
   memory per request under concurrency.
2. Key hashing (argon2id, as stored): one verification, the cost of a key-cache miss.
3. With a real vLLM engine (the demo model, one CPU core): what the gateway adds to a real
   generation, time to first token direct and through the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from lorry import engine_env, keys
from tests import engines
from tests.bench.measure import answer, first_byte, load, overhead
from tests.bench.stack import gateway_in_front_of, mock_upstream
from tests.gateway.standin import MODEL as MOCK_MODEL

CHUNKS = 64


def line(text: str) -> None:
    print(text, flush=True)


async def gateway_cost(workdir: Path, seconds: float) -> None:
    line("\n== 1. The gateway's own cost (mock upstream answering at once; SQLite; one gateway process)")
    async with (
        mock_upstream(CHUNKS) as upstream,
        gateway_in_front_of(upstream, MOCK_MODEL, workdir / "mock") as stack,
    ):
        for label, request in (
            ("non-streamed answer", answer(MOCK_MODEL)),
            ("streamed, first byte", first_byte(MOCK_MODEL)),
        ):
            measured = await overhead(stack, request)
            line(
                f"sequential overhead, {label}: direct {measured.direct_ms:.2f} ms, through the gateway "
                f"{measured.gateway_ms:.2f} ms → adds {measured.added_ms:.2f} ms "
                "(median of 7 round medians x 25 requests)"
            )
        for label, request, concurrency in (
            ("non-streamed", answer(MOCK_MODEL), 8),
            ("non-streamed", answer(MOCK_MODEL), 32),
            (f"streamed ({CHUNKS + 3} events; latency = first byte)", first_byte(MOCK_MODEL, long=True), 16),
        ):
            result = await load(stack, request, concurrency=concurrency, seconds=seconds)
            line(
                f"load, {label}, {concurrency} concurrent clients for {result.seconds:.0f} s: "
                f"{result.rps:.0f} requests/s ({result.errors} errors); latency p50 "
                f"{result.percentile(0.5):.1f} / p95 {result.percentile(0.95):.1f} / p99 "
                f"{result.percentile(0.99):.1f} ms; gateway CPU {result.cpu_ms_per_request:.2f} ms per "
                f"request (≈ {1000 / max(result.cpu_ms_per_request, 1e-9):.0f} requests/s per core); "
                f"gateway RSS {result.gateway_rss_mib:.0f} MiB"
            )
    line(
        "(the load generator is Python on the same 2 cores: requests/s is bounded by it; the gateway's "
        "CPU time per request is the gateway's own figure)"
    )


def key_hashing() -> None:
    line("\n== 2. Key hashing")
    issued = keys.issue(keys.TokenKind.DEPLOYMENT_KEY)
    parsed = keys.parse(issued.plaintext)
    assert parsed is not None
    timings = []
    for _ in range(10):
        started = time.perf_counter()
        assert keys.verify_secret(issued.secret_hash, parsed.secret)
        timings.append(time.perf_counter() - started)
    line(
        f"argon2id verification of one key: median {statistics.median(timings) * 1000:.1f} ms, "
        f"max {max(timings) * 1000:.1f} ms (paid once per key per gateway, then cached)"
    )


async def real_engine(workdir: Path) -> None:
    line("\n== 3. A real vLLM engine (demo model, one CPU core)")
    cache = engine_env.default_cache_dir()
    if not engine_env.is_ready(cache):
        line("skipped: the engine environment is not built (make engine-env)")
        return
    demo = engine_env.build_demo_model(cache)
    manifest = json.loads((demo / "manifest.json").read_text(encoding="utf-8"))
    engine = engines.start_engine(
        demo / manifest["base"],
        cpu_core=0,
        log_path=workdir / "engine.log",
        served_model_name=str(manifest["model_id"]),
        dtype=str(manifest["dtype"]),
    )
    try:
        line(f"engine healthy after {engine.start_seconds:.1f} s; RSS {engine.rss_bytes() / 2**30:.2f} GiB")
        model = engine.served_model_name
        async with gateway_in_front_of(engine.url, model, workdir / "engine") as stack:
            for label, request in (
                ("8-token answer", answer(model, max_tokens=8)),
                ("streamed, first token", first_byte(model, max_tokens=8)),
            ):
                measured = await overhead(stack, request, rounds=5, per_round=10)
                line(
                    f"{label}: direct {measured.direct_ms:.1f} ms, through the gateway "
                    f"{measured.gateway_ms:.1f} ms → adds {measured.added_ms:.1f} ms "
                    "(median of 5 round medians x 10 requests)"
                )
    finally:
        engine.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench")
    parser.add_argument("--no-engine", action="store_true", help="skip the real-engine section")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorry-bench-") as tmp:
        workdir = Path(tmp)
        await gateway_cost(workdir, args.seconds)
        key_hashing()
        if not args.no_engine:
            await real_engine(workdir)


if __name__ == "__main__":
    asyncio.run(main())
