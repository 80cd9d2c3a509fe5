"""Real vLLM CPU engines for tests (DESIGN §10, §13). Support code, not a test module.

Engines run in the separate engine environment (``lorry.engine_env``) as
``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 and a random free port, in their
own process group, with their output in ``log_path`` (the engine's own log, which is where
engine-side adapter loads are counted, DESIGN §9).

At most :data:`MAX_ENGINES` are alive at once in the whole test session: :func:`start_engine`
refuses to exceed it, and engines started some other way (``lorry up`` tests) must hold an
:func:`engine_slot` while they run.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lorry import engine_env
from lorry.local_engine import engine_command, engine_environ

MAX_ENGINES = 2
"""Engines (of any origin) alive at once in a test session (DESIGN §10)."""

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
LOAD_LINE = "Loaded new LoRA adapter: name '{name}', path '"
"""vLLM logs this once per successful ``/v1/load_lora_adapter`` (vllm 0.32 models/serving.py)."""

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class EngineStartError(RuntimeError):
    """The engine exited or did not become healthy in time; the message ends with its log tail."""


class EngineLimitError(RuntimeError):
    """Starting another engine would exceed :data:`MAX_ENGINES` or reuse a busy core."""


@dataclass(eq=False)
class RunningEngine:
    url: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    model_dir: Path
    served_model_name: str
    cpu_core: int = 0
    start_seconds: float = 0.0
    argv: tuple[str, ...] = field(default=(), repr=False)

    # -- logs -------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def load_count(self, name: str) -> int:
        """Engine-side successful registrations of adapter ``name`` (its own log lines)."""
        needle = LOAD_LINE.format(name=name)
        return sum(1 for line in self.log_text().splitlines() if needle in line)

    def wait_for_log(self, pattern: str, *, count: int = 1, timeout: float = 10.0) -> int:
        """Wait until ``pattern`` (a regex) matches at least ``count`` log lines; returns matches."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = sum(1 for line in self.log_text().splitlines() if regex.search(line))
            if found >= count or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    # -- HTTP -------------------------------------------------------------------------------
    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def metrics(self) -> str:
        response = httpx.get(f"{self.url}/metrics", timeout=10.0)
        response.raise_for_status()
        return response.text

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    # -- process ----------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.process.poll() is None

    def pids(self) -> list[int]:
        """Every process of the engine's process group (API server, engine core, helpers)."""
        return _group_pids(self.process.pid)

    def pin(self) -> None:
        """Keep every thread of every process of the engine on its core.

        ``VLLM_CPU_OMP_THREADS_BIND`` binds only the model worker's compute threads. The engine
        core process, which busy-waits on the worker, and the API server would otherwise run on
        the other core, where they starved the gateways, the tests and Postgres of CPU: processes
        there waited up to 10.5 s on the run queue while ready to run (measured from
        ``/proc/<pid>/schedstat`` during 20 concurrent streams), which earlier sessions took for
        the virtual machine freezing. Pinned whole, the same streams left no wait over 0.3 s.
        """
        for tid in self.threads():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, {self.cpu_core})

    def threads(self, *, api_server: bool = True) -> list[int]:
        """Thread ids of every process of the engine (``api_server=False``: all but its own)."""
        return [
            int(task.name)
            for pid in self.pids()
            if api_server or pid != self.process.pid
            for task in _tasks(pid)
        ]

    @contextlib.contextmanager
    def api_server_first(self, niceness: int = 10) -> Iterator[None]:
        """Lower the scheduling priority of every thread of the engine's other processes (its
        engine core) while inside. Pinned to one core, the engine core otherwise takes the CPU
        from its own API server, which then streams tokens well behind their generation (on a
        GPU host the two do not compete). Restored on exit."""
        before: dict[int, int] = {}
        for tid in self.threads(api_server=False):
            with contextlib.suppress(OSError):
                before[tid] = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(19, before[tid] + niceness))
        try:
            yield
        finally:
            for tid, value in before.items():
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, tid, value)

    def rss_bytes(self) -> int:
        """Resident memory of the whole engine (all processes of its group)."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/statm").read_text().split()
            except OSError:
                continue
            total += int(fields[1]) * _PAGE_SIZE
        return total

    def pss_bytes(self) -> int:
        """Proportional set size of the whole engine (shared pages counted once)."""
        total = 0
        for pid in self.pids():
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            for line in rollup.splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        return total

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM to the whole process group, then SIGKILL whatever is left."""
        try:
            pgid = self.process.pid
            if self.alive() or _group_pids(pgid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=timeout)
                while _group_pids(pgid) and time.monotonic() < deadline:
                    time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5.0)
        finally:
            _unregister(self)


