"""docker/: hadolint-clean Dockerfiles whose runtime stage is non-root, health-checked and starts a real
console script; the CPU engine image follows the engine environment's recipe (DESIGN §10)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from lorry import engine_env
from tests.deploy import support
from tests.deploy.support import ENGINE_DOCKERFILE, LORRY_DOCKERFILE, REPO, Instruction, parse_dockerfile

DOCKERFILES = [LORRY_DOCKERFILE, ENGINE_DOCKERFILE]


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(item.stage for item in instructions)
    return [item for item in instructions if item.stage == last]


def last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [item for item in instructions if item.keyword == keyword]
    assert found, f"no {keyword}"
    return found[-1]


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    return dict(
        item.args.split("=", 1) for item in instructions if item.keyword == "ARG" and "=" in item.args
    )


def base_image(instructions: list[Instruction], stage: int) -> str:
    (item,) = [i for i in instructions if i.keyword == "FROM" and i.stage == stage]
    image = item.args.split()[0]
    for name, value in build_args(instructions).items():
        image = image.replace("${" + name + "}", value)
    return image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = support.require_binary("hadolint", str(REPO / ".venv" / "bin" / "hadolint"))
    completed = support.run([hadolint, "--no-color", str(dockerfile)], timeout=60)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_hadolint_is_sharp(tmp_path: Path) -> None:
    hadolint = support.require_binary("hadolint", str(REPO / ".venv" / "bin" / "hadolint"))
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\n", encoding="utf-8")
    assert support.run([hadolint, "--no-color", str(bad)], timeout=60).returncode != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_is_non_root_and_health_checked(dockerfile: Path) -> None:
    stage = final_stage(parse_dockerfile(dockerfile))
    user = last(stage, "USER").args.split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name} runs as {user}"
    healthcheck = last(stage, "HEALTHCHECK")
    words = healthcheck.exec_form()
    assert words, f"{dockerfile.name}: HEALTHCHECK CMD in exec form"
    # The checker is a file this stage installs.
    installed = {item.args.split()[-1].rsplit("/", 1)[-1] for item in stage if item.keyword == "COPY"}
    assert words[0] in installed, f"{words[0]} is not installed by the runtime stage"
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\S+", words[-1])


def test_lorry_cmd_names_a_real_console_script() -> None:
    stage = final_stage(parse_dockerfile(LORRY_DOCKERFILE))
    cmd = last(stage, "CMD").exec_form()
    assert cmd is not None and not [item for item in stage if item.keyword == "ENTRYPOINT"]
    assert cmd[0] in support.console_scripts()
    support.check_cli_argv(cmd)
    # The image's default health check probes the port the default command opens.
    healthcheck = last(stage, "HEALTHCHECK").exec_form()
    assert healthcheck is not None
    assert healthcheck[-1] == f"http://127.0.0.1:{support.flag_values(cmd)['--port']}/readyz"


def test_lorry_image_pins_the_tools_the_repository_pins() -> None:
    instructions = parse_dockerfile(LORRY_DOCKERFILE)
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    uv_version = re.search(r"^UV_VERSION\s*:?=\s*(\S+)", makefile, re.M)
    assert uv_version
    assert base_image(instructions, 0) == f"ghcr.io/astral-sh/uv:{uv_version.group(1)}"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "requires-python"
    ]
    minor = re.search(r">=\s*(3\.\d+)", requires)
    assert minor
    for stage in (1, 2):
        assert base_image(instructions, stage).startswith(f"python:{minor.group(1)}-"), base_image(
            instructions, stage
        )
    # Both stages share one base image: the venv's interpreter path must exist in the runtime stage.
    assert base_image(instructions, 1) == base_image(instructions, 2)


def test_lorry_image_env_names_only_real_settings() -> None:
    from lorry.settings import LorrySettings

    fields = {f"LORRY_{name.upper()}" for name in LorrySettings.model_fields}
    for item in parse_dockerfile(LORRY_DOCKERFILE):
        if item.keyword == "ENV":
            names = {name for name in support.env_assignments(item.args) if name.startswith("LORRY_")}
            assert names <= fields, names - fields


@pytest.mark.parametrize(
    ("dockerfile", "ignore"),
    [
        (LORRY_DOCKERFILE, LORRY_DOCKERFILE.with_name("Dockerfile.dockerignore")),
        (ENGINE_DOCKERFILE, ENGINE_DOCKERFILE.with_name("engine-cpu.Dockerfile.dockerignore")),
    ],
    ids=["lorry", "engine-cpu"],
)
def test_build_context_holds_what_copy_needs(dockerfile: Path, ignore: Path) -> None:
    """The context (repository root) is filtered by <Dockerfile>.dockerignore: everything excluded,
    then re-included by `!` lines. Each COPY source must be re-included and exist."""
    rules = [line.strip() for line in ignore.read_text(encoding="utf-8").splitlines()]
    kept = [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]
    assert "**" in rules
    for item in parse_dockerfile(dockerfile):
        if item.keyword != "COPY" or "from" in item.flags():
            continue
        words = [word for word in item.args.split() if not word.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: missing"
            assert any(source == k or source.startswith(k + "/") for k in kept), f"{source} is ignored"


def test_engine_image_follows_the_engine_environment_recipe() -> None:
    instructions = parse_dockerfile(ENGINE_DOCKERFILE)
    runs = " ".join(item.args for item in instructions if item.keyword == "RUN")
    copies = [item.args.split() for item in instructions if item.keyword == "COPY"]
    (requirements,) = [words[-1] for words in copies if words[-2] == "engine/requirements.txt"]
    assert f"-r {requirements}" in runs
    assert "https://download.pytorch.org/whl/cpu" in build_args(instructions).values()
    uninstalled = re.search(r"pip uninstall -y ([\w\s-]+?)(?:&&|$)", runs)
    assert uninstalled and set(uninstalled.group(1).split()) == set(engine_env.UNINSTALL)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "requires-python"
    ]
    assert base_image(instructions, 0).startswith("python:" + requires.split(">=")[1].split(",")[0] + "-")
    stage = final_stage(instructions)
    entrypoint = last(stage, "ENTRYPOINT").exec_form()
    assert entrypoint == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    env: dict[str, str] = {}
    for item in stage:
        if item.keyword == "ENV":
            env |= support.env_assignments(item.args)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    cmd = last(stage, "CMD").exec_form()
    assert cmd is not None and "--enable-lora" in cmd
    assert last(stage, "HEALTHCHECK").exec_form() == [
        "engine-healthcheck",
        f"http://127.0.0.1:{support.flag_values(cmd)['--port']}/health",
    ]


def test_healthcheck_script_reports_status(tmp_path: Path) -> None:
    """docker/healthcheck.py: 0 on 2xx, 1 on an error status or no answer."""
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return

        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ok" else 503)
            self.send_header("content-length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = str(support.DOCKER / "healthcheck.py")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert support.run([sys.executable, script, f"{base}/ok"]).returncode == 0
        assert support.run([sys.executable, script, f"{base}/down"]).returncode == 1
    finally:
        server.shutdown()
        server.server_close()
    closed = support.free_port()
    assert (
        support.run([sys.executable, script, f"http://127.0.0.1:{closed}/ok", "--timeout", "2"]).returncode
        == 1
    )
