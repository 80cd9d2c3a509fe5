"""Rendering results: rich tables for people, `--json` (JSON alone on stdout) for scripts."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

JsonOption = typer.Option("--json", help="Print JSON alone on stdout.")
TIME_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S"]
ExpiresOption = typer.Option(
    "--expires-at",
    formats=TIME_FORMATS,
    help="When it stops working, e.g. 2030-01-31T12:00:00Z (UTC unless an offset is given).",
)
Column = str | tuple[str, Callable[[dict[str, Any]], Any]]


def as_utc(value: datetime | None) -> datetime | None:
    """Times typed on the command line without an offset are UTC."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


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


def _value(row: dict[str, Any], column: Column) -> Any:
    return row.get(column) if isinstance(column, str) else column[1](row)


def _header(column: Column) -> str:
    return column if isinstance(column, str) else column[0]


def emit(value: Any, *, as_json: bool, columns: Sequence[Column], title: str | None = None) -> None:
    """A list of models as a table, or one model as a two-column table, or JSON (the API's own
    camelCase shape). A column is a field name or (header, function of the row)."""
    if as_json:
        emit_json(value)
        return
    console = Console(soft_wrap=True)
    rows = value if isinstance(value, list) else [value]
    data = [_plain(row) for row in rows]
    if isinstance(value, list):
        table = Table(title=title)
        for column in columns:
            table.add_column(_header(column))
        for row in data:
            table.add_row(*(_cell(_value(row, column)) for column in columns))
    else:
        table = Table(show_header=False, title=title)
        table.add_column("field", style="bold")
        table.add_column("value")
        for column in columns:
            table.add_row(_header(column), _cell(_value(data[0], column)))
    console.print(table)


def secret_line(label: str, value: str) -> None:
    """Plaintext credentials are printed once, unwrapped, so they can be copied or parsed."""
    sys.stdout.write(f"{label}: {value}\n")
    sys.stdout.flush()


def note(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
