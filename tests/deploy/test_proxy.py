"""deploy/proxy/lorry.conf.template: the one reverse-proxy configuration compose mounts (DESIGN §11).

Static checks read the file the way nginx does (directive inheritance included); live checks render
it exactly as the nginx image does (PROXY_* variables only), run the real nginx binary on it, and
put stand-in upstreams behind it: Host routing, Host kept, forwarded-host headers dropped,
HTTP/1.1 upstream, redirect to HTTPS, unknown names refused, and a streamed chunk relayed while the
upstream is still paused.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorry.serving import KEEP_ALIVE_S
from lorry.settings import LorrySettings
from tests.deploy import support
from tests.deploy.support import PROXY_TEMPLATE, Directive, effective, environment_of

TEMPLATE_TARGET = re.compile(r"^/etc/nginx/templates/[^/]+\.conf\.template$")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = support.compose_with(support.example_env())["services"]
    return found


@pytest.fixture(scope="module")
def proxy_env(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    return environment_of(services["proxy"])


@pytest.fixture(scope="module")
def config(proxy_env: dict[str, str]) -> Directive:
    """The configuration as compose's nginx container sees it."""
    text = PROXY_TEMPLATE.read_text(encoding="utf-8")
    allowed = re.compile(proxy_env["NGINX_ENVSUBST_FILTER"])
    return support.parse_nginx(support.render_template(text, proxy_env, allowed))


def gateway_setting(services: dict[str, dict[str, Any]], name: str) -> float:
    """A gateway setting as compose sets it (else the settings default)."""
    env = environment_of(services["gateway"])
    key = f"LORRY_{name.upper()}"
    if key in env:
        return float(env[key])
    return float(LorrySettings.model_fields[name].default)


def locations_by_upstream(config: Directive) -> dict[str, Directive]:
    found = {}
    for location in support.proxied_locations(config):
        target = location.children("proxy_pass")[0].args[0]
        found[target.removeprefix("http://")] = location
    return found


# -- how compose wires the file --------------------------------------------------------------------


def test_compose_mounts_this_template(services: dict[str, dict[str, Any]]) -> None:
    raw = support.compose_raw()["services"]["proxy"]
    mounts = [m for m in support.mounts_of(raw) if m["source"] == "./proxy/lorry.conf.template"]
    assert len(mounts) == 1 and mounts[0]["read_only"]
    assert TEMPLATE_TARGET.match(mounts[0]["target"])
    assert services["proxy"]["image"].startswith("nginx:")


def test_template_variables_are_set_by_compose(proxy_env: dict[str, str]) -> None:
    text = PROXY_TEMPLATE.read_text(encoding="utf-8")
    variables = support.template_variables(text)
    assert variables, "the template has no variables"
    assert all(name.startswith("PROXY_") for name in variables), variables
    assert variables <= set(proxy_env), f"not set by compose: {variables - set(proxy_env)}"
    allowed = re.compile(proxy_env["NGINX_ENVSUBST_FILTER"])
    assert all(allowed.search(name) for name in variables)
    # envsubst also replaces bare $NAME: nginx's own variables must never match the filter.
    nginx_variables = set(re.findall(r"\$([a-z_][a-z0-9_]*)", text))
    assert nginx_variables and not any(allowed.search(name) for name in nginx_variables)
    rendered = support.render_template(text, proxy_env, allowed)
    assert "${" not in rendered


# -- what the gateway needs from a proxy ---------------------------------------------------------------


def test_every_proxied_location_keeps_host_and_streams(config: Directive) -> None:
    locations = support.proxied_locations(config)
    assert len(locations) == 2
    for location in locations:
        where = " ".join(support.enclosing_server(location).children("server_name")[0].args)
        assert effective(location, "proxy_http_version") == [["1.1"]], where
        headers = {
            args[0].lower(): args[1] if len(args) > 1 else ""
            for args in effective(location, "proxy_set_header")
        }
        assert headers.get("host") in ("$host", "$http_host"), f"{where}: Host must be passed through"
        assert headers.get("connection") == "", f"{where}: clear Connection for upstream keep-alive"
        assert headers.get("x-forwarded-host") == "" and headers.get("forwarded") == "", where
        assert effective(location, "proxy_buffering") == [["off"]], where
        assert effective(location, "proxy_request_buffering") == [["off"]], where


