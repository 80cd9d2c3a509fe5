"""Every script in examples/ runs as written against a real stack (issue 6).

The stack: control plane and gateway in one process (`lorry.combined`, in a background thread)
on a fresh PostgreSQL database, path routing on and `baseUrl`s of the form
`http://127.0.0.1:<port>/d/<slug>/v1`, serving through the session's shared vLLM engine (a static
engine, as `LORRY_ENGINES` would give it). Each example runs as a subprocess with only what its
docstring says it needs (LORRY_TOKEN + LORRY_CLOUD_API_URL, or LORRY_BASE_URL + LORRY_API_KEY), in
an empty directory with an empty HOME.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorry.settings import LorrySettings
from tests.conftest import ADMIN_TOKEN, DEFAULT_SCOPE
from tests.engines import RunningEngine, free_port
from tests.support.databases import PostgresTemplate, SqliteTemplate

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
PYTHON = REPO / ".venv" / "bin" / "python"
DEPLOYMENT_KEY = re.compile(r"lorry_[0-9A-Za-z]{12}_[0-9A-Za-z]{49}")
MESSAGES = [{"role": "user", "content": "Tell me about the river and the old stone house."}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12, "min_tokens": 12}

EXAMPLE_TESTS: dict[str, tuple[str, ...]] = {
    "quickstart.py": ("test_quickstart_with_a_job_id", "test_quickstart_imports_a_directory"),
    "ci_publish.py": ("test_ci_publish_creates_then_moves_the_deployment",),
    "langchain_app.py": ("test_langchain_app",),
}
"""Each file of examples/ and the tests that run it."""

ran: set[str] = set()
"""Examples run (exit 0) in this session."""


# -- the stack ------------------------------------------------------------------------------------


@dataclass
class Stack:
    settings: LorrySettings
    port: int
    admin_port: int
    ops_port: int
    engine: RunningEngine
    import_root: Path
    error: BaseException | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def base_url(self, slug: str) -> str:
        return f"http://127.0.0.1:{self.port}/d/{slug}/v1"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorry-stack", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60.0
        with httpx.Client(timeout=2.0) as client:
            for url in (f"{self.admin_url}/readyz", f"http://127.0.0.1:{self.ops_port}/readyz"):
                while True:
                    assert self.error is None and self._thread.is_alive(), f"the stack died: {self.error!r}"
                    try:
                        if client.get(url).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, f"{url} not ready in time"
                    time.sleep(0.1)

    def _run(self) -> None:
        from lorry.combined import serve_control_plane_and_gateway

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve_control_plane_and_gateway(
                self.settings,
                host="127.0.0.1",
                port=self.port,
                admin_port=self.admin_port,
                ops_port=self.ops_port,
                stop=self._stop,
                install_signal_handlers=False,
            )

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30.0)
            assert not self._thread.is_alive(), "the stack did not stop"


@pytest.fixture(scope="module")
def stack(
    vllm_engine: RunningEngine,
    demo_model_dir: Path,
    engine_cache_dir: Path,
    db_templates: dict[str, PostgresTemplate | SqliteTemplate],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    # Never deleted during the session: the shared engine keeps reading registered adapter paths.
    store = tmp_path_factory.mktemp("examples-store").resolve()
    port, admin_port, ops_port = free_port(), free_port(), free_port()
    import_root = demo_model_dir / "adapters"
    settings = LorrySettings(
        database_url=db_templates["postgres"].fresh(),
        bootstrap_admin_token=ADMIN_TOKEN,
        adapter_store=store,
        import_roots=[import_root],
        path_routing=True,
        public_url_template=f"http://127.0.0.1:{port}/d/{{slug}}/v1",
        cache_dir=engine_cache_dir,  # the demo model's config.json: adapter shapes are checked
        max_lora_rank=16,
        shutdown_deadline_s=2.0,
        log_level="warning",
        engines=[
            {
                "name": "shared",
                "url": vllm_engine.url,
                "baseModel": vllm_engine.served_model_name,
                "servedModelName": vllm_engine.served_model_name,
                "adapterRoot": str(store),
                "maxLoras": 4,
                "maxLoraRank": 16,
            }
        ],
    )
    running = Stack(settings, port, admin_port, ops_port, vllm_engine, import_root)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def admin(stack: Stack) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=stack.admin_url, headers=headers, params=DEFAULT_SCOPE, timeout=60) as client:
        yield client


def call(client: httpx.Client, method: str, path: str, status: int, **kwargs: Any) -> dict[str, Any]:
    response = client.request(method, path, **kwargs)
    assert response.status_code == status, f"{method} {path}: {response.status_code} {response.text}"
    body: dict[str, Any] = response.json()
    return body


def import_job(admin: httpx.Client, stack: Stack, adapter: str) -> dict[str, Any]:
    body = {
        "name": f"{adapter}-job",
        "config": {},
        "source": {"kind": "directory", "path": str(stack.import_root / adapter)},
    }
    job: dict[str, Any] = call(admin, "POST", "/v1/jobs", 201, json=body)["job"]
    return job


def final_adapter_name(job: dict[str, Any]) -> str:
    """The engine-side name of a job's final adapter: its content id (DESIGN §8)."""
    [final] = [a for a in job["adapters"] if a["kind"] == "final"]
    return f"lora-{final['digest'][:16]}"


