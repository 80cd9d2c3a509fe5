"""A real vLLM CPU engine with the demo model: runtime LoRA loading as Lorry relies on it (DESIGN §9).

The tests talk to the shared engine over HTTP only. Adapter names carry the ``t-real-`` prefix
so that they never collide with names other test modules register on the same engine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.engines import EngineLimitError, RunningEngine, alive_engines, engine_slot, free_core

pytestmark = pytest.mark.vllm

PREFIX = "t-real-"
PROMPT = "The quick brown fox jumps over the lazy dog because"
MAX_TOKENS = 16
RSS_BOUND_BYTES = 4 * 1024**3  # observed ~2.9 GiB: 1 GiB of it is VLLM_CPU_KVCACHE_SPACE


@pytest.fixture(scope="module")
def client(vllm_engine: RunningEngine) -> Iterator[httpx.Client]:
    with vllm_engine.client() as http:
        yield http


def adapter_path(demo_model_dir: Path, manifest: dict[str, Any], name: str) -> str:
    for entry in [*manifest["adapters"], *manifest["oversize_adapters"]]:
        if entry["name"] == name:
            return str(demo_model_dir / entry["path"])
    raise KeyError(name)


def load(client: httpx.Client, name: str, path: str) -> httpx.Response:
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})


def model_ids(client: httpx.Client) -> dict[str, dict[str, Any]]:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return {entry["id"]: entry for entry in response.json()["data"]}


def greedy(client: httpx.Client, model: str, prompt: str = PROMPT) -> str:
    response = client.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": prompt,
            "temperature": 0,
            "max_tokens": MAX_TOKENS,
            "min_tokens": MAX_TOKENS,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model
    assert body["usage"]["completion_tokens"] == MAX_TOKENS
    text: str = body["choices"][0]["text"]
    return text


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error: dict[str, Any] = response.json()["error"]
    assert isinstance(error["code"], int)
    return error


@pytest.fixture(scope="module")
def loaded(
    client: httpx.Client, vllm_engine: RunningEngine, demo_model_dir: Path, demo_manifest: dict[str, Any]
) -> dict[str, str]:
    """Every loadable demo adapter registered once; maps manifest name -> engine-side name."""
    names: dict[str, str] = {}
    for entry in demo_manifest["adapters"]:
        name = f"{PREFIX}{entry['name']}"
        response = load(client, name, adapter_path(demo_model_dir, demo_manifest, entry["name"]))
        assert response.status_code == 200, response.text
        names[entry["name"]] = name
    return names


def test_models_lists_served_name(
    client: httpx.Client, vllm_engine: RunningEngine, demo_manifest: dict[str, Any]
) -> None:
    models = model_ids(client)
    assert vllm_engine.served_model_name == demo_manifest["model_id"]
    base = models[vllm_engine.served_model_name]
    assert base["root"] == str(vllm_engine.model_dir)
    assert base["parent"] is None
    assert base["max_model_len"] == 4096


def test_runtime_load_counts_once_and_second_load_is_already_loaded(
    client: httpx.Client, vllm_engine: RunningEngine, demo_model_dir: Path, demo_manifest: dict[str, Any]
) -> None:
    name = f"{PREFIX}load-alpha"
    path = adapter_path(demo_model_dir, demo_manifest, "alpha")
    assert vllm_engine.load_count(name) == 0

    first = load(client, name, path)
    assert first.status_code == 200, first.text
    # A plain-text body, but vLLM 0.32 sends it with no Content-Type header at all
    # (``Response(content=str)`` without a media type): never parse a success as JSON.
    assert "content-type" not in first.headers, first.headers
    assert first.text == f"Success: LoRA adapter '{name}' added successfully."
    # vLLM logs the line before answering; allow for the log file's write lag only.
    assert vllm_engine.wait_for_log(f"Loaded new LoRA adapter: name '{name}'", timeout=5) == 1
    assert vllm_engine.load_count(name) == 1

    entry = model_ids(client)[name]
    assert entry["root"] == path
    assert entry["parent"] == vllm_engine.served_model_name
    assert entry["max_model_len"] is None

    second = load(client, name, path)
    assert second.status_code == 400, second.text
    error = error_of(second)
    assert error["code"] == 400
    assert error["type"] == "InvalidUserInput"
    assert f"The lora adapter '{name}' has already been loaded" in error["message"]

    # The name decides, not the path: other weights under a taken name get the same answer,
    # and the name keeps its first path (hence: never reuse a name for other weights).
    other = load(client, name, adapter_path(demo_model_dir, demo_manifest, "beta"))
    assert other.status_code == 400, other.text
    assert error_of(other)["message"] == error["message"]
    assert model_ids(client)[name]["root"] == path
    time.sleep(0.3)
    assert vllm_engine.load_count(name) == 1


def test_greedy_output_differs_per_adapter(client: httpx.Client, loaded: dict[str, str]) -> None:
    base_name = next(iter(model_ids(client)))
    outputs = {"<base>": greedy(client, base_name)}
    for adapter, engine_name in loaded.items():
        outputs[adapter] = greedy(client, engine_name)
    print("greedy outputs:", outputs)
    assert len(outputs) >= 4
    assert len(set(outputs.values())) == len(outputs), outputs
    # Greedy decoding is repeatable, for the base model and through an adapter.
    assert greedy(client, base_name) == outputs["<base>"]
    first = next(iter(loaded))
    assert greedy(client, loaded[first]) == outputs[first]


def test_chat_completion_through_adapter(client: httpx.Client, loaded: dict[str, str]) -> None:
    name = loaded["gamma"]
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": name,
            "messages": [{"role": "user", "content": "hello"}],
            "temperature": 0,
            "max_tokens": 8,
            "min_tokens": 8,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == name
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] == 8


def test_nonexistent_path_is_rejected(
    client: httpx.Client, vllm_engine: RunningEngine, tmp_path: Path
) -> None:
    name = f"{PREFIX}missing"
    response = load(client, name, str(tmp_path / "no-such-adapter"))
    assert response.status_code == 404, response.text
    error = error_of(response)
    assert error["type"] == "NotFoundError"
    assert error["message"] == f"Loading lora {name} failed: No adapter found for <path>"  # redacted
    assert name not in model_ids(client)
    assert vllm_engine.load_count(name) == 0

    unknown = client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1})
    assert unknown.status_code == 404, unknown.text
    assert "does not exist" in error_of(unknown)["message"]


def test_rank_above_max_is_rejected_and_engine_survives(
    client: httpx.Client, vllm_engine: RunningEngine, demo_model_dir: Path, demo_manifest: dict[str, Any]
) -> None:
    name = f"{PREFIX}oversize"
    response = load(client, name, adapter_path(demo_model_dir, demo_manifest, "oversize"))
    assert response.status_code == 500, response.text
    error = error_of(response)
    assert error["type"] == "InternalServerError"
    assert "'LoRA rank 32 is greater than max_lora_rank 16.'" in error["message"]
    assert name not in model_ids(client)
    assert vllm_engine.load_count(name) == 0
    assert vllm_engine.healthy()


def test_unload_only_removes_the_name(
    client: httpx.Client, vllm_engine: RunningEngine, demo_model_dir: Path, demo_manifest: dict[str, Any]
) -> None:
    name = f"{PREFIX}unload-beta"
    assert load(client, name, adapter_path(demo_model_dir, demo_manifest, "beta")).status_code == 200
    response = client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert response.status_code == 200, response.text
    assert "content-type" not in response.headers, response.headers
    assert response.text == f"Success: LoRA adapter '{name}' removed successfully."
    assert name not in model_ids(client)
    gone = client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1})
    assert gone.status_code == 404, gone.text

    again = client.post("/v1/unload_lora_adapter", json={"lora_name": name})
    assert again.status_code == 404, again.text
    assert error_of(again)["type"] == "NotFoundError"


def test_metrics_carry_routing_gauges(
    client: httpx.Client, vllm_engine: RunningEngine, loaded: dict[str, str]
) -> None:
    text = vllm_engine.metrics()
    label = f'model_name="{vllm_engine.served_model_name}"'
    for metric in ("vllm:num_requests_waiting{", "vllm:num_requests_running{", "vllm:kv_cache_usage_perc{"):
        lines = [line for line in text.splitlines() if line.startswith(metric)]
        assert lines, metric
        assert all(label in line for line in lines), lines
    assert 'vllm:num_requests_waiting_by_reason{engine="0",model_name=' in text
    assert "vllm:lora_requests_info{" in text


def test_engine_footprint(vllm_engine: RunningEngine) -> None:
    rss, pss = vllm_engine.rss_bytes(), vllm_engine.pss_bytes()
    print(
        f"engine pids={vllm_engine.pids()} rss={rss / 1024**2:.0f} MiB pss={pss / 1024**2:.0f} MiB "
        f"healthy after {vllm_engine.start_seconds:.1f} s"
    )
    assert 0 < pss <= rss < RSS_BOUND_BYTES
    assert len(vllm_engine.pids()) >= 2  # API server + engine core, all in the engine's group


def test_every_engine_thread_stays_on_its_core(vllm_engine: RunningEngine) -> None:
    """Not only the worker's compute threads (VLLM_CPU_OMP_THREADS_BIND): see RunningEngine.pin."""
    threads = {tid: os.sched_getaffinity(tid) for tid in vllm_engine.threads()}
    assert len(threads) > len(vllm_engine.pids())  # the API server alone runs several threads
    assert {tid: cores for tid, cores in threads.items() if cores != {vllm_engine.cpu_core}} == {}


def test_guard_allows_at_most_two_engines(vllm_engine: RunningEngine) -> None:
    assert vllm_engine in alive_engines()
    with (
        pytest.raises(EngineLimitError, match="core 0 already has an engine"),
        engine_slot("same-core", cpu_core=vllm_engine.cpu_core),
    ):
        pass
    with engine_slot("other", cpu_core=1):
        try:
            spare: int | None = free_core()
        except EngineLimitError:  # every core is taken (this machine has two)
            spare = None
        assert spare not in (vllm_engine.cpu_core, 1)
        with pytest.raises(EngineLimitError, match="limit 2"), engine_slot("third"):
            pass
    with engine_slot("again", cpu_core=1):  # the slot above was released
        pass
