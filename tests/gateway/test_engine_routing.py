"""Engine choice, load parsing, DNS expansion and options (DESIGN §8) — no I/O, no engine.

The behaviour against real engines is in ``test_scale_out.py``; these pin the rules themselves.
"""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from gateway import balancer
from gateway.balancer import LoadBound
from gateway.engines import EngineLoad, EnginePool, EngineState, UpstreamTimeouts, endpoints
from gateway.health import parse_engine_load
from gateway.options import GatewayOptions, system_resolver
from gateway.snapshot import AdapterRef, DeploymentView, EngineView

BASE = "lorry/tiny-llama"
TIMEOUTS = UpstreamTimeouts(connect_s=1, first_byte_s=1, idle_s=1, total_s=10)


def engine_view(
    name: str, *, url: str | None = None, max_loras: int = 4, rank: int = 16, **kw: object
) -> EngineView:
    return EngineView(
        id=f"id-{name}",
        name=name,
        url=url or f"http://10.0.0.{sum(map(ord, name)) % 200 + 1}:8000",
        base_model=str(kw.get("base_model", BASE)),
        served_model_name=BASE,
        adapter_root="/store",
        max_loras=max_loras,
        max_cpu_loras=None,
        max_lora_rank=rank,
        enabled=bool(kw.get("enabled", True)),
    )


