"""`lorry up` as a user runs it: the real console script in a fresh directory (DESIGN §10).

One test, two starts of the same directory (each starts a real vLLM CPU engine, pinned to core 1
so the shared test engine keeps core 0). It checks what a user relies on:

- stdout carries the five labelled lines, in order, each a plain line, and nothing else (server
  logs go to stderr);
- the printed curl command works as printed (`bash -c`), the printed Base URL and Key work with
  the `openai` SDK (plain and streaming), and the CLI in that directory is logged in;
- Ctrl-C (SIGINT) stops everything within 15 s: no process of the stack remains and every port
  (data, admin, ops, engine) can be bound again;
- the next start reuses the state: the same deployment id, an admin token and key that work;
- `.lorry/secrets.json` and `.lorry/credentials.json` are readable by their owner only.

A fast test (no engine, on SQLite and PostgreSQL) covers the state kept between starts: the demo
deployment and key are reused, and a key revoked since the last start is replaced.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import openai
import pytest

from lorry.client import AsyncCloudApiClient
from lorry.local_stack import SCOPE, EnginePlan, ensure_demo
from tests.conftest import ADMIN_TOKEN as INSTALL_TOKEN
from tests.engines import engine_slot, free_port

REPO = Path(__file__).resolve().parent.parent
LORRY = REPO / ".venv" / "bin" / "lorry"
LORRY_UP_CORE = 1
FIRST_LINES_TIMEOUT_S = 120.0
SERVING_TIMEOUT_S = 480.0
STOP_TIMEOUT_S = 15.0
LABELS = ("Admin API:", "Admin token:", "Base URL:", "Key:")
ADMIN_TOKEN = re.compile(r"lorry_admin_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}")
DEPLOYMENT_KEY = re.compile(r"lorry_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}")


@dataclass
class Printed:
    admin_api: str
    admin_token: str
    base_url: str
    key: str
    curl: str


@dataclass
class UpProcess:
    """A running `lorry up`: its stdout is read line by line by a thread, stderr goes to a file."""

    process: subprocess.Popen[str]
    stderr_path: Path
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.process.stdout is not None
        threading.Thread(target=self._pump, args=(self.process.stdout,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self, deadline: float, waiting_for: str) -> str:
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {waiting_for} line in time; stderr:\n{self.stderr_tail()}") from None
        if line is None:
            raise AssertionError(
                f"lorry up ended (exit {self.process.poll()}) before the {waiting_for} line; "
                f"stdout so far {self.seen}; stderr:\n{self.stderr_tail()}"
            )
        self.seen.append(line)
        return line

    def rest_of_stdout(self, timeout: float = 5.0) -> list[str]:
        rest: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("stdout did not close after lorry up exited") from None
            if line is None:
                return rest
            rest.append(line)

    def stderr_tail(self, lines: int = 40) -> str:
        text = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def labelled(line: str, label: str) -> str:
    """`<label><spaces><value>\n`: one plain line (no colour codes, no wrapping), the value after."""
    assert line.endswith("\n"), repr(line)
    text = line[:-1]
    assert "\x1b" not in text and "\r" not in text, repr(line)
    assert text.startswith(label), f"expected a {label!r} line, got {line!r}"
    value = text[len(label) :]
    assert value.startswith(" ") and value.strip() and " " not in value.strip(), repr(line)
    return value.strip()


def read_five_lines(up: UpProcess) -> Printed:
    deadline = time.monotonic() + FIRST_LINES_TIMEOUT_S
    admin_api = labelled(up.next_line(deadline, "Admin API"), "Admin API:")
    admin_token = labelled(up.next_line(deadline, "Admin token"), "Admin token:")
    deadline = time.monotonic() + SERVING_TIMEOUT_S  # the engine starts meanwhile
    base_url = labelled(up.next_line(deadline, "Base URL"), "Base URL:")
    key = labelled(up.next_line(deadline, "Key"), "Key:")
    curl = up.next_line(deadline, "curl")
    assert curl.startswith("curl ") and curl.endswith("\n") and "\n" not in curl[:-1], repr(curl)
    assert "\x1b" not in curl
    return Printed(admin_api, admin_token, base_url, key, curl[:-1])


def start_up(
    directory: Path, env: dict[str, str], ports: dict[str, int], run: int, extra_args: tuple[str, ...] = ()
) -> UpProcess:
    stderr_path = directory.parent / f"lorry-up-{run}.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [
                str(LORRY),
                "up",
                "--port",
                str(ports["data"]),
                "--admin-port",
                str(ports["admin"]),
                "--ops-port",
                str(ports["ops"]),
                *extra_args,
            ],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            bufsize=1,
        )
    return UpProcess(process, stderr_path)


# -- processes -----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # state ppid pgrp ...


def live_pids() -> dict[int, list[str]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z":
                found[int(entry.name)] = fields
    return found


def descendants(root: int) -> set[int]:
    """Every live process below `root` (children, grandchildren, …)."""
    children: dict[int, list[int]] = {}
    for pid, fields in live_pids().items():
        children.setdefault(int(fields[1]), []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def engine_port(pids: set[int]) -> int:
    """The vLLM API server among `lorry up`'s children, and the port it was told to use."""
    for pid in pids:
        argv = cmdline(pid)
        if "vllm.entrypoints.openai.api_server" in argv and "--port" in argv:
            return int(argv[argv.index("--port") + 1])
    raise AssertionError(f"no vLLM API server among the children of lorry up: {sorted(pids)}")


