"""`lorry jobs …`: import or upload fine-tuning outputs."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path, PurePath
from typing import Annotated, Any

import typer

from lorry.cli.output import Column, JsonOption, emit, emit_json, note
from lorry.cli.session import OrgOption, ProjectOption, resolve_scope, run
from lorry.client import CloudApiClient
from lorry.client.models import AdapterKind, Artifact

jobs_app = typer.Typer(no_args_is_help=True, help="Jobs and their adapters.")
JOB_COLUMNS: list[Column] = [
    "id",
    "name",
    "status",
    ("model", lambda job: job["config"].get("model")),
    ("adapters", lambda job: ", ".join(_adapter_label(a) for a in job["adapters"])),
    "createdAt",
]


class KindChoice(StrEnum):
    final = "final"
    checkpoint = "checkpoint"


def _adapter_label(adapter: dict[str, Any]) -> str:
    return "final" if adapter["kind"] == "final" else f"step {adapter['step']}"


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
    name: Annotated[str | None, typer.Option(help="Job name (default: the directory's name).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model id (default: the adapter's own).")] = None,
    org: OrgOption = None,
    project: ProjectOption = None,
    as_json: Json = False,
) -> None:
    """Import a fine-tuning output directory that the control plane can read: the final adapter
    at its root, checkpoints in checkpoint-<step>/."""
    job_name = name or PurePath(path.rstrip("/")).name or path
    job = run(lambda c: c.import_job(resolve_scope(c, org, project), name=job_name, path=path, model=model))
    emit(job, as_json=as_json, columns=JOB_COLUMNS)


@jobs_app.command("upload")
def upload(
    archive: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="A .tar.gz or .zip of one PEFT LoRA adapter.")
    ],
    job: Annotated[str | None, typer.Option(help="Add to this job (else a new job is created).")] = None,
    name: Annotated[str | None, typer.Option(help="Name of the new job (default: the archive's).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model id of the new job.")] = None,
    kind: Annotated[
        KindChoice, typer.Option(help="The job's final adapter or a checkpoint.")
    ] = KindChoice.final,
    step: Annotated[int | None, typer.Option(help="Checkpoint step.")] = None,
    org: OrgOption = None,
    project: ProjectOption = None,
    as_json: Json = False,
) -> None:
    """Upload an adapter archive, with a progress bar (on stderr)."""
    if job is None and model is None:
        raise typer.BadParameter("a new job needs --model (the base model id); or add to one with --job")
    adapter_kind: AdapterKind = kind.value

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    def action(client: CloudApiClient) -> Artifact:
        scope = resolve_scope(client, org, project)
        job_id = job or client.create_job(scope, name=name or _job_name(archive), model=str(model)).id
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
            transient=True,
            disable=as_json,
        ) as progress:
            task = progress.add_task("uploading", total=archive.stat().st_size)
            return client.upload_artifact(
                job_id,
                scope,
                archive,
                kind=adapter_kind,
                step=step,
                on_progress=lambda sent, _total: progress.update(task, completed=sent),
            )

    artifact = run(action)
    if as_json:
        emit_json(artifact)
        return
    emit(artifact.job, as_json=False, columns=JOB_COLUMNS)
    note(f"added {artifact.adapter.kind} adapter {artifact.adapter.id} (sha256 {artifact.adapter.digest})")


def _job_name(archive: Path) -> str:
    name = archive.name
    for suffix in (".tar.gz", ".tgz", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


@jobs_app.command("delete")
def delete_job(
    job_id: str, org: OrgOption = None, project: ProjectOption = None, as_json: Json = False
) -> None:
    run(lambda c: c.delete_job(job_id, resolve_scope(c, org, project)))
    if as_json:
        emit_json({"deleted": job_id})
    else:
        note(f"deleted job {job_id}")
