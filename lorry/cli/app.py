"""The root `lorry` command."""

from __future__ import annotations

import sys

import typer

from lorry.cli.deployments import deployments_app, keys_app
from lorry.cli.engines import engines_app
from lorry.cli.jobs import jobs_app
from lorry.cli.servers import register as register_server_commands
from lorry.cli.tenancy import admin_app, audit_app, login, orgs_app, projects_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Lorry: LoRA adapters at their own URL.")
register_server_commands(app)
app.command("login")(login)
app.add_typer(orgs_app, name="orgs")
app.add_typer(projects_app, name="projects")
app.add_typer(admin_app, name="admin")
app.add_typer(deployments_app, name="deployments")
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
app.add_typer(engines_app, name="engines")
app.add_typer(audit_app, name="audit")


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        sys.exit(1)