def referencing(directory: Path, port: int) -> list[str]:
    """Live processes that run in `directory`, name it, or serve the engine's port."""
    needle = str(directory)
    hits = []
    for pid in live_pids():
        if pid == os.getpid():
            continue
        argv = cmdline(pid)
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        port_arg = any(a == "--port" and b == str(port) for a, b in itertools.pairwise(argv))
        if cwd.startswith(needle) or any(needle in arg for arg in argv) or port_arg:
            hits.append(f"{pid} cwd={cwd} {' '.join(argv)[:200]}")
    return hits


def bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def stop_with_sigint(up: UpProcess, directory: Path, ports: dict[str, int], run: int) -> list[str]:
    """Ctrl-C: the process exits within 15 s and leaves nothing behind; returns the stdout after
    the five lines (which must be empty)."""
    pid = up.process.pid
    stack = descendants(pid)
    port = engine_port(stack)
    ports = {**ports, "engine": port}
    assert not bindable(port), "the engine's port should be in use while lorry up runs"
    started = time.monotonic()
    up.process.send_signal(signal.SIGINT)
    try:
        code = up.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        up.process.kill()
        raise AssertionError(
            f"lorry up (run {run}) still running {STOP_TIMEOUT_S:.0f} s after SIGINT"
        ) from None
    elapsed = time.monotonic() - started
    print(f"\nlorry up run {run}: exited {code} {elapsed:.1f} s after SIGINT")
    rest = up.rest_of_stdout()
    # Everything it started is gone (not merely orphaned): the engine's whole process group too.
    deadline = time.monotonic() + 2.0
    while (left := stack & set(live_pids())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes of lorry up survive SIGINT: {[' '.join(cmdline(p)) for p in left]}"
    assert not referencing(directory, port), referencing(directory, port)
    busy = {name: p for name, p in ports.items() if not bindable(p)}
    assert not busy, f"ports still bound after lorry up stopped: {busy}"
    assert code in (0, -signal.SIGINT, 128 + signal.SIGINT), f"exit code {code}:\n{up.stderr_tail()}"
    return rest


def kill_leftovers(up: UpProcess) -> None:
    """After a failure: Ctrl-C, then SIGKILL to `lorry up` and to every process group below it
    (the engine runs in its own session and would otherwise outlive a killed `lorry up`)."""
    if up.process.poll() is not None:
        return
    stack = descendants(up.process.pid)
    up.process.send_signal(signal.SIGINT)
    try:
        up.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stack |= descendants(up.process.pid)
        up.process.kill()
        up.process.wait()
    for pid in stack:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# -- using what it printed -------------------------------------------------------------------------


def lorry_cli(directory: Path, env: dict[str, str], *args: str) -> Any:
    completed = subprocess.run(
        [str(LORRY), *args, "--json"], cwd=directory, env=env, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, f"lorry {' '.join(args)}: {completed.stderr}"
    return json.loads(completed.stdout)


def check_printed(printed: Printed, ports: dict[str, int]) -> None:
    assert printed.admin_api == f"http://127.0.0.1:{ports['admin']}"
    assert ADMIN_TOKEN.fullmatch(printed.admin_token), printed.admin_token[:20]
    assert printed.base_url == f"http://127.0.0.1:{ports['data']}/d/demo/v1"
    assert DEPLOYMENT_KEY.fullmatch(printed.key), printed.key[:10]
    assert printed.key in printed.curl and printed.base_url in printed.curl


def check_serving(printed: Printed) -> None:
    completed = subprocess.run(
        ["bash", "-c", printed.curl], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    answer = json.loads(completed.stdout)
    assert answer["object"] == "chat.completion", answer
    assert answer["model"] == "demo", answer
    assert answer["usage"]["completion_tokens"] >= 1, answer

    client = openai.OpenAI(base_url=printed.base_url, api_key=printed.key, timeout=120.0, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "Say something."}]
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=8)
    assert reply.model == "demo"
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    assert reply.choices[0].message.content

    pieces: list[str] = []
    models = set()
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, stream=True)
    for chunk in stream:
        models.add(chunk.model)
        pieces.extend(choice.delta.content or "" for choice in chunk.choices)
    assert models == {"demo"}
    assert "".join(pieces), "the stream carried no tokens"

    # And a wrong key is refused: the key printed is what opens the deployment.
    refused = httpx.post(
        f"{printed.base_url}/chat/completions",
        json={"messages": messages, "max_tokens": 1},
        headers={"authorization": "Bearer " + printed.key[:-1] + ("A" if printed.key[-1] != "A" else "B")},
        timeout=30.0,
    )
    assert refused.status_code == 401, refused.text


