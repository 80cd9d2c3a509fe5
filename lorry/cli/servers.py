"""Commands that run things here: `migrate`, `serve …`, `up`, `demo-model`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

serve_app = typer.Typer(no_args_is_help=True, help="Run a Lorry server in the foreground.")
HostOption = Annotated[str, typer.Option(help="Interface to listen on.")]


def migrate(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Bring the database at LORRY_DATABASE_URL to the latest schema."""
    from lorry import migrate as migrations
    from lorry.settings import LorrySettings

    migrations.upgrade(LorrySettings().database_url, revision)
    typer.echo(f"database at revision {migrations.head_revision() if revision == 'head' else revision}")


@serve_app.command("control-plane")
def serve_control_plane(host: HostOption = "127.0.0.1", port: int = 8081) -> None:
    """The admin API."""
    from control_plane.app import create_app
    from lorry.serving import Listener, serve_all
    from lorry.settings import LorrySettings

    settings = LorrySettings()
    listener = Listener(create_app(settings), host, port, "control-plane")
    asyncio.run(serve_all([listener], log_level=settings.log_level))


@serve_app.command("gateway")
def serve_gateway(host: HostOption = "0.0.0.0", port: int = 8080, ops_port: int = 9090) -> None:  # noqa: S104
    """The data plane at <slug>.<LORRY_BASE_DOMAIN>; /healthz, /readyz and /metrics on --ops-port."""
    from gateway.server import serve
    from lorry.settings import LorrySettings

    asyncio.run(serve(LorrySettings(), host=host, port=port, ops_port=ops_port))


@serve_app.command("all")
def serve_everything(
    host: HostOption = "127.0.0.1", port: int = 8080, admin_port: int = 8081, ops_port: int = 9090
) -> None:
    """Control plane and gateway in one process, sharing change notifications."""
    from lorry.combined import serve_control_plane_and_gateway
    from lorry.settings import LorrySettings

    asyncio.run(
        serve_control_plane_and_gateway(
            LorrySettings(), host=host, port=port, admin_port=admin_port, ops_port=ops_port
        )
    )


def up(
    host: HostOption = "127.0.0.1",
    port: int = 8080,
    admin_port: int = 8081,
    ops_port: int = 9090,
    state_dir: Annotated[Path, typer.Option(help="Where the embedded state lives.")] = Path(".lorry"),
    model: Annotated[
        Path | None, typer.Option(exists=True, file_okay=False, help="Serve this local model directory.")
    ] = None,
    engine_url: Annotated[str | None, typer.Option(help="Use this running vLLM server instead.")] = None,
) -> None:
    """Run Lorry on its embedded default: SQLite under ./.lorry/, a local vLLM CPU engine, one process."""
    from lorry.local_stack import UpOptions, run_up

    options = UpOptions(
        host=host,
        port=port,
        admin_port=admin_port,
        ops_port=ops_port,
        state_dir=state_dir,
        model=model,
        engine_url=engine_url,
    )
    asyncio.run(run_up(options))


def demo_model() -> None:
    """Write the tiny random Llama and its demo adapters (building the engine environment first)."""
    from lorry import engine_env
    from lorry.settings import LorrySettings

    cache_dir = LorrySettings().cache_dir
    try:
        engine_env.build(cache_dir)
        target = engine_env.build_demo_model(cache_dir)
    except engine_env.EngineEnvError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise typer.Exit(1) from exc
    sys.stdout.write(f"{target}\n")


def register(app: typer.Typer) -> None:
    app.command("migrate")(migrate)
    app.add_typer(serve_app, name="serve")
    app.command("up")(up)
    app.command("demo-model")(demo_model)
