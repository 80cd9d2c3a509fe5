"""docs/: the commands and settings the operator guide tells people to use exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gateway.options import ENV_FIELDS, GatewayOptions
from lorry.settings import LorrySettings
from tests.deploy import support
from tests.deploy.support import REPO

DOCS = sorted((REPO / "docs").glob("*.md"))
GUIDE = REPO / "docs" / "operator-guide.md"
# LORRY_ variables read by the CLI and tooling rather than by LorrySettings.
NOT_SETTINGS = {"LORRY_TOKEN", "LORRY_ORG", "LORRY_PROJECT", "LORRY_ENGINE_PIP_ARGS", "LORRY_TEST_PG_DSN"}
SHELL_OPERATORS = {"&&", "||", "|", ";", ">", "<"}


def code_lines(path: Path) -> list[str]:
    """Lines of fenced code blocks, with backslash continuations joined."""
    lines: list[str] = []
    inside = False
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append(pending + raw)
        pending = ""
    return lines


def lorry_commands(path: Path) -> list[list[str]]:
    commands = []
    for line in code_lines(path):
        text = re.sub(r"<[^<>]+>", "PLACEHOLDER", line)
        if text.lstrip().startswith("#"):
            text = text.split(":", 1)[1] if ":" in text else ""
        try:
            words = shlex.split(text, comments=True)
        except ValueError:
            continue
        for index, word in enumerate(words):
            if word == "lorry" and (index == 0 or words[index - 1] in ("--", "migrate", "sudo")):
                argv = words[index:]
                for end, token in enumerate(argv):
                    if token in SHELL_OPERATORS:
                        argv = argv[:end]
                        break
                commands.append(argv)
    return commands


def test_docs_exist() -> None:
    names = {path.name for path in DOCS}
    assert {"operator-guide.md", "architecture.md", "api-reference.md"} <= names


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_lorry_command_in_the_docs_parses(path: Path) -> None:
    for argv in lorry_commands(path):
        support.check_cli_argv(argv)


def test_the_guide_shows_the_commands_operators_need() -> None:
    shown = {" ".join(argv[:3]) for argv in lorry_commands(GUIDE)}
    for needed in ("lorry admin create-token", "lorry admin tokens", "lorry keys roll", "lorry audit list"):
        assert any(command.startswith(needed) for command in shown), needed


def test_every_lorry_variable_in_the_docs_is_a_setting() -> None:
    fields = {f"LORRY_{name.upper()}" for name in LorrySettings.model_fields} | set(ENV_FIELDS)
    for path in DOCS:
        named = set(re.findall(r"\bLORRY_[A-Z0-9_]+\b", path.read_text(encoding="utf-8")))
        assert named - fields - NOT_SETTINGS == set(), f"{path.name}: {named - fields - NOT_SETTINGS}"


def test_the_settings_reference_lists_every_setting() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    reference = text[text.index("## 11. Settings reference") :]
    listed = set(re.findall(r"^\| `(LORRY_[A-Z0-9_]+)`", reference, flags=re.M))
    fields = {f"LORRY_{name.upper()}" for name in LorrySettings.model_fields}
    assert fields - listed == set(), f"add to docs/operator-guide.md §11: {sorted(fields - listed)}"


def test_the_gateway_tunables_are_listed_with_their_defaults() -> None:
    text = GUIDE.read_text(encoding="utf-8")
    section = text[text.index("### Gateway tunables") :]
    rows = dict(re.findall(r"^\| `(LORRY_GATEWAY_[A-Z0-9_]+)` \| ([^|]+) \|", section, flags=re.M))
    assert set(rows) == set(ENV_FIELDS), f"docs/operator-guide.md: {set(rows) ^ set(ENV_FIELDS)}"
    options = GatewayOptions()
    for name, (target, caster) in ENV_FIELDS.items():
        value: object = options
        for part in target.split("."):
            value = getattr(value, part)
        assert caster(rows[name].strip().strip("`")) == value, (name, rows[name], value)