def check_private(directory: Path) -> None:
    for name in ("secrets.json", "credentials.json"):
        mode = stat.S_IMODE((directory / ".lorry" / name).stat().st_mode)
        assert mode == 0o600, f".lorry/{name} has mode {oct(mode)}"


@pytest.mark.vllm
def test_lorry_up_prints_serves_stops_and_restarts(
    engine_python_path: Path, demo_model_dir: Path, engine_cache_dir: Path, tmp_path: Path
) -> None:
    assert LORRY.exists(), f"{LORRY} is missing: run `make venv`"
    directory = tmp_path / "project"
    home = tmp_path / "home"
    directory.mkdir()
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "LORRY_CACHE_DIR": str(engine_cache_dir),
        "VLLM_CPU_OMP_THREADS_BIND": str(LORRY_UP_CORE),
    }
    cli_env = {key: value for key, value in env.items() if not key.startswith(("LORRY_", "VLLM_"))}
    ports = {"data": free_port(), "admin": free_port(), "ops": free_port()}
    assert len(set(ports.values())) == 3

    with engine_slot("lorry-up", cpu_core=LORRY_UP_CORE):
        # -- first start: creates the demo job, deployment and key --------------------------------
        started = time.monotonic()
        up = start_up(directory, env, ports, 1)
        try:
            first = read_five_lines(up)
            print(f"\nlorry up run 1: five lines after {time.monotonic() - started:.1f} s")
            check_printed(first, ports)
            check_serving(first)
            check_private(directory)
            listed = lorry_cli(directory, cli_env, "deployments", "list")
            assert [d["slug"] for d in listed] == ["demo"], listed
            deployment = lorry_cli(directory, cli_env, "deployments", "get", "demo")
            assert deployment["baseUrl"] == first.base_url
            rest = stop_with_sigint(up, directory, ports, 1)
        finally:
            kill_leftovers(up)
        assert rest == [], f"stdout carried more than the five lines: {rest}"
        assert len(up.seen) == 5, up.seen

        # -- second start in the same directory: the same state --------------------------------
        started = time.monotonic()
        up = start_up(directory, env, ports, 2)
        try:
            second = read_five_lines(up)
            print(f"lorry up run 2: five lines after {time.monotonic() - started:.1f} s")
            check_printed(second, ports)
            assert second.admin_token == first.admin_token
            assert second.key == first.key
            check_serving(second)
            again = lorry_cli(directory, cli_env, "deployments", "get", "demo")
            assert again["id"] == deployment["id"]
            assert [d["id"] for d in lorry_cli(directory, cli_env, "deployments", "list")] == [
                deployment["id"]
            ]
            check_private(directory)
            rest = stop_with_sigint(up, directory, ports, 2)
        finally:
            kill_leftovers(up)
        assert rest == [], f"stdout carried more than the five lines: {rest}"

    # The secrets are printed on stdout for the user, and never written to a log.
    logs = [up_err.read_text(errors="replace") for up_err in tmp_path.glob("lorry-up-*.stderr")]
    logs.append((directory / ".lorry" / "engine.log").read_text(errors="replace"))
    for text in logs:
        assert first.key not in text and first.admin_token not in text


