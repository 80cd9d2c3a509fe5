"""Compose-equivalent smoke test: deploy/compose.yaml's own services, run as local processes.

No Docker engine runs here, so each compose service becomes the process compose would start, with
the environment compose would give it (interpolated from deploy/.env.example):

- postgres: the test PostgreSQL (a fresh, empty database);
- migrate: its command (`lorry migrate`), then `lorry admin create-token … --database` as the
  operator guide says;
- control-plane and two gateway replicas: their commands, on free local ports;
- an engine: the shared vLLM CPU engine with the demo model (one engine in all), plus a stand-in
  engine that pauses mid-stream on demand;
- proxy: nginx with the very template compose mounts, rendered as the nginx image renders it. The
  only change is a second `server` line in the gateway upstream: in compose, the name `gateway`
  resolves to every replica, and there is no DNS to do that here.

Then, through the proxy, routed by Host under *.lorry.test: the admin API imports an adapter and
publishes a deployment with a key, and the `openai` SDK streams from it, chunk by chunk. A chunk
the stand-in sends and then pauses after reaches the SDK within 0.5 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from tests.deploy import support
from tests.engines import RunningEngine
from tests.support.databases import pg_execute, pg_url, postgres_unavailable

pytestmark = [pytest.mark.vllm, pytest.mark.postgres]

DOMAIN = "lorry.test"
LORRY = str(Path(sys.executable).with_name("lorry"))
STANDIN_MODEL = "standin/paused-model"
SCOPE = {"orgSlug": "default", "projectSlug": "default"}


# -- a stand-in engine that pauses mid-stream -------------------------------------------------------


@dataclass
class StandIn:
    """Answers like vLLM's OpenAI server for a base model; each stream sends its first content
    chunk, notes when, and waits for `release` before finishing."""

    server: ThreadingHTTPServer
    release: threading.Event = field(default_factory=threading.Event)
    first_sent_at: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def start_standin() -> StandIn:
    standin: StandIn

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _json(self, status: int, payload: Any) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                entry = {
                    "id": STANDIN_MODEL,
                    "object": "model",
                    "created": 0,
                    "owned_by": "vllm",
                    "root": "x",
                }
                self._json(200, {"object": "list", "data": [entry]})
            elif self.path == "/health":
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
            elif self.path == "/metrics":
                body = b"vllm:num_requests_waiting 0\n"
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self._json(404, {"error": {"message": "nope", "type": "NotFoundError", "code": 404}})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            request = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/v1/chat/completions" or not request.get("stream"):
                self._json(400, {"error": {"message": "stream only", "type": "BadRequestError", "code": 400}})
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()

            def event(payload: Any) -> None:
                data = (
                    b"data: "
                    + (payload if isinstance(payload, bytes) else json.dumps(payload).encode())
                    + b"\n\n"
                )
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
                return {
                    "id": "chatcmpl-standin",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": request.get("model"),
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                }

            event(chunk({"role": "assistant", "content": ""}))
            event(chunk({"content": "Hello"}))
            standin.first_sent_at.append(time.monotonic())
            standin.release.wait(10)
            event(chunk({"content": " world"}, "stop"))
            if (request.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
                event({**chunk({}), "choices": [], "usage": usage})
            event(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    standin = StandIn(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return standin


# -- routing test clients to the proxy by Host --------------------------------------------------------


class ToProxy(httpx.HTTPTransport):
    """Sends https://<anything>.lorry.test/… to the local proxy, with that name as Host and SNI."""

    def __init__(self, port: int, cert: Path) -> None:
        super().__init__(verify=ssl.create_default_context(cafile=str(cert)))
        self.port = port

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        assert host.endswith(f".{DOMAIN}"), host
        request.url = request.url.copy_with(host="127.0.0.1", port=self.port)
        request.extensions = {**request.extensions, "sni_hostname": host}
        return super().handle_request(request)


# -- the stack ---------------------------------------------------------------------------------------


