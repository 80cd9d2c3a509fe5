"""The `lorry` command line. Servers are imported lazily: `lorry` itself imports neither of them."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from lorry.settings import LorrySettings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Lorry: LoRA adapters at their own URL.")
serve_app = typer.Typer(no_args_is_help=True, help="Run a Lorry server in the foreground.")
admin_app = typer.Typer(no_args_is_help=True, help="Admin tokens.")
app.add_typer(serve_app, name="serve")
app.add_typer(admin_app, name="admin")

HostOption = Annotated[str, typer.Option(help="Interface to listen on.")]


def _settings() -> LorrySettings:
    return LorrySettings()


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Bring the database at LORRY_DATABASE_URL to the latest schema."""
    from lorry import migrate as migrations

    migrations.upgrade(_settings().database_url, revision)
    typer.echo(f"database at revision {migrations.head_revision() if revision == 'head' else revision}")


@serve_app.command("control-plane")
def serve_control_plane(host: HostOption = "127.0.0.1", port: int = 8081) -> None:
    """The admin API."""
    from control_plane.app import create_app
    from lorry.serving import Listener, serve_all

    settings = _settings()
    asyncio.run(
        serve_all([Listener(create_app(settings), host, port, "control-plane")], log_level=settings.log_level)
    )


@serve_app.command("gateway")
def serve_gateway(host: HostOption = "0.0.0.0", port: int = 8080, ops_port: int = 9090) -> None:  # noqa: S104
    """The data plane at <slug>.<LORRY_BASE_DOMAIN>; /healthz, /readyz and /metrics on --ops-port."""
    from gateway.server import serve

    asyncio.run(serve(_settings(), host=host, port=port, ops_port=ops_port))


@serve_app.command("all")
def serve_everything(
    host: HostOption = "127.0.0.1", port: int = 8080, admin_port: int = 8081, ops_port: int = 9090
) -> None:
    """Control plane and gateway in one process, sharing change notifications."""
    from gateway.server import serve_with_control_plane

    asyncio.run(
        serve_with_control_plane(_settings(), host=host, port=port, admin_port=admin_port, ops_port=ops_port)
    )


@admin_app.command("create-token")
def create_token(
    kind: Annotated[str, typer.Option(help="install or org")] = "install",
    org: Annotated[str | None, typer.Option(help="Org slug, for --kind org")] = None,
    label: Annotated[str, typer.Option(help="A name to recognise the token by")] = "cli",
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout")] = False,
) -> None:
    """Mint an admin token directly in the database (for the first token of an install)."""
    from lorry.admin_bootstrap import mint_admin_token

    try:
        token = asyncio.run(mint_admin_token(_settings(), kind=kind, org_slug=org, label=label))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(
            json.dumps({"token": token.plaintext, "id": token.id, "prefix": token.prefix, "kind": kind})
        )
    else:
        typer.echo(token.plaintext)


@app.command()
def up(
    host: HostOption = "127.0.0.1",
    port: int = 8080,
    admin_port: int = 8081,
    state_dir: Annotated[Path, typer.Option(help="Where the embedded state lives.")] = Path(".lorry"),
) -> None:
    """Run Lorry on its embedded default: SQLite under ./.lorry/, one process."""
    from lorry.local_stack import UpOptions, run_up

    asyncio.run(run_up(UpOptions(host=host, port=port, admin_port=admin_port, state_dir=state_dir)))


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)