# -- the session-wide guard --------------------------------------------------------------------
_lock = threading.Lock()
_engines: list[RunningEngine] = []
_slots: dict[int, tuple[str, int | None]] = {}
_slot_ids = iter(range(1, 1_000_000))
started_engines: list[tuple[str, float]] = []
"""(served name @ core, seconds to healthy) for every engine started this session."""


def alive_engines() -> list[RunningEngine]:
    with _lock:
        return [engine for engine in _engines if engine.alive()]


def _busy_cores() -> set[int]:
    cores = {engine.cpu_core for engine in _engines if engine.alive()}
    cores.update(core for _, core in _slots.values() if core is not None)
    return cores


def _claim(label: str, cpu_core: int | None) -> int:
    with _lock:
        # A dead engine stays registered (its group is killed by stop()), but does not count.
        running = [engine for engine in _engines if engine.alive()]
        in_use = len(running) + len(_slots)
        if in_use >= MAX_ENGINES:
            holders = [f"{e.served_model_name}@{e.url}" for e in running]
            holders += [name for name, _ in _slots.values()]
            raise EngineLimitError(
                f"cannot start {label}: {in_use} engines already alive (limit {MAX_ENGINES}): {holders}"
            )
        if cpu_core is not None and cpu_core in _busy_cores():
            raise EngineLimitError(f"cannot start {label}: core {cpu_core} already has an engine")
        slot = next(_slot_ids)
        _slots[slot] = (label, cpu_core)
        return slot


def _release(slot: int) -> None:
    with _lock:
        _slots.pop(slot, None)


def _unregister(engine: RunningEngine) -> None:
    with _lock, contextlib.suppress(ValueError):
        _engines.remove(engine)


@contextlib.contextmanager
def engine_slot(label: str, *, cpu_core: int | None = None) -> Iterator[None]:
    """Hold one of the :data:`MAX_ENGINES` places for an engine started some other way.

    Use it around a test that lets ``lorry up`` (or anything else) start a vLLM engine.
    """
    slot = _claim(label, cpu_core)
    try:
        yield
    finally:
        _release(slot)


def free_core() -> int:
    """A CPU core with no engine bound to it (0 first)."""
    with _lock:
        busy = _busy_cores()
    cores = sorted(os.sched_getaffinity(0))
    for core in cores:
        if core not in busy:
            return core
    raise EngineLimitError(f"every core already has an engine: {sorted(busy)}")


@atexit.register
def _stop_all() -> None:
    for engine in list(_engines):
        with contextlib.suppress(Exception):
            engine.stop(timeout=5.0)


# -- starting ----------------------------------------------------------------------------------
def engine_python(cache_dir: Path | None = None) -> Path | None:
    """The engine environment's interpreter, or None when it is not built."""
    cache = cache_dir if cache_dir is not None else engine_env.default_cache_dir()
    return engine_env.python_path(cache) if engine_env.is_ready(cache) else None


