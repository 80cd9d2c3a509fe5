"""`lorry jobs …`: import or upload fine-tuning outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from lorry.cli.output import JsonOption, emit, emit_json, note
from lorry.cli.session import OrgOption, ProjectOption, resolve_scope, run
from lorry.client import CloudApiClient
from lorry.client.models import Job

jobs_app = typer.Typer(no_args_is_help=True, help="Jobs and their adapters.")
JOB_COLUMNS = ["id", "name", "status", "config", "adapters", "createdAt", "completedAt"]
Json = Annotated[bool, JsonOption]


@jobs_app.command("list")
def list_jobs(org: OrgOption = None, project: ProjectOption = None, as_json: Json = False) -> None:
    emit(run(lambda c: c.list_jobs(resolve_scope(c, org, project))), as_json=as_json, columns=JOB_COLUMNS)


@jobs_app.command("get")
def get_job(job_id: str, org: OrgOption = None, project: ProjectOption = None, as_json: Json = False) -> None:
    emit(
        run(lambda c: c.get_job(job_id, resolve_scope(c, org, project))), as_json=as_json, columns=JOB_COLUMNS
    )


@jobs_app.command("import")
def import_job(
    path: Annotated[
        str, typer.Argument(help="A fine-tuning output directory on the server, under LORRY_IMPORT_ROOTS.")
    ],
    name: Annotated[str, typer.Option(help="Job name.")],
    model: Annotated[str | None, typer.Option(help="Base model id (default: the adapter's own).")] = None,
    org: OrgOption = None,
    project: ProjectOption = None,
    as_json: Json = False,
) -> None:
    job = run(lambda c: c.import_job(resolve_scope(c, org, project), name=name, path=path, model=model))
    emit(job, as_json=as_json, columns=JOB_COLUMNS)


@jobs_app.command("upload")
def upload(
    archive: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A .tar.gz or .zip of the adapter.")
    ],
    job: Annotated[str | None, typer.Option(help="Add to this job (else a new job is created).")] = None,
    name: Annotated[str | None, typer.Option(help="Name of the new job.")] = None,
    model: Annotated[str | None, typer.Option(help="Base model id of the new job.")] = None,
    kind: Annotated[str, typer.Option(help="final or checkpoint.")] = "final",
    step: Annotated[int | None, typer.Option(help="Checkpoint step.")] = None,
    org: OrgOption = None,
    project: ProjectOption = None,
    as_json: Json = False,
) -> None:
    def action(client: CloudApiClient) -> Job:
        scope = resolve_scope(client, org, project)
        job_id = job or client.create_job(scope, name=name or archive.name, model=model).id
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            transient=True,
            disable=as_json,
        ) as progress:
            task = progress.add_task("uploading", total=archive.stat().st_size)
            return client.upload_artifact(
                job_id,
                scope,
                archive,
                kind=kind,
                step=step,
                on_progress=lambda sent, _total: progress.update(task, completed=sent),
            )

    emit(run(action), as_json=as_json, columns=JOB_COLUMNS)


@jobs_app.command("delete")
def delete_job(
    job_id: str, org: OrgOption = None, project: ProjectOption = None, as_json: Json = False
) -> None:
    run(lambda c: c.delete_job(job_id, resolve_scope(c, org, project)))
    if as_json:
        emit_json({"deleted": job_id})
    else:
        note(f"deleted job {job_id}")
