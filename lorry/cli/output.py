"""Rendering results: rich tables for people, `--json` (JSON alone on stdout) for scripts."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import orjson
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

JsonOption = typer.Option("--json", help="Print JSON alone on stdout.")


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def emit_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(_plain(value), option=orjson.OPT_INDENT_2).decode() + "\n")
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, BaseModel | dict | list):
        return orjson.dumps(_plain(value)).decode()
    return str(value)


def emit(value: Any, *, as_json: bool, columns: Sequence[str], title: str | None = None) -> None:
    """A list of models as a table, or one model as a two-column table, or JSON."""
    if as_json:
        emit_json(value)
        return
    console = Console(soft_wrap=True)
    rows = value if isinstance(value, list) else [value]
    data = [_plain(row) for row in rows]
    if isinstance(value, list):
        table = Table(title=title)
        for column in columns:
            table.add_column(column)
        for row in data:
            table.add_row(*(_cell(row.get(column)) for column in columns))
    else:
        table = Table(show_header=False, title=title)
        table.add_column("field", style="bold")
        table.add_column("value")
        for column in columns:
            table.add_row(column, _cell(data[0].get(column)))
    console.print(table)


def secret_line(label: str, value: str) -> None:
    """Plaintext credentials are printed once, unwrapped, so they can be copied or parsed."""
    sys.stdout.write(f"{label}: {value}\n")
    sys.stdout.flush()


def note(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
