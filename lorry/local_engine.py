"""A local vLLM CPU engine for `lorry up` and the tests: its command line, and a supervisor.

The engine runs in the separate engine environment (DESIGN §10); Lorry only starts it as a
process and talks to it over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

logger = logging.getLogger("lorry.local_engine")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
PR_SET_PDEATHSIG = 1


def engine_command(
    python: Path,
    model_dir: Path,
    *,
    port: int,
    served_model_name: str,
    max_loras: int,
    max_lora_rank: int,
    dtype: str,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
) -> list[str]:
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--host",
        host,
        "--port",
        str(port),
        "--model",
        str(model_dir),
        "--served-model-name",
        served_model_name,
        "--enable-lora",
        "--max-lora-rank",
        str(max_lora_rank),
        "--max-loras",
        str(max_loras),
        "--max-model-len",
        "4096",
        "--dtype",
        dtype,
        *extra_args,
    ]


def engine_environ(cpu_core: int | None = None, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The engine's environment: runtime LoRA on, a 1 GiB KV cache, offline, optionally pinned."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not key.startswith("PYTEST_")
    }
    env.update(
        {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if cpu_core is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu_core)
    if extra_env:
        env.update(extra_env)
    return env


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A pre-exec hook: if `lorry up` is killed outright, the kernel sends the engine SIGTERM.

    libc is loaded here, in the parent: loading a library between fork and exec can deadlock.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class SupervisedEngine:
    """Keeps one engine process alive: restarts it when it dies, stops its whole process group."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, url: str) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.url = url
        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        await self._spawn()
        self._watcher = asyncio.create_task(self._watch(), name="engine-supervisor")

    async def _spawn(self) -> None:
        assert self._log is not None
        self._process = await asyncio.create_subprocess_exec(
            *self.argv,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches the workers too
            preexec_fn=_die_with_parent_hook(),
        )

    async def _watch(self) -> None:
        while not self._stopping:
            assert self._process is not None
            code = await self._process.wait()
            if self._stopping:
                return
            delay = RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]
            logger.warning("engine exited with %s; restarting in %.0f s (see %s)", code, delay, self.log_path)
            self._kill_group(signal.SIGKILL)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            self.restarts += 1
            await self._spawn()

    async def wait_healthy(self, timeout_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while asyncio.get_running_loop().time() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                await asyncio.sleep(0.5)
        raise TimeoutError(
            f"the engine at {self.url} was not healthy within {timeout_s:.0f} s; see {self.log_path}"
        )

    def _kill_group(self, sig: signal.Signals) -> None:
        if self._process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, sig)

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._process is not None:
            self._kill_group(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), timeout_s)
            # Workers may outlive the parent; the group kill reaches them either way.
            self._kill_group(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._process.wait(), 2.0)
        if self._log is not None:
            self._log.close()