def free_port() -> int:
    """A free TCP port on 127.0.0.1, away from common ports and the ephemeral range."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


def _tasks(pid: int) -> list[Path]:
    try:
        return list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses.
        rest = stat[stat.rfind(")") + 2 :].split()
        if len(rest) > 2 and rest[2] == str(pgid) and rest[0] != "Z":
            pids.append(int(entry.name))
    return pids


def start_engine(
    model_dir: Path,
    *,
    cpu_core: int,
    log_path: Path,
    served_model_name: str,
    max_loras: int = 4,
    max_lora_rank: int = 16,
    extra_args: Sequence[str] = (),
    dtype: str = "bfloat16",
    extra_env: Mapping[str, str] | None = None,
    python: Path | None = None,
    timeout: float = START_TIMEOUT_S,
) -> RunningEngine:
    """Start one engine and wait for ``GET /health`` 200.

    Raises :class:`EngineLimitError` when it would exceed :data:`MAX_ENGINES` (or share a core),
    :class:`EngineStartError` (with the log tail) when it dies or is not healthy in ``timeout``.
    """
    interpreter = python if python is not None else engine_python()
    if interpreter is None:
        raise EngineStartError("the engine environment is not built (python -m lorry.engine_env build)")
    label = f"{served_model_name}@core{cpu_core}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        slot = _claim(label, cpu_core)
        try:
            engine = _launch(
                interpreter,
                Path(model_dir),
                cpu_core=cpu_core,
                log_path=log_path,
                served_model_name=served_model_name,
                max_loras=max_loras,
                max_lora_rank=max_lora_rank,
                dtype=dtype,
                extra_args=extra_args,
                extra_env=extra_env,
            )
            with _lock:  # the engine now counts itself; the slot is no longer needed
                _engines.append(engine)
        finally:
            _release(slot)
        try:
            _wait_healthy(engine, timeout)
            engine.pin()  # any thread started before _launch's pin took effect
        except EngineStartError:
            engine.stop()
            if attempt < 2 and "address already in use" in engine.log_text().lower():
                continue  # lost the race for the port: try another one
            raise
        started_engines.append((label, engine.start_seconds))
        return engine
    raise AssertionError("unreachable")


def _launch(
    python: Path,
    model_dir: Path,
    *,
    cpu_core: int,
    log_path: Path,
    served_model_name: str,
    max_loras: int,
    max_lora_rank: int,
    dtype: str,
    extra_args: Sequence[str],
    extra_env: Mapping[str, str] | None,
) -> RunningEngine:
    port = free_port()
    argv = engine_command(
        python,
        model_dir,
        port=port,
        served_model_name=served_model_name,
        max_loras=max_loras,
        max_lora_rank=max_lora_rank,
        dtype=dtype,
        extra_args=extra_args,
    )
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=engine_environ(cpu_core, extra_env),
            cwd=str(log_path.parent),
            start_new_session=True,  # own process group: stop() reaches the engine core too
        )
    # Before the interpreter has imported anything, so every process and thread vLLM starts
    # inherits the core (see RunningEngine.pin).
    os.sched_setaffinity(process.pid, {cpu_core})
    return RunningEngine(
        url=f"http://127.0.0.1:{port}",
        port=port,
        log_path=log_path,
        process=process,
        model_dir=model_dir,
        served_model_name=served_model_name,
        cpu_core=cpu_core,
        argv=tuple(argv),
    )


def _wait_healthy(engine: RunningEngine, timeout: float) -> None:
    started = time.monotonic()
    deadline = started + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            code = engine.process.poll()
            if code is not None:
                raise EngineStartError(
                    f"engine {engine.served_model_name} exited with code {code} before becoming "
                    f"healthy; log {engine.log_path}:\n{engine.log_tail()}"
                )
            try:
                if client.get(f"{engine.url}/health").status_code == 200:
                    engine.start_seconds = time.monotonic() - started
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() >= deadline:
                raise EngineStartError(
                    f"engine {engine.served_model_name} not healthy after {timeout:.0f} s; "
                    f"log {engine.log_path}:\n{engine.log_tail()}"
                )
            time.sleep(0.25)