@dataclass
class Stack:
    root: Path
    https_port: int
    cert: Path
    admin_token: str
    ops_ports: list[int]
    standin: StandIn
    store: Path
    imports: Path
    processes: dict[str, subprocess.Popen[bytes]]

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(transport=ToProxy(self.https_port, self.cert), timeout=60.0, **kwargs)

    def admin(self) -> httpx.Client:
        return self.http(
            base_url=f"https://admin.{DOMAIN}", headers={"authorization": f"Bearer {self.admin_token}"}
        )

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(encoding="utf-8", errors="replace")[-3000:]


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"{process.args!r} exited ({process.returncode}):\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} never answered 200:\n{log.read_text(errors='replace')[-3000:]}")


def _local(argv: list[str], **ports: int) -> list[str]:
    """A compose command run locally: the console script from this venv, loopback, free ports."""
    local = [LORRY if argv[0] == "lorry" else argv[0], *argv[1:]]
    if "--host" in local:
        local[local.index("--host") + 1] = "127.0.0.1"
    for flag, port in ports.items():
        option = "--" + flag.replace("_", "-")
        local[local.index(option) + 1] = str(port)
    return local


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    vllm_engine: RunningEngine,
    demo_model_dir: Path,
    demo_manifest: dict[str, Any],
) -> Iterator[Stack]:
    nginx = support.require_binary("nginx", "/usr/sbin/nginx")
    root = tmp_path_factory.mktemp("compose-smoke")
    store, imports = root / "adapters", root / "imports"
    imports.mkdir()
    standin = start_standin()
    database = f"lorry_smoke_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        pg_execute(f'CREATE DATABASE "{database}"')
    except Exception as exc:
        postgres_unavailable(f"{type(exc).__name__}: {exc}")
    processes: dict[str, subprocess.Popen[bytes]] = {}
    engines = [
        {
            "name": "cpu-0",
            "url": vllm_engine.url,
            "baseModel": demo_manifest["model_id"],
            "servedModelName": vllm_engine.served_model_name,
            "adapterRoot": str(store),
            "maxLoras": 4,
            "maxLoraRank": int(demo_manifest["max_lora_rank"]),
        },
        {"name": "standin", "url": standin.url, "baseModel": STANDIN_MODEL, "adapterRoot": str(store)},
    ]
    compose = support.compose_with(
        {**support.example_env(), "BASE_DOMAIN": DOMAIN, "LORRY_ENGINES": json.dumps(engines)}
    )
    services = compose["services"]

    def env_of(name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORRY_")}
        env |= support.environment_of(services[name])
        # Container paths and the database host become this machine's.
        env["LORRY_DATABASE_URL"] = pg_url(database)
        env["LORRY_ADAPTER_STORE"] = str(store)
        env["LORRY_IMPORT_ROOTS"] = str(imports)
        env["HOME"] = str(root)
        return env

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (root / f"{name}.log").open("wb")
        process = subprocess.Popen(
            argv, cwd=root, env=env_of(name.split("#")[0]), stdout=log, stderr=subprocess.STDOUT
        )
        processes[name] = process
        return process

    try:
        # migrate, then the first install token as the operator guide mints it.
        migrate = support.command_of(services["migrate"]["command"])
        done = support.run(_local(migrate), cwd=root, env=env_of("migrate"), timeout=120)
        assert done.returncode == 0, done.stderr
        minted = support.run(
            [LORRY, "admin", "create-token", "--kind", "install", "--label", "smoke", "--database", "--json"],
            cwd=root,
            env=env_of("migrate"),
            timeout=60,
        )
        assert minted.returncode == 0, minted.stderr
        token = json.loads(minted.stdout)["token"]

        control_port = support.free_port()
        start(
            "control-plane",
            _local(support.command_of(services["control-plane"]["command"]), port=control_port),
        )
        gateway_ports, ops_ports = [], []
        for index in range(2):
            port, ops = support.free_port(), support.free_port()
            argv = _local(support.command_of(services["gateway"]["command"]), port=port, ops_port=ops)
            start(f"gateway#{index}", argv)
            gateway_ports.append(port)
            ops_ports.append(ops)
        _wait_http(
            f"http://127.0.0.1:{control_port}/readyz", processes["control-plane"], root / "control-plane.log"
        )
        for index, ops in enumerate(ops_ports):
            _wait_http(
                f"http://127.0.0.1:{ops}/readyz", processes[f"gateway#{index}"], root / f"gateway#{index}.log"
            )

        # The proxy, from the template compose mounts.
        proxy_env = support.environment_of(services["proxy"])
        cert, key = _self_signed(root)
        https_port, http_port = support.free_port(), support.free_port()
        env = {
            **proxy_env,
            "PROXY_HTTP_PORT": f"127.0.0.1:{http_port}",
            "PROXY_HTTPS_PORT": f"127.0.0.1:{https_port}",
            "PROXY_TLS_CERTIFICATE": str(cert),
            "PROXY_TLS_CERTIFICATE_KEY": str(key),
            "PROXY_GATEWAY": f"127.0.0.1:{gateway_ports[0]}",
            "PROXY_CONTROL_PLANE": f"127.0.0.1:{control_port}",
        }
        assert env["PROXY_BASE_DOMAIN"] == DOMAIN
        rendered = support.render_template(
            support.PROXY_TEMPLATE.read_text(encoding="utf-8"),
            env,
            re.compile(proxy_env["NGINX_ENVSUBST_FILTER"]),
        )
        line = f"    server 127.0.0.1:{gateway_ports[0]};\n"
        assert rendered.count(line) == 1
        rendered = rendered.replace(line, line + f"    server 127.0.0.1:{gateway_ports[1]};\n")
        (root / "lorry.conf").write_text(rendered, encoding="utf-8")
        temp = "\n".join(
            f"    {n}_temp_path {root / n};" for n in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (root / "nginx.conf").write_text(
            f"pid {root / 'nginx.pid'};\nworker_processes 1;\nevents {{ worker_connections 256; }}\n"
            f"http {{\n    access_log off;\n{temp}\n    include {root / 'lorry.conf'};\n}}\n",
            encoding="utf-8",
        )
        nginx_argv = [
            nginx,
            "-p",
            str(root),
            "-c",
            str(root / "nginx.conf"),
            "-e",
            str(root / "nginx-error.log"),
        ]
        start("proxy", [*nginx_argv, "-g", "daemon off;"])
        _wait_port(https_port, processes["proxy"], root / "nginx-error.log")

        # The demo adapter, as a fine-tuning output directory the control plane may import.
        alpha = next(a for a in demo_manifest["adapters"] if a["name"] == "alpha")
        shutil.copytree(demo_model_dir / alpha["path"], imports / "run-alpha")
        yield Stack(root, https_port, cert, token, ops_ports, standin, store, imports, processes)
    finally:
        standin.release.set()
        for process in reversed(list(processes.values())):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        standin.server.shutdown()
        standin.server.server_close()
        pg_execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def _self_signed(directory: Path) -> tuple[Path, Path]:
    openssl = support.require_binary("openssl")
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    completed = support.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
         "-out", str(cert), "-subj", f"/CN=*.{DOMAIN}", "-addext", f"subjectAltName=DNS:*.{DOMAIN}"]
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    return cert, key


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"nginx exited ({process.returncode}):\n{log.read_text(errors='replace')}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"nginx did not listen:\n{log.read_text(errors='replace')}")


def _wait_until_served(stack: Stack, host: str, headers: dict[str, str]) -> None:
    """Configuration reaches the gateways through the change feed; wait for both to know `host`."""
    deadline = time.monotonic() + 10
    with stack.http() as client:
        while True:
            codes = [client.get(f"https://{host}/v1/models", headers=headers).status_code for _ in range(4)]
            if codes == [200] * 4:
                return
            assert time.monotonic() < deadline, f"{host}: {codes}"
            time.sleep(0.2)


def _gateway_requests(ops_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{ops_port}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lorry_gateway_requests_total{")
    )


def test_a_deployment_streams_through_proxy_and_gateways(stack: Stack) -> None:
    with stack.admin() as admin:
        job = admin.post(
            "/v1/jobs",
            params=SCOPE,
            json={
                "name": "alpha",
                "config": {"model": "lorry/tiny-llama"},
                "source": {"kind": "directory", "path": str(stack.imports / "run-alpha")},
            },
        )
        assert job.status_code == 201, job.text
        job_id = job.json()["job"]["id"]
        created = admin.post(
            "/v1/endpoints",
            params=SCOPE,
            json={
                "slug": "smoke",
                "target": {"kind": "adapter", "adapter": {"kind": "final", "jobId": job_id}},
            },
        )
        assert created.status_code == 201, created.text
        deployment = created.json()["deployment"]
        assert deployment["baseUrl"] == f"https://smoke.{DOMAIN}/v1"
        assert deployment["status"] == "ready", deployment
        key = admin.post(f"/v1/endpoints/{deployment['id']}/keys", params=SCOPE, json={"label": "smoke"})
        assert key.status_code == 201, key.text
        plaintext = key.json()["key"]["plaintext"]

    before = [_gateway_requests(port) for port in stack.ops_ports]
    _wait_until_served(stack, f"smoke.{DOMAIN}", {"authorization": f"Bearer {plaintext}"})
    after = [_gateway_requests(port) for port in stack.ops_ports]
    assert all(b > a for a, b in zip(before, after, strict=True)), f"both gateways serve: {before} → {after}"

    with stack.http() as http:
        # The SDK types http_client as its httpx2 fork but accepts an httpx.Client as well.
        sdk = OpenAI(base_url=deployment["baseUrl"], api_key=plaintext, http_client=http, max_retries=0)  # type: ignore[arg-type]
        stream = sdk.chat.completions.create(
            model="anything",
            messages=[{"role": "user", "content": "Tell me about foxes."}],
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body={"min_tokens": 24},
        )
        chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) >= 5, f"{len(chunks)} chunks: {chunks[:3]}"
    assert {c.model for c in chunks} == {"smoke"}
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "length"
    print(f"streamed {len(texts)} content chunks from the real engine through nginx and a gateway")


def test_a_paused_chunk_arrives_within_half_a_second(stack: Stack) -> None:
    with stack.admin() as admin:
        created = admin.post(
            "/v1/endpoints",
            params=SCOPE,
            json={
                "slug": "paused",
                "target": {"kind": "base_model", "baseModel": STANDIN_MODEL},
                "authMode": "none",
            },
        )
        assert created.status_code == 201, created.text
        base_url = created.json()["deployment"]["baseUrl"]
    _wait_until_served(stack, f"paused.{DOMAIN}", {})
    stack.standin.release.clear()
    stack.standin.first_sent_at.clear()
    with stack.http() as http:
        sdk = OpenAI(base_url=base_url, api_key="unused", http_client=http, max_retries=0)  # type: ignore[arg-type]
        stream = sdk.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        received: list[str] = []
        delay = None
        for chunk in stream:
            content = chunk.choices[0].delta.content if chunk.choices else None
            if content:
                received.append(content)
                if content == "Hello":
                    assert stack.standin.first_sent_at and not stack.standin.release.is_set()
                    delay = time.monotonic() - stack.standin.first_sent_at[-1]
                    stack.standin.release.set()
            assert chunk.model == "paused"
    assert received == ["Hello", " world"]
    assert delay is not None
    print(f"paused chunk reached the SDK {delay * 1000:.0f} ms after the stand-in sent it")
    assert delay < 0.5
