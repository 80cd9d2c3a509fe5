"""pytest plugin: the demo model and real vLLM engines (``-p tests.fixtures_engine``).

Fixtures:

- ``engine_python_path`` (session): the engine environment's interpreter;
- ``demo_model_dir`` (session): the demo model, built once into
  ``$LORRY_CACHE_DIR/demo-model/<script hash>`` by ``lorry/engine_tools/demo_model.py``;
- ``demo_manifest`` (session): its ``manifest.json``;
- ``vllm_engine`` (session): one shared engine serving the demo model, pinned to core 0;
- ``engine_factory`` (function): starts further engines, stopped at the end of the test.

At most ``tests.engines.MAX_ENGINES`` engines are alive at once (see ``tests/engines.py``).
A missing engine environment skips these tests, or fails them when ``CI=true``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest

from lorry import engine_env
from tests import engines
from tests.engines import EngineLimitError, EngineStartError, RunningEngine

SHARED_ENGINE_CORE = 0

EngineFactory = Callable[..., RunningEngine]

_timings: dict[str, float] = {}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing_dependency(reason: str) -> NoReturn:
    """Skip, or fail under ``CI=true`` (DESIGN §13: in CI a missing vLLM env is a failure)."""
    if _in_ci():
        pytest.fail(f"{reason} (CI=true: a missing dependency is a failure)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def engine_cache_dir() -> Path:
    return engine_env.default_cache_dir()


@pytest.fixture(scope="session")
def engine_python_path(engine_cache_dir: Path) -> Path:
    python = engines.engine_python(engine_cache_dir)
    if python is None:
        missing_dependency(
            f"vLLM engine environment not built at {engine_env.env_dir(engine_cache_dir)} "
            "(run: python -m lorry.engine_env build)"
        )
    return python


@pytest.fixture(scope="session")
def demo_model_dir(engine_python_path: Path, engine_cache_dir: Path) -> Path:
    """The demo model directory (``base/``, ``adapters/<name>/``, ``manifest.json``)."""
    out = engine_env.demo_model_dir(engine_cache_dir)
    if (out / "manifest.json").is_file():
        return out
    started = time.monotonic()
    completed = subprocess.run(
        [str(engine_python_path), str(engine_env.demo_model_script()), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if completed.returncode != 0 or not (out / "manifest.json").is_file():
        pytest.fail(
            f"demo model build failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}",
            pytrace=False,
        )
    _timings["demo model build"] = time.monotonic() - started
    return out


@pytest.fixture(scope="session")
def demo_manifest(demo_model_dir: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((demo_model_dir / "manifest.json").read_text(encoding="utf-8"))
    return manifest


def _start(
    demo_model_dir: Path,
    manifest: Mapping[str, Any],
    log_dir: Path,
    *,
    cpu_core: int,
    name: str,
    max_loras: int = 4,
    max_lora_rank: int = 16,
    extra_args: Sequence[str] = (),
    extra_env: Mapping[str, str] | None = None,
    served_model_name: str | None = None,
) -> RunningEngine:
    try:
        return engines.start_engine(
            demo_model_dir / manifest["base"],
            cpu_core=cpu_core,
            log_path=log_dir / f"{name}.log",
            served_model_name=served_model_name or str(manifest["model_id"]),
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            dtype=str(manifest["dtype"]),
            extra_args=extra_args,
            extra_env=extra_env,
        )
    except (EngineStartError, EngineLimitError) as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def vllm_engine(
    demo_model_dir: Path, demo_manifest: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningEngine]:
    """The shared engine (demo model, ``--max-loras 4 --max-lora-rank 16``) on core 0."""
    log_dir = tmp_path_factory.mktemp("engines")
    engine = _start(demo_model_dir, demo_manifest, log_dir, cpu_core=SHARED_ENGINE_CORE, name="shared")
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def engine_factory(
    demo_model_dir: Path, demo_manifest: dict[str, Any], tmp_path: Path
) -> Iterator[EngineFactory]:
    """``engine_factory(name=..., cpu_core=None, **start_engine kwargs)``; stopped after the test."""
    started: list[RunningEngine] = []

    def factory(*, name: str = "extra", cpu_core: int | None = None, **kwargs: Any) -> RunningEngine:
        core = engines.free_core() if cpu_core is None else cpu_core
        engine = _start(demo_model_dir, demo_manifest, tmp_path, cpu_core=core, name=name, **kwargs)
        started.append(engine)
        return engine

    try:
        yield factory
    finally:
        for engine in reversed(started):
            engine.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not engines.started_engines and not _timings:
        return
    terminalreporter.section("vLLM engines")
    for label, seconds in _timings.items():
        terminalreporter.write_line(f"{label}: {seconds:.1f} s")
    terminalreporter.write_line(f"engines started: {len(engines.started_engines)}")
    for label, seconds in engines.started_engines:
        terminalreporter.write_line(f"  {label}: healthy after {seconds:.1f} s")