def test_read_timeout_covers_the_gateway_timeouts(
    config: Directive, services: dict[str, dict[str, Any]]
) -> None:
    idle = gateway_setting(services, "upstream_idle_timeout_s")
    first_byte = gateway_setting(services, "upstream_first_byte_timeout_s")
    for location in support.proxied_locations(config):
        (timeout,) = effective(location, "proxy_read_timeout")
        seconds = support.nginx_seconds(timeout[0])
        assert seconds >= idle, f"proxy_read_timeout {seconds}s < LORRY_UPSTREAM_IDLE_TIMEOUT_S {idle}s"
        assert seconds >= first_byte, f"proxy_read_timeout {seconds}s < first-byte timeout {first_byte}s"
        (send,) = effective(location, "proxy_send_timeout")
        assert support.nginx_seconds(send[0]) >= idle


def test_nginx_closes_idle_upstream_connections_before_lorry_does(config: Directive) -> None:
    """A server closing an idle connection as the proxy reuses it for a POST gives the client a 502
    (nginx does not retry a non-idempotent request), so nginx must give up idle ones first."""
    upstreams = [child for child in config.walk() if child.name == "upstream"]
    assert {upstream.args[0] for upstream in upstreams} == {"lorry_gateway", "lorry_control_plane"}
    for upstream in upstreams:
        (timeout,) = upstream.children("keepalive_timeout")
        assert support.nginx_seconds(timeout.args[0]) < KEEP_ALIVE_S, upstream.args[0]


def test_hosts_route_to_the_right_upstream(config: Directive, proxy_env: dict[str, str]) -> None:
    domain = proxy_env["PROXY_BASE_DOMAIN"]
    by_upstream = locations_by_upstream(config)
    assert set(by_upstream) == {"lorry_gateway", "lorry_control_plane"}
    names = {
        upstream: support.enclosing_server(location).children("server_name")[0].args
        for upstream, location in by_upstream.items()
    }
    assert names["lorry_gateway"] == [f"*.{domain}"]
    assert names["lorry_control_plane"] == [f"admin.{domain}"]
    assert "admin" in LorrySettings.model_fields["reserved_slugs"].get_default(call_default_factory=True)
    upstreams = {block.args[0]: block for block in config.walk() if block.name == "upstream"}
    assert upstreams["lorry_gateway"].children("server")[0].args[0] == proxy_env["PROXY_GATEWAY"]
    assert upstreams["lorry_control_plane"].children("server")[0].args[0] == proxy_env["PROXY_CONTROL_PLANE"]
    for block in upstreams.values():
        assert block.children("keepalive"), "keep-alive connections to the upstreams"


def test_tls_everywhere(config: Directive, proxy_env: dict[str, str]) -> None:
    servers = [block for block in config.walk() if block.name == "server" and block.block is not None]
    https = proxy_env["PROXY_HTTPS_PORT"]
    for location in support.proxied_locations(config):
        server = support.enclosing_server(location)
        assert server.children("listen")[0].args[:2] == [https, "ssl"]
        assert server.children("ssl_certificate")[0].args == [proxy_env["PROXY_TLS_CERTIFICATE"]]
        assert server.children("ssl_certificate_key")[0].args == [proxy_env["PROXY_TLS_CERTIFICATE_KEY"]]
    plain = [s for s in servers if s.children("listen")[0].args[0] == proxy_env["PROXY_HTTP_PORT"]]
    assert len(plain) == 1 and plain[0].children("return")[0].args[0] == "308"
    assert not support.proxied_locations(plain[0])


