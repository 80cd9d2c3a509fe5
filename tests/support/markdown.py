"""Read code out of the project's Markdown, so tests run exactly what the docs show."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def section(markdown: str, heading: str) -> str:
    """The text under `heading` (e.g. `## Usage`) up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = markdown.splitlines(keepends=True)
    try:
        start = [line.rstrip() for line in lines].index(heading)
    except ValueError:
        raise LookupError(f"no heading {heading!r}") from None
    body = []
    in_fence = False
    for line in lines[start + 1 :]:
        if line.startswith("```"):
            in_fence = not in_fence
        marks = len(line) - len(line.lstrip("#"))
        if not in_fence and 0 < marks <= level and line[marks : marks + 1] == " ":
            break
        body.append(line)
    return "".join(body)


def code_blocks(markdown: str, language: str) -> list[str]:
    """The contents of every fenced block tagged `language`, in order."""
    return [match.group(2) for match in _FENCE.finditer(markdown) if match.group(1) == language]


def readme_block(heading: str, language: str, path: Path = REPO / "README.md") -> str:
    """The one `language` block under `heading`: a section growing a second block fails loudly."""
    blocks = code_blocks(section(path.read_text(encoding="utf-8"), heading), language)
    if len(blocks) != 1:
        raise LookupError(f"{path.name} {heading!r}: {len(blocks)} {language} blocks, expected one")
    return blocks[0]
