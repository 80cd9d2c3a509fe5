"""Readers for the self-hosting files (compose, .env, Dockerfiles, nginx, kustomize). Not a test module."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKER = REPO / "docker"
COMPOSE_FILE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / ".env.example"
PROXY_TEMPLATE = DEPLOY / "proxy" / "lorry.conf.template"
KUSTOMIZE_DIR = DEPLOY / "kubernetes"
LORRY_DOCKERFILE = DOCKER / "Dockerfile"
ENGINE_DOCKERFILE = DOCKER / "engine-cpu.Dockerfile"
VENDORED_COMPOSE_SCHEMA = Path(__file__).resolve().parent / "compose-spec.json"
SHARED_COMPOSE_SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> NoReturn:
    """Skip, or fail under CI=true (DESIGN §13: in CI a missing kubectl or proxy is a failure)."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing dependency is a failure)", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str, *fallbacks: str) -> str:
    for candidate in (name, *fallbacks):
        found = shutil.which(candidate) if "/" not in candidate else candidate
        if found and Path(found).is_file() and os.access(found, os.X_OK):
            return found
    missing(f"{name} is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run(argv: list[str], *, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


# -- .env files and compose interpolation -----------------------------------------------------------

_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def _env_value(raw: str) -> str:
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return re.split(r"\s+#", raw, maxsplit=1)[0].strip()


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines, as compose reads them (quotes stripped; comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if match:
            values[match.group(1)] = _env_value(match.group(2))
    return values


def commented_alternatives(path: Path, name: str) -> list[str]:
    """Values of `# NAME=…` lines: documented alternatives a test checks as carefully as the default."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(rf"^\s*#\s*{re.escape(name)}=(.*)$", line)
        if match:
            found.append(_env_value(match.group(1)))
    return found


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    pass


@dataclass
class Interpolator:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, $$."""

    env: Mapping[str, str]
    used: set[str] = field(default_factory=set)

    def string(self, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            if match.group("escaped"):
                return "$"
            name = match.group("braced") or match.group("bare")
            self.used.add(name)
            value = self.env.get(name)
            op, arg = match.group("op"), match.group("arg") or ""
            if op in (":-", "-"):
                unset = value is None or (op == ":-" and value == "")
                return self.string(arg) if unset else str(value)
            if op in (":?", "?"):
                if value is None or (op == ":?" and value == ""):
                    raise InterpolationError(f"{name}: {arg}")
                return value
            if op in (":+", "+"):
                present = value is not None and (op == "+" or value != "")
                return self.string(arg) if present else ""
            return "" if value is None else value

        return _INTERPOLATION.sub(replace, text)

    def tree(self, node: Any) -> Any:
        if isinstance(node, str):
            return self.string(node)
        if isinstance(node, list):
            return [self.tree(item) for item in node]
        if isinstance(node, dict):
            return {key: self.tree(value) for key, value in node.items()}
        return node


def referenced_variables(text: str) -> set[str]:
    """Every variable name a compose file interpolates (defaults included)."""
    names = set()
    for match in _INTERPOLATION.finditer(text):
        name = match.group("braced") or match.group("bare")
        if name:
            names.add(name)
        arg = match.group("arg")
        if arg:
            names |= referenced_variables(arg)
    return names


def compose_raw() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    return loaded


def compose_with(env: Mapping[str, str]) -> dict[str, Any]:
    resolved: dict[str, Any] = Interpolator(env).tree(compose_raw())
    return resolved


def example_env() -> dict[str, str]:
    """deploy/.env.example with its required secrets filled in, as an operator would."""
    env = parse_env_file(ENV_EXAMPLE)
    env["POSTGRES_PASSWORD"] = env.get("POSTGRES_PASSWORD") or "0123456789abcdef"
    return env


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment`, as a mapping (the list form `KEY=value` included)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def command_of(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(item) for item in value]


def flag_values(argv: list[str]) -> dict[str, str]:
    """`--name=value` and `--name value` flags; a bare flag maps to ''."""
    flags: dict[str, str] = {}
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("--"):
            if "=" in arg:
                name, value = arg.split("=", 1)
                flags[name] = value
            elif index + 1 < len(argv) and not argv[index + 1].startswith("--"):
                flags[arg] = argv[index + 1]
                index += 1
            else:
                flags[arg] = ""
        index += 1
    return flags


def mounts_of(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Volumes in long form: {type, source, target, read_only}."""
    mounts = []
    for item in service.get("volumes") or []:
        if isinstance(item, dict):
            mounts.append(
                {
                    "type": item.get("type", "volume"),
                    "source": item.get("source"),
                    "target": item["target"],
                    "read_only": bool(item.get("read_only", False)),
                }
            )
            continue
        parts = str(item).split(":")
        source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
        options = parts[2].split(",") if len(parts) > 2 else []
        kind = "bind" if source and (source.startswith((".", "/", "~", "$"))) else "volume"
        mounts.append({"type": kind, "source": source, "target": target, "read_only": "ro" in options})
    return mounts


# -- Dockerfiles --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON-array form's words, or None for the shell form."""
        text = re.sub(r"^(?:--[a-z-]+=\S+\s+)+", "", self.args.strip())
        if self.keyword == "HEALTHCHECK":
            text = re.sub(r"^CMD\s+", "", text)
        if text.startswith("["):
            words = json.loads(text)
            return [str(word) for word in words]
        return None

    def flags(self) -> dict[str, str]:
        return dict(re.findall(r"--([a-z-]+)=(\S+)", self.args.split("[", 1)[0]))


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped; `stage` counts FROMs."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, " ".join(args.split()), stage, start))
    return instructions


def stage_names(instructions: list[Instruction]) -> dict[int, str]:
    names = {}
    for item in instructions:
        if item.keyword == "FROM":
            words = item.args.split()
            names[item.stage] = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(item.stage)
    return names


def env_assignments(args: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` → {A: 1, B: x y}."""
    return dict(word.split("=", 1) for word in shlex.split(args) if "=" in word)


# -- nginx --------------------------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None
    parent: Directive | None = field(default=None, repr=False)

    def children(self, name: str) -> list[Directive]:
        return [child for child in self.block or [] if child.name == name]

    def walk(self) -> Iterator[Directive]:
        for child in self.block or []:
            yield child
            yield from child.walk()


_NGINX_TOKEN = re.compile(r"""\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|([{};])|([^\s{};"']+))""")


def parse_nginx(text: str) -> Directive:
    """An nginx configuration as a tree; the returned root stands for the enclosing http{} block."""
    root = Directive("http", [], [])
    stack = [root]
    words: list[str] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _NGINX_TOKEN.match(text, position)
        if not match or match.end() == position:
            raise ValueError(
                f"cannot parse nginx configuration at offset {position}: {text[position : position + 40]!r}"
            )
        position = match.end()
        comment, quoted, punct, word = match.groups()
        if comment:
            continue
        if quoted is not None:
            words.append(quoted[1:-1])
        elif word is not None:
            words.append(word)
        elif punct == ";":
            if not words:
                raise ValueError("empty directive")
            current = stack[-1]
            assert current.block is not None
            current.block.append(Directive(words[0], words[1:], None, current))
            words = []
        elif punct == "{":
            current = stack[-1]
            assert current.block is not None
            block = Directive(words[0], words[1:], [], current)
            current.block.append(block)
            stack.append(block)
            words = []
        elif punct == "}":
            if len(stack) == 1 or words:
                raise ValueError("unbalanced '}'")
            stack.pop()
    if len(stack) != 1 or words:
        raise ValueError("unterminated block or directive")
    return root


# Directives that nginx inherits as a whole array, and only when the inner level has none.
_ARRAY_DIRECTIVES = {"proxy_set_header", "add_header", "proxy_hide_header"}


def effective(location: Directive, name: str) -> list[list[str]]:
    """Every value of `name` in force in `location`, following nginx's inheritance."""
    level: Directive | None = location
    while level is not None:
        found = [child.args for child in level.children(name)]
        if found:
            return found if name in _ARRAY_DIRECTIVES else found[-1:]
        level = level.parent
    return []


def proxied_locations(root: Directive) -> list[Directive]:
    return [item for item in root.walk() if item.name == "location" and item.children("proxy_pass")]


def enclosing_server(directive: Directive) -> Directive:
    level = directive.parent
    while level is not None and level.name != "server":
        level = level.parent
    assert level is not None, "a location outside a server"
    return level


def nginx_seconds(value: str) -> float:
    """nginx time syntax: 600, 600s, 10m, 1h, 1m30s, 500ms."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    total = 0.0
    parts = re.findall(r"(\d+)(ms|s|m|h|d)?", value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        raise ValueError(f"not an nginx time: {value!r}")
    for number, unit in parts:
        total += int(number) * units[unit or "s"]
    return total


def nginx_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    if not match:
        raise ValueError(f"not an nginx size: {value!r}")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]
    return int(match.group(1)) * scale


def duration_seconds(value: str) -> float:
    """Compose's Go-style durations: 45s, 1m30s, 1h, 500ms."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(number) * units[unit] for number, unit in parts)


_TEMPLATE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render_template(text: str, env: Mapping[str, str], allowed: re.Pattern[str]) -> str:
    """What the nginx image's envsubst step does: replace ${NAME} for defined names the filter allows."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if allowed.search(name) and name in env:
            return env[name]
        return match.group(0)

    return _TEMPLATE_VARIABLE.sub(replace, text)


def template_variables(text: str) -> set[str]:
    return set(_TEMPLATE_VARIABLE.findall(text))


# -- kustomize ----------------------------------------------------------------------------------------


def kustomize_render(kubectl: str) -> list[dict[str, Any]]:
    completed = run([kubectl, "kustomize", str(KUSTOMIZE_DIR)], timeout=120)
    assert completed.returncode == 0, completed.stderr
    return [doc for doc in yaml.safe_load_all(completed.stdout) if doc]


# -- the lorry CLI ------------------------------------------------------------------------------------


def console_scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml: name → "module:function"."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    scripts: dict[str, str] = project.get("scripts", {})
    return scripts


def check_cli_argv(argv: list[str]) -> None:
    """Parse `argv` (e.g. ["lorry", "serve", "gateway", "--port", "8080"]) with the real CLI, without
    running it: raises AssertionError naming the problem when a command or option does not exist or
    a value does not convert. (Typer vendors its own click, so groups are recognised by shape.)"""
    import importlib

    import typer
    import typer.main

    scripts = console_scripts()
    assert argv, "empty command"
    assert argv[0] in scripts, f"{argv[0]!r} is not a console script of pyproject.toml ({sorted(scripts)})"
    module_name, _, function = scripts[argv[0]].partition(":")
    entry = getattr(importlib.import_module(module_name), function)
    owner = importlib.import_module(entry.__module__)
    typer_app = getattr(owner, "app", None)
    assert isinstance(typer_app, typer.Typer), f"{entry.__module__} has no typer app"
    command: Any = typer.main.get_command(typer_app)
    args = list(argv[1:])
    path = [argv[0]]
    context: Any = None
    while True:
        try:
            context = command.make_context(path[-1], list(args), parent=context)
        except Exception as exc:  # the vendored click's UsageError/BadParameter
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            raise AssertionError(f"{' '.join(argv)}: {message}") from exc
        if not hasattr(command, "commands"):
            return
        assert args, f"{' '.join(path)} needs a subcommand"
        name = args.pop(0)
        sub = command.get_command(context, name)
        assert sub is not None, f"{' '.join(path)} has no command {name!r}"
        path.append(name)
        command = sub