def test_body_limits_leave_the_answer_to_lorry(config: Directive) -> None:
    """nginx's own limit sits above Lorry's, so clients get Lorry's 413 body, not nginx's HTML."""
    defaults = LorrySettings.model_fields
    by_upstream = locations_by_upstream(config)
    gateway = support.nginx_bytes(effective(by_upstream["lorry_gateway"], "client_max_body_size")[0][0])
    admin = support.nginx_bytes(effective(by_upstream["lorry_control_plane"], "client_max_body_size")[0][0])
    assert gateway > int(defaults["max_body_bytes"].default)
    assert admin > int(defaults["max_upload_bytes"].default)


def test_inheritance_reader_is_sharp() -> None:
    """A location with one proxy_set_header of its own drops the server's (nginx's rule)."""
    root = support.parse_nginx(
        "server { proxy_set_header Host $host; proxy_buffering off;"
        " location / { proxy_pass http://x; proxy_set_header X-A 1; } }"
    )
    (location,) = support.proxied_locations(root)
    assert effective(location, "proxy_set_header") == [["X-A", "1"]]
    assert effective(location, "proxy_buffering") == [["off"]]


# -- the real nginx ------------------------------------------------------------------------------------


@dataclass
class Seen:
    name: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


def _standin(seen: Seen) -> ThreadingHTTPServer:
    """An upstream that records requests. POST streams SSE: one chunk, a pause until released, the rest."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _record(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            seen.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "version": self.request_version,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
            )

        def do_GET(self) -> None:
            self._record()
            payload = json.dumps({"upstream": seen.name}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_POST(self) -> None:
            self._record()
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()

            def chunk(data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            chunk(b'data: {"n":0}\n\n')
            seen.release.wait(10)
            chunk(b'data: {"n":1}\n\n')
            chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class RunningProxy:
    http_port: int
    https_port: int
    cert: Path
    gateway: Seen
    control_plane: Seen

    def client(self) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.cert))
        return httpx.Client(verify=context, timeout=10.0)

    def https(self, host: str, path: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        return (
            f"https://127.0.0.1:{self.https_port}{path}",
            {"host": host},
            {"sni_hostname": host},
        )


def _self_signed(directory: Path, domain: str) -> tuple[Path, Path]:
    openssl = support.require_binary("openssl")
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    completed = support.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN=*.{domain}",
            "-addext", f"subjectAltName=DNS:*.{domain}",
        ]
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    return cert, key


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"nginx exited ({process.returncode}):\n{log.read_text(errors='replace')}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"nginx did not listen on {port}:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory, proxy_env: dict[str, str]) -> Iterator[RunningProxy]:
    binary = support.require_binary("nginx", "/usr/sbin/nginx")
    root = tmp_path_factory.mktemp("nginx")
    domain = "lorry.test"
    cert, key = _self_signed(root, domain)
    gateway, control_plane = Seen("gateway"), Seen("control-plane")
    upstreams = [_standin(gateway), _standin(control_plane)]
    http_port, https_port = support.free_port(), support.free_port()
    env = {
        **proxy_env,
        "PROXY_BASE_DOMAIN": domain,
        "PROXY_HTTP_PORT": f"127.0.0.1:{http_port}",
        "PROXY_HTTPS_PORT": f"127.0.0.1:{https_port}",
        "PROXY_TLS_CERTIFICATE": str(cert),
        "PROXY_TLS_CERTIFICATE_KEY": str(key),
        "PROXY_GATEWAY": f"127.0.0.1:{upstreams[0].server_address[1]}",
        "PROXY_CONTROL_PLANE": f"127.0.0.1:{upstreams[1].server_address[1]}",
    }
    assert set(env) == set(proxy_env), "the test sets exactly the variables compose sets"
    allowed = re.compile(proxy_env["NGINX_ENVSUBST_FILTER"])
    rendered = support.render_template(PROXY_TEMPLATE.read_text(encoding="utf-8"), env, allowed)
    (root / "lorry.conf").write_text(rendered, encoding="utf-8")
    # What the nginx image's own nginx.conf does around conf.d/*.conf, with paths under `root`.
    temp = "\n".join(
        f"    {name}_temp_path {root / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (root / "nginx.conf").write_text(
        f"pid {root / 'nginx.pid'};\nworker_processes 1;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n    access_log off;\n{temp}\n    include {root / 'lorry.conf'};\n}}\n",
        encoding="utf-8",
    )
    log = root / "error.log"
    argv = [binary, "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(log)]
    checked = support.run([*argv, "-t"])
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen(
        [*argv, "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_port(https_port, process, log)
        _wait_for_port(http_port, process, log)
        yield RunningProxy(http_port, https_port, cert, gateway, control_plane)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        for server in upstreams:
            server.shutdown()
            server.server_close()


def test_nginx_routes_deployment_hosts_to_the_gateway(nginx: RunningProxy) -> None:
    url, headers, extensions = nginx.https("support-bot.lorry.test", "/v1/models?x=1")
    spoof = {**headers, "x-forwarded-host": "admin.lorry.test", "forwarded": "host=admin.lorry.test"}
    with nginx.client() as client:
        response = client.get(url, headers=spoof, extensions=extensions)
    assert response.status_code == 200, response.text
    assert response.json() == {"upstream": "gateway"}
    seen = nginx.gateway.requests[-1]
    assert seen["path"] == "/v1/models?x=1"
    assert seen["version"] == "HTTP/1.1"
    assert seen["headers"]["host"] == "support-bot.lorry.test"
    assert "x-forwarded-host" not in seen["headers"] and "forwarded" not in seen["headers"]
    assert seen["headers"]["x-forwarded-proto"] == "https"
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"


def test_nginx_routes_the_admin_host_to_the_control_plane(nginx: RunningProxy) -> None:
    url, headers, extensions = nginx.https("admin.lorry.test", "/v1/me")
    before = len(nginx.gateway.requests)
    with nginx.client() as client:
        response = client.get(url, headers={**headers, "authorization": "Bearer x"}, extensions=extensions)
    assert response.json() == {"upstream": "control-plane"}
    seen = nginx.control_plane.requests[-1]
    assert seen["headers"]["host"] == "admin.lorry.test"
    assert seen["headers"]["authorization"] == "Bearer x"
    assert len(nginx.gateway.requests) == before


def test_nginx_redirects_plain_http(nginx: RunningProxy) -> None:
    response = httpx.post(
        f"http://127.0.0.1:{nginx.http_port}/v1/chat/completions",
        headers={"host": "demo.lorry.test"},
        content=b"{}",
        timeout=10.0,
    )
    assert response.status_code == 308
    assert response.headers["location"] == "https://demo.lorry.test/v1/chat/completions"


def test_nginx_refuses_names_outside_the_domain(nginx: RunningProxy) -> None:
    url, _headers, _extensions = nginx.https("example.org", "/")
    with nginx.client() as client, pytest.raises(httpx.ConnectError):
        client.get(url, headers={"host": "example.org"}, extensions={"sni_hostname": "example.org"})


def test_nginx_relays_a_stream_chunk_while_the_upstream_pauses(nginx: RunningProxy) -> None:
    """Buffering off, for real: the first SSE chunk reaches the client within 0.5 s although the
    upstream has not finished (with proxy_buffering on, nginx would hold it until the end)."""
    nginx.gateway.release.clear()
    url, headers, extensions = nginx.https("demo.lorry.test", "/v1/chat/completions")
    body = b'{"stream": true, "messages": []}'
    with nginx.client() as client:
        started = time.monotonic()
        with client.stream(
            "POST", url, headers={**headers, "content-type": "application/json"}, content=body,
            extensions=extensions,
        ) as response:  # fmt: skip
            assert response.status_code == 200
            chunks = response.iter_raw()
            first = next(chunks)
            elapsed = time.monotonic() - started
            paused = not nginx.gateway.release.is_set()
            nginx.gateway.release.set()
            rest = b"".join(chunks)
    print(f"first chunk through nginx after {elapsed * 1000:.0f} ms while the upstream paused")
    assert paused and first.startswith(b'data: {"n":0}')
    assert elapsed < 0.5
    assert rest.endswith(b"data: [DONE]\n\n") and b'data: {"n":1}' in rest
    assert nginx.gateway.requests[-1]["body"] == body