async def test_demo_state_is_reused_and_a_revoked_key_replaced(control_plane: Any, tmp_path: Path) -> None:
    plan = EnginePlan(
        url="http://127.0.0.1:9",
        model_id="lorry/tiny-llama",
        served_model_name="lorry/tiny-llama",
        max_lora_rank=16,
        demo_adapter=None,
    )
    state = tmp_path / ".lorry"
    state.mkdir()
    transport = httpx.ASGITransport(app=control_plane)
    async with AsyncCloudApiClient("http://admin.lorry.test", INSTALL_TOKEN, transport=transport) as client:
        access = await ensure_demo(client, {"adminToken": INSTALL_TOKEN}, plan, state)
        first = access.key
        assert DEPLOYMENT_KEY.fullmatch(first) and access.slug == "demo"
        saved = json.loads((state / "secrets.json").read_text())
        assert saved["demoKey"] == first
        assert stat.S_IMODE((state / "secrets.json").stat().st_mode) == 0o600
        [deployment] = await client.list_deployments(SCOPE)
        assert deployment.slug == "demo" and saved["demoDeploymentId"] == deployment.id

        # The next start: the same deployment and key, nothing new created.
        assert await ensure_demo(client, dict(saved), plan, state) == access
        [key] = await client.list_deployment_keys(deployment.id, SCOPE)

        # Revoked with the CLI in between: the next start makes a new key for the same deployment.
        await client.revoke_deployment_key(deployment.id, key.id, SCOPE)
        replaced = (await ensure_demo(client, dict(saved), plan, state)).key
        assert replaced != first and DEPLOYMENT_KEY.fullmatch(replaced)
        assert json.loads((state / "secrets.json").read_text())["demoKey"] == replaced
        assert [d.id for d in await client.list_deployments(SCOPE)] == [deployment.id]
        listed = await client.list_deployment_keys(deployment.id, SCOPE)
        assert sorted(k.enabled for k in listed) == [False, True]

        # Deleted by hand: slugs are never reused, so the next start makes `demo-2`, and the one
        # after that keeps it.
        saved = json.loads((state / "secrets.json").read_text())
        await client.delete_deployment(deployment.id, SCOPE)
        again = await ensure_demo(client, dict(saved), plan, state)
        assert again.slug == "demo-2" and again.key != replaced and DEPLOYMENT_KEY.fullmatch(again.key)
        [recreated] = await client.list_deployments(SCOPE)
        assert recreated.slug == "demo-2"
        saved = json.loads((state / "secrets.json").read_text())
        assert saved["demoDeploymentId"] == recreated.id and saved["demoKey"] == again.key
        assert await ensure_demo(client, dict(saved), plan, state) == again


@pytest.mark.vllm
def test_lorry_up_with_engine_url_serves_the_running_engine_and_leaves_it_running(
    vllm_engine: Any, engine_cache_dir: Path, tmp_path: Path
) -> None:
    """`--engine-url`: no engine is started; `demo` serves the running engine's base model."""
    directory = tmp_path / "project"
    home = tmp_path / "home"
    directory.mkdir()
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "LORRY_CACHE_DIR": str(engine_cache_dir),
    }
    ports = {"data": free_port(), "admin": free_port(), "ops": free_port()}
    up = start_up(directory, env, ports, 1, ("--engine-url", vllm_engine.url))
    try:
        printed = read_five_lines(up)
        check_printed(printed, ports)
        check_serving(printed)
        assert descendants(up.process.pid) == set(), "no engine process may be started with --engine-url"
        up.process.send_signal(signal.SIGINT)
        assert up.process.wait(timeout=15) == 0
    finally:
        kill_leftovers(up)
    assert all(bindable(port) for port in ports.values())
    assert vllm_engine.healthy(), "lorry up must leave an engine it did not start running"


@pytest.mark.vllm
def test_lorry_up_with_model_serves_a_local_model_directory(
    demo_model_dir: Path, engine_cache_dir: Path, tmp_path: Path
) -> None:
    """`--model DIR`: a supervised engine serves that directory; `demo` is a base-model deployment."""
    directory = tmp_path / "project"
    home = tmp_path / "home"
    directory.mkdir()
    home.mkdir()
    model = tmp_path / "my-model"
    shutil.copytree(demo_model_dir / "base", model)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "LORRY_CACHE_DIR": str(engine_cache_dir),
        "VLLM_CPU_OMP_THREADS_BIND": str(LORRY_UP_CORE),
    }
    cli_env = {key: value for key, value in env.items() if not key.startswith(("LORRY_", "VLLM_"))}
    ports = {"data": free_port(), "admin": free_port(), "ops": free_port()}
    with engine_slot("lorry-up-model", cpu_core=LORRY_UP_CORE):
        up = start_up(directory, env, ports, 3, ("--model", str(model)))
        try:
            printed = read_five_lines(up)
            check_printed(printed, ports)
            check_serving(printed)
            deployment = lorry_cli(directory, cli_env, "deployments", "get", "demo")
            assert deployment["target"] == {"kind": "base_model", "baseModel": "my-model"}, deployment
            stop_with_sigint(up, directory, ports, 3)
        finally:
            kill_leftovers(up)
