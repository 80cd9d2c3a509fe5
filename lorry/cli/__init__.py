"""The `lorry` command line (typer + rich)."""

from lorry.cli.app import main

__all__ = ["main"]