def chat(base_url: str, key: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(
        f"{base_url}/chat/completions", json={"messages": MESSAGES, **GREEDY}, headers=headers, timeout=120
    )


def engine_answer(engine: RunningEngine, model: str) -> str:
    response = httpx.post(
        f"{engine.url}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, **GREEDY},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


# -- running an example ---------------------------------------------------------------------------


@dataclass
class Run:
    stdout: str
    stderr: str
    returncode: int

    def value(self, label: str) -> str:
        """The text after `<label>:` on the one line that starts with it."""
        found = [line for line in self.stdout.splitlines() if line.startswith(f"{label}:")]
        assert len(found) == 1, f"expected one {label!r} line in:\n{self.stdout}"
        return found[0][len(label) + 1 :].strip()


def run_example(
    name: str, *args: str, env: dict[str, str], tmp_path: Path, expect_success: bool = True
) -> Run:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    started = time.monotonic()
    completed = subprocess.run(
        [str(PYTHON), str(EXAMPLES / name), *args],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    print(f"\n{name} {' '.join(args)}: exit {completed.returncode} in {time.monotonic() - started:.1f} s")
    run = Run(completed.stdout, completed.stderr, completed.returncode)
    if expect_success:
        assert completed.returncode == 0, f"{name} failed:\n{completed.stdout}\n{completed.stderr}"
        ran.add(name)
    return run


def admin_env(stack: Stack) -> dict[str, str]:
    return {"LORRY_TOKEN": ADMIN_TOKEN, "LORRY_CLOUD_API_URL": stack.admin_url}


def check_key_opens(base_url: str, key: str) -> str:
    """The key works at the base URL and nothing works without it; returns the greedy answer."""
    response = chat(base_url, key)
    assert response.status_code == 200, response.text
    assert chat(base_url, None).status_code == 401
    text = str(response.json()["choices"][0]["message"]["content"])
    assert text
    return text


# -- the examples ---------------------------------------------------------------------------------


def test_quickstart_with_a_job_id(stack: Stack, admin: httpx.Client, tmp_path: Path) -> None:
    job = import_job(admin, stack, "alpha")
    env = {**admin_env(stack), "LORRY_JOB_ID": job["id"]}
    run = run_example("quickstart.py", "--slug", "quickstart-job", env=env, tmp_path=tmp_path)

    assert run.value("Job").startswith(job["id"])
    base_url = run.value("Base URL")
    assert base_url == stack.base_url("quickstart-job")
    key = run.value("Key")
    assert DEPLOYMENT_KEY.fullmatch(key), run.stdout
    run.value("Reply")  # printed once (value() checks); may be empty: the random model can stop at once
    deployment_id = run.value("Deployment").split("(")[1].rstrip(")")
    deployment = call(admin, "GET", f"/v1/endpoints/{deployment_id}", 200)["deployment"]
    assert deployment["slug"] == "quickstart-job"
    assert deployment["authMode"] == "fixed_api_key"
    assert deployment["target"] == {"kind": "adapter", "adapter": {"kind": "final", "jobId": job["id"]}}
    # The printed key is the deployment's and serves the job's adapter, exactly as the engine does.
    assert check_key_opens(base_url, key) == engine_answer(stack.engine, final_adapter_name(job))


def test_quickstart_imports_a_directory(stack: Stack, admin: httpx.Client, tmp_path: Path) -> None:
    directory = stack.import_root / "gamma"
    run = run_example(
        "quickstart.py",
        "--import-dir",
        str(directory),
        "--slug",
        "quickstart-dir",
        env=admin_env(stack),
        tmp_path=tmp_path,
    )
    job_id = run.value("Job").split()[0]
    job = call(admin, "GET", f"/v1/jobs/{job_id}", 200)["job"]
    assert [a["rank"] for a in job["adapters"] if a["kind"] == "final"] == [16]
    assert run.value("Base URL") == stack.base_url("quickstart-dir")
    run.value("Reply")  # printed once (value() checks); may be empty: the random model can stop at once
    assert check_key_opens(stack.base_url("quickstart-dir"), run.value("Key")) == engine_answer(
        stack.engine, final_adapter_name(job)
    )


def adapter_archive(source: Path, target: Path, *, folder: str | None) -> Path:
    """A `.tar.gz` as a training run leaves it: the adapter's files at the root or in one folder."""
    with tarfile.open(target, "w:gz") as archive:
        for path in sorted(source.iterdir()):
            archive.add(path, arcname=f"{folder}/{path.name}" if folder else path.name)
    return target


def test_ci_publish_creates_then_moves_the_deployment(
    stack: Stack, admin: httpx.Client, tmp_path: Path
) -> None:
    first_archive = adapter_archive(stack.import_root / "alpha", tmp_path / "alpha.tar.gz", folder=None)
    second_archive = adapter_archive(stack.import_root / "beta", tmp_path / "beta.tar.gz", folder="output")
    model = stack.engine.served_model_name
    args = ("--slug", "ci-bot", "--model", model)

    first = run_example("ci_publish.py", str(first_archive), *args, env=admin_env(stack), tmp_path=tmp_path)
    base_url = stack.base_url("ci-bot")
    assert first.stdout.splitlines()[-1] == f"Base URL:   {base_url}"
    assert " created " in first.value("Deployment")
    first_job = call(admin, "GET", f"/v1/jobs/{first.value('Job').split()[0]}", 200)["job"]
    deployment_id = first.value("Deployment").split("(")[1].rstrip(")")
    deployment = call(admin, "GET", f"/v1/endpoints/{deployment_id}", 200)["deployment"]
    assert deployment["target"]["adapter"]["jobId"] == first_job["id"]
    key = call(admin, "POST", f"/v1/endpoints/{deployment_id}/keys", 201, json={"label": "ci"})["key"][
        "plaintext"
    ]
    before = check_key_opens(base_url, key)
    assert before == engine_answer(stack.engine, final_adapter_name(first_job))

    # The next run (another archive, a folder inside this time) moves the same deployment.
    env = {**admin_env(stack), "GITHUB_SHA": "0123456789abcdef0123"}
    second = run_example("ci_publish.py", str(second_archive), *args, env=env, tmp_path=tmp_path)
    assert second.stdout.splitlines()[-1] == f"Base URL:   {base_url}"
    assert second.value("Deployment") == f"ci-bot updated ({deployment_id})"
    second_job = call(admin, "GET", f"/v1/jobs/{second.value('Job').split()[0]}", 200)["job"]
    assert second_job["name"] == "ci-bot-0123456789ab"
    assert second_job["id"] != first_job["id"]
    deployments = call(admin, "GET", "/v1/endpoints", 200)["deployments"]
    assert [d["id"] for d in deployments if d["slug"] == "ci-bot"] == [deployment_id]
    moved = call(admin, "GET", f"/v1/endpoints/{deployment_id}", 200)["deployment"]
    assert moved["target"]["adapter"]["jobId"] == second_job["id"]
    # Same URL, same key, the new weights.
    after = check_key_opens(base_url, key)
    assert after == engine_answer(stack.engine, final_adapter_name(second_job)) != before


def test_langchain_app(stack: Stack, admin: httpx.Client, tmp_path: Path) -> None:
    job = import_job(admin, stack, "beta")
    target = {"kind": "adapter", "adapter": {"kind": "final", "jobId": job["id"]}}
    body = {"slug": "langchain-app", "target": target, "authMode": "fixed_api_key"}
    deployment = call(admin, "POST", "/v1/endpoints", 201, json=body)["deployment"]
    key = call(admin, "POST", f"/v1/endpoints/{deployment['id']}/keys", 201, json={"label": "app"})["key"]
    env = {"LORRY_BASE_URL": deployment["baseUrl"], "LORRY_API_KEY": key["plaintext"]}
    assert deployment["baseUrl"] == stack.base_url("langchain-app")

    run = run_example("langchain_app.py", "What is a river?", env=env, tmp_path=tmp_path)
    # Both lines printed once (value() checks); their text may be empty: the random demo model can
    # sample end-of-sequence first. (The quickstart tests compare what a key opens exactly.)
    run.value("Reply")
    run.value("Streamed reply")

    # It is the key that opens the deployment: a wrong one makes the app fail with a 401.
    wrong = {**env, "LORRY_API_KEY": key["plaintext"][:-1] + ("A" if key["plaintext"][-1] != "A" else "B")}
    refused = run_example("langchain_app.py", env=wrong, tmp_path=tmp_path, expect_success=False)
    assert refused.returncode != 0
    assert "401" in refused.stderr or "AuthenticationError" in refused.stderr, refused.stderr[-2000:]


def test_every_example_is_run(request: pytest.FixtureRequest) -> None:
    """Each file in examples/ has a test above, and that test ran it successfully in this session."""
    present = {
        path.relative_to(EXAMPLES).as_posix()
        for path in EXAMPLES.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".md"
    }
    assert present == set(EXAMPLE_TESTS), (
        f"examples without a test here: {sorted(present - set(EXAMPLE_TESTS))}"
    )
    here = Path(__file__).resolve()
    selected = {item.name for item in request.session.items if item.path.resolve() == here}
    if not {test for tests in EXAMPLE_TESTS.values() for test in tests} <= selected:
        pytest.skip("only part of this module was selected: cannot tell which examples ran")
    assert ran == present, f"examples never run successfully: {sorted(present - ran)}"
