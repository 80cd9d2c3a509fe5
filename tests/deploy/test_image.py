"""Replays the Lorry image's build stage (docker/Dockerfile) in a fresh venv, then uses the result as
the runtime stage would: `lorry --help`, both servers import from the venv (not the checkout),
`lorry migrate` finds its migrations, and the image's own CMD serves until its HEALTHCHECK passes.

No Docker engine runs here. The replay follows the Dockerfile itself: every COPY of the build stage
copies the same files into a scratch root (so a file the image forgets to COPY is missing here too),
and every RUN runs the same `docker/install.sh` with the container paths mapped under that root.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy import support
from tests.deploy.support import LORRY_DOCKERFILE, REPO, Instruction, parse_dockerfile

INSTALL_SCRIPT = "docker/install.sh"


@dataclass(frozen=True)
class Installed:
    root: Path  # the scratch filesystem root ("/" of the build stage)
    venv: Path  # what the runtime stage copies from the build stage

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def _stage_of_install(instructions: list[Instruction]) -> int:
    stages = {item.stage for item in instructions if item.keyword == "RUN" and INSTALL_SCRIPT in item.args}
    assert len(stages) == 1, "docker/install.sh runs in exactly one stage"
    return stages.pop()


def _mapped(root: Path, path: str, workdir: str) -> Path:
    absolute = path if path.startswith("/") else f"{workdir.rstrip('/')}/{path}"
    return root / absolute.lstrip("/")


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(
            source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _uv() -> str:
    return support.require_binary("uv", str(Path.home() / ".local" / "bin" / "uv"))


def replay_build_stage(root: Path) -> Path:
    """Runs the build stage's COPY/ENV/WORKDIR/RUN steps under `root`; returns the venv it built."""
    instructions = parse_dockerfile(LORRY_DOCKERFILE)
    stage = _stage_of_install(instructions)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "UV_"))}
    env["UV"] = _uv()
    workdir = "/"
    venvs = []
    for item in (i for i in instructions if i.stage == stage):
        if item.keyword == "WORKDIR":
            workdir = item.args
            _mapped(root, workdir, "/").mkdir(parents=True, exist_ok=True)
        elif item.keyword == "ENV":
            env |= support.env_assignments(item.args)
        elif item.keyword == "COPY":
            assert "from" not in item.flags() or item.flags()["from"] == "uv", item.args
            if "from" in item.flags():
                continue  # the uv binary: the test uses the same version (test_dockerfiles pins it)
            words = [word for word in item.args.split() if not word.startswith("--")]
            *sources, destination = words
            for source in sources:
                target = _mapped(root, destination, workdir)
                if destination.endswith("/"):
                    target = target / Path(source).name
                _copy(REPO / source, target)
        elif item.keyword == "RUN":
            argv = [word for word in shlex.split(item.args) if not word.startswith("--mount=")]
            assert argv[0] == "sh" and argv[1].endswith(f"/{INSTALL_SCRIPT}"), (
                f"every RUN of the build stage is the install script (line {item.line}): {item.args}"
            )
            script, source, venv, *rest = argv[1:]
            mapped = [str(_mapped(root, script, workdir)), str(_mapped(root, source, workdir))]
            mapped.append(str(_mapped(root, venv, workdir)))
            venvs.append(venv)
            completed = subprocess.run(
                ["sh", *mapped, *rest],
                cwd=_mapped(root, workdir, "/"),
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert completed.returncode == 0, f"RUN at line {item.line} failed:\n{completed.stderr[-4000:]}"
    assert venvs and len(set(venvs)) == 1
    # The runtime stage copies that very directory.
    runtime = [i for i in instructions if i.stage == max(x.stage for x in instructions)]
    copied = [
        i.args.split()[-2:] for i in runtime if i.keyword == "COPY" and i.flags().get("from") == "build"
    ]
    assert [venvs[0], venvs[0]] in copied, "the runtime stage copies the venv the build stage made"
    return _mapped(root, venvs[0], "/")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("image-root")
    started = time.monotonic()
    venv = replay_build_stage(root)
    print(f"build stage replayed in {time.monotonic() - started:.1f} s")
    return Installed(root, venv)


def clean_env(**extra: str) -> dict[str, str]:
    """An environment like the container's: no LORRY_ settings, no path to the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORRY_", "PYTHON", "VIRTUAL_ENV"))}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", **extra}


def test_lorry_help_runs(installed: Installed, tmp_path: Path) -> None:
    completed = support.run([str(installed.bin("lorry")), "--help"], cwd=tmp_path, env=clean_env())
    assert completed.returncode == 0, completed.stderr
    assert "serve" in completed.stdout and "migrate" in completed.stdout


def test_both_servers_import_from_the_image_venv(installed: Installed, tmp_path: Path) -> None:
    probe = (
        "import control_plane.app, gateway.app, gateway.server, lorry\n"
        "print(control_plane.app.__file__); print(gateway.app.__file__); print(lorry.__file__)\n"
    )
    completed = support.run([str(installed.bin("python")), "-c", probe], cwd=tmp_path, env=clean_env())
    assert completed.returncode == 0, completed.stderr
    for line in completed.stdout.split():
        assert Path(line).is_relative_to(installed.venv), f"{line} is not from the image's venv"


def test_no_dev_dependencies_in_the_image(installed: Installed, tmp_path: Path) -> None:
    completed = support.run(
        [str(installed.bin("python")), "-c", "import importlib.util as u; print([m for m in "
         "('pytest', 'mypy', 'ruff', 'hypothesis', 'openai', 'torch', 'vllm') if u.find_spec(m)])"],
        cwd=tmp_path, env=clean_env(),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


@dataclass
class Served:
    port: int
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def served_cmd(installed: Installed, tmp_path: Path) -> Iterator[Served]:
    """`lorry migrate`, then the image's CMD (on a free port) against a fresh SQLite database."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'lorry.db'}"
    env = clean_env(LORRY_DATABASE_URL=database, LORRY_ADAPTER_STORE=str(tmp_path / "adapters"))
    migrated = support.run([str(installed.bin("lorry")), "migrate"], cwd=tmp_path, env=env)
    assert migrated.returncode == 0, migrated.stderr
    runtime = [i for i in parse_dockerfile(LORRY_DOCKERFILE) if i.stage == 2]
    cmd = next(i for i in reversed(runtime) if i.keyword == "CMD").exec_form()
    assert cmd is not None
    port = support.free_port()
    argv = [str(installed.bin(cmd[0])), *cmd[1:]]
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--host") + 1] = "127.0.0.1"
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield Served(port, process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def test_image_cmd_serves_until_its_healthcheck_passes(installed: Installed, served_cmd: Served) -> None:
    runtime = [i for i in parse_dockerfile(LORRY_DOCKERFILE) if i.stage == 2]
    check = next(i for i in reversed(runtime) if i.keyword == "HEALTHCHECK").exec_form()
    assert check is not None
    url = check[-1].replace(":8081/", f":{served_cmd.port}/")
    script = str(support.DOCKER / "healthcheck.py")
    deadline = time.monotonic() + 60
    while True:
        if served_cmd.process.poll() is not None:
            pytest.fail(f"the CMD exited ({served_cmd.process.returncode}):\n{served_cmd.log.read_text()}")
        completed = support.run([str(installed.bin("python")), script, url], timeout=10)
        if completed.returncode == 0:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"health check never passed: {completed.stderr}\n{served_cmd.log.read_text()}")
        time.sleep(0.3)
    served_cmd.process.send_signal(signal.SIGTERM)
    assert served_cmd.process.wait(15) == 0, served_cmd.log.read_text()