def deployment(digest: str | None = "ab" * 32, *, slug: str = "dep", rank: int = 8) -> DeploymentView:
    adapter = AdapterRef(id="adapter", digest=digest, rank=rank) if digest is not None else None
    return DeploymentView(
        id="dep-id",
        slug=slug,
        org_id="org",
        project_id="project",
        enabled=True,
        auth_mode="fixed_api_key",
        target_kind="adapter" if adapter else "base_model",
        base_model=BASE,
        adapter=adapter,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def states(*views: EngineView) -> list[EngineState]:
    return [EngineState(view=view, client=httpx.AsyncClient()) for view in views]


def names(ordered: list[EngineState]) -> list[str]:
    return [state.name for state in ordered]


def rendezvous_names(dep: DeploymentView, engines: list[EngineState]) -> list[str]:
    order = balancer.rendezvous_order(dep, [state.key for state in engines])
    by_key = {state.key: state.name for state in engines}
    return [by_key[key] for key in order]


def test_candidates_filter_by_model_rank_health_and_enabled() -> None:
    engines = states(
        engine_view("ok"),
        engine_view("other-model", base_model="other/model"),
        engine_view("low-rank", rank=4),
        engine_view("disabled", enabled=False),
        engine_view("sick"),
    )
    engines[-1].healthy = False
    assert names(balancer.candidates(deployment(rank=8), engines)) == ["ok"]
    # A base-model deployment has no rank to check.
    assert set(names(balancer.candidates(deployment(None), engines))) == {"ok", "low-rank"}
    # When no able engine is healthy, all able ones are tried rather than none ("panic" routing).
    engines[0].healthy = False
    assert set(names(balancer.candidates(deployment(rank=8), engines))) == {"ok", "sick"}
    assert names(balancer.candidates(deployment(rank=8), engines[1:4])) == []  # never the unable ones


def test_rendezvous_is_stable_and_spreads_adapters() -> None:
    engines = states(*(engine_view(f"e{i}") for i in range(4)))
    firsts = set()
    for i in range(64):
        dep = deployment(f"{i:064x}")
        first = names(balancer.candidates(dep, engines))
        # The same on every call and on a replica with the engines listed in another order.
        assert first == names(balancer.candidates(dep, list(reversed(engines))))
        assert first == rendezvous_names(dep, engines)
        firsts.add(first[0])
    assert firsts == {"e0", "e1", "e2", "e3"}  # 64 adapters land on every engine


def test_affinity_prefers_an_engine_with_the_adapter_registered() -> None:
    engines = states(engine_view("a"), engine_view("b"))
    dep = deployment()
    natural = rendezvous_names(dep, engines)
    second = next(state for state in engines if state.name == natural[1])
    assert dep.adapter is not None
    second.registered.add(dep.adapter.engine_name)
    assert names(balancer.candidates(dep, engines))[0] == natural[1]


def test_load_bound_on_requests_spills_to_the_next_engine() -> None:
    engines = states(engine_view("a"), engine_view("b"))
    dep = deployment()
    first, second = rendezvous_names(dep, engines)
    by_name = {state.name: state for state in engines}
    bound = LoadBound(max_requests=2, max_waiting=4)
    by_name[first].acquire("lora-x")
    assert names(balancer.candidates(dep, engines, bound))[0] == first  # under the bound: stays
    by_name[first].acquire("lora-x")
    assert names(balancer.candidates(dep, engines, bound)) == [second, first]  # at the bound: spills
    # The engine's own count (every gateway's requests) counts too, when larger than ours.
    by_name[first].release("lora-x")
    by_name[first].release("lora-x")
    by_name[first].load = EngineLoad(running=2)
    by_name[first].load_known = True
    assert names(balancer.candidates(dep, engines, bound))[0] == second
    # When every engine is over its bound, the least overloaded comes first.
    by_name[second].load = EngineLoad(running=5)
    by_name[second].load_known = True
    assert names(balancer.candidates(dep, engines, bound)) == [first, second]


def test_load_bound_on_waiting_queue() -> None:
    engines = states(engine_view("a"), engine_view("b"))
    dep = deployment(None, slug="base")
    first, second = rendezvous_names(dep, engines)
    by_name = {state.name: state for state in engines}
    by_name[first].load = EngineLoad(running=1, waiting=3)
    by_name[first].load_known = True
    bound = LoadBound(max_requests=64, max_waiting=4)
    assert names(balancer.candidates(dep, engines, bound))[0] == first
    by_name[first].load = EngineLoad(running=1, waiting=4)
    assert names(balancer.candidates(dep, engines, bound))[0] == second


def test_distinct_adapters_in_flight_against_max_loras() -> None:
    engines = states(engine_view("a", max_loras=2), engine_view("b", max_loras=2))
    dep = deployment("cd" * 32)
    assert dep.adapter is not None
    name = dep.adapter.engine_name
    first, second = rendezvous_names(dep, engines)
    by_name = {state.name: state for state in engines}
    by_name[first].acquire("lora-1")
    assert names(balancer.candidates(dep, engines))[0] == first
    by_name[first].acquire("lora-2")  # maxLoras distinct adapters in flight: ours would be deferred
    assert names(balancer.candidates(dep, engines))[0] == second
    by_name[first].acquire(name)  # ...unless ours is among them
    by_name[first].release("lora-2")
    assert names(balancer.candidates(dep, engines))[0] == first
    # Adapters in flight from other gateways, as the engine reports them, count the same.
    by_name[first].release(name)
    by_name[first].load = EngineLoad(lora_adapters=frozenset({"lora-9"}))
    by_name[first].load_known = True
    assert names(balancer.candidates(dep, engines))[0] == second


def test_deferred_requests_keep_new_adapters_away() -> None:
    engines = states(engine_view("a"), engine_view("b"))
    dep = deployment("ef" * 32)
    assert dep.adapter is not None
    first, second = rendezvous_names(dep, engines)
    by_name = {state.name: state for state in engines}
    by_name[first].load = EngineLoad(running=1, deferred=2, lora_adapters=frozenset({"lora-other"}))
    by_name[first].load_known = True
    assert names(balancer.candidates(dep, engines))[0] == second
    # An adapter already running there is not kept away by the engine deferring others.
    by_name[first].load = EngineLoad(
        running=1, deferred=2, lora_adapters=frozenset({dep.adapter.engine_name})
    )
    assert names(balancer.candidates(dep, engines))[0] == first


VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="lorry/tiny-llama"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="lorry/tiny-llama"} 5.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="lorry/tiny-llama",reason="capacity"} 3.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="lorry/tiny-llama",reason="deferred"} 2.0
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="lora-a",waiting_lora_adapters="lora-a"} 1.76e+09
vllm:lora_requests_info{max_lora="4",running_lora_adapters="lora-b,lora-c",waiting_lora_adapters=""} 1.77e+09
vllm:num_requests_running_total_fake{engine="0"} 99.0
"""


def test_parse_engine_load() -> None:
    load = parse_engine_load(VLLM_METRICS)
    assert (load.running, load.waiting, load.deferred) == (3.0, 5.0, 2.0)
    assert load.lora_adapters == {"lora-b", "lora-c"}  # the newest series only
    assert load.max_lora == 4
    assert parse_engine_load("") == EngineLoad()
    idle = VLLM_METRICS.replace("} 3.0\n", "} 0.0\n").replace("} 5.0\n", "} 0.0\n")
    assert parse_engine_load(idle).lora_adapters == frozenset()  # a stale series of an idle engine
    two_cores = VLLM_METRICS + 'vllm:num_requests_running{engine="1",model_name="lorry/tiny-llama"} 2.0\n'
    assert parse_engine_load(two_cores).running == 5.0


def test_dns_names_expand_to_one_engine_per_address() -> None:
    view = engine_view("pool", url="http://vllm.internal:8000/prefix")
    addresses = {("vllm.internal", 8000): ["10.1.0.5", "fd00::7"]}
    expanded = endpoints(view, addresses)
    assert [(e.key, e.label, e.url, e.host_header) for e in expanded] == [
        ("id-pool@10.1.0.5", "pool@10.1.0.5", "http://10.1.0.5:8000/prefix", "vllm.internal:8000"),
        ("id-pool@fd00::7", "pool@fd00::7", "http://[fd00::7]:8000/prefix", "vllm.internal:8000"),
    ]
    # Not resolved (yet): the name as written. IP literals and https never expand.
    assert [e.url for e in endpoints(view, {})] == ["http://vllm.internal:8000/prefix"]
    for url in ("http://10.0.0.1:8000", "http://[::1]:8000", "https://vllm.internal"):
        literal = engine_view("lit", url=url)
        assert [e.key for e in endpoints(literal, {("vllm.internal", 443): ["10.0.0.9"]})] == ["id-lit"]


async def test_pool_keeps_state_per_address_across_syncs() -> None:
    pool = EnginePool(TIMEOUTS)
    view = engine_view("pool", url="http://vllm.internal:8000")
    created = pool.sync([view], {("vllm.internal", 8000): ["10.1.0.5", "10.1.0.6"]})
    assert sorted(state.name for state in created) == ["pool@10.1.0.5", "pool@10.1.0.6"]
    kept = pool.get("id-pool@10.1.0.5")
    assert kept is not None
    kept.registered.add("lora-1")
    created = pool.sync([view], {("vllm.internal", 8000): ["10.1.0.5", "10.1.0.7"]})
    assert [state.name for state in created] == ["pool@10.1.0.7"]
    assert pool.get("id-pool@10.1.0.5") is kept and kept.registered == {"lora-1"}
    assert pool.get("id-pool@10.1.0.6") is None
    await pool.aclose()


def test_system_resolver_resolves_localhost() -> None:
    assert "127.0.0.1" in system_resolver("localhost", 80)


def test_options_from_environment() -> None:
    options = GatewayOptions.from_env(
        {
            "LORRY_GATEWAY_HEALTH_INTERVAL_S": "0.25",
            "LORRY_GATEWAY_ENGINE_MAX_REQUESTS": "2",
            "LORRY_GATEWAY_KEY_CACHE_TTL_S": "3",
            "LORRY_GATEWAY_LISTEN": "false",
            "UNRELATED": "x",
        }
    )
    assert options.health_interval_s == 0.25
    assert options.engine_max_requests == 2
    assert options.keys.positive_ttl_s == 3.0
    assert options.listen is False
    assert GatewayOptions.from_env({}) == GatewayOptions()
    with pytest.raises(ValueError, match="LORRY_GATEWAY_ENGINE_MAX_REQUESTS"):
        GatewayOptions.from_env({"LORRY_GATEWAY_ENGINE_MAX_REQUESTS": "many"})
