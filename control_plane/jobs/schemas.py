"""Request and response models of the jobs API (DESIGN §4 "Jobs")."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints

from control_plane.schemas import RequestModel, ResponseModel, Timestamp


def _storable(value: str) -> str:
    """Text that PostgreSQL and the file system can hold: UTF-8-encodable, without NUL."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


JobName = Annotated[
    str,
    StringConstraints(strict=True, strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(_storable),
]
ModelId = Annotated[
    str,
    StringConstraints(strict=True, strip_whitespace=True, min_length=1, max_length=300),
    AfterValidator(_storable),
]
ImportPath = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=4096), AfterValidator(_storable)
]

AdapterKind = Literal["final", "checkpoint"]
JobStatus = Literal["queued", "completed"]


class JobConfigIn(RequestModel):
    model: ModelId | None = Field(
        default=None,
        description="Canonical base model id; an import defaults it to base_model_name_or_path.",
    )


class DirectorySource(RequestModel):
    kind: Literal["directory"]
    path: ImportPath = Field(description="Absolute server path inside one of LORRY_IMPORT_ROOTS.")


class CreateJobRequest(RequestModel):
    name: JobName
    config: JobConfigIn = Field(default_factory=JobConfigIn)
    source: DirectorySource | None = Field(
        default=None, description="Import a fine-tuning output directory; omit to create an empty job."
    )


class JobConfigOut(ResponseModel):
    model: str | None


class AdapterOut(ResponseModel):
    id: str
    kind: AdapterKind
    step: int | None
    digest: str
    rank: int
    target_modules: list[str]
    created_at: Timestamp


class JobOut(ResponseModel):
    id: str
    org_id: str
    project_id: str
    name: str
    status: JobStatus
    config: JobConfigOut
    created_at: Timestamp
    started_at: Timestamp | None
    completed_at: Timestamp | None
    adapters: list[AdapterOut]


class JobEnvelope(ResponseModel):
    job: JobOut


class JobsEnvelope(ResponseModel):
    jobs: list[JobOut]


class ArtifactEnvelope(ResponseModel):
    job: JobOut
    adapter: AdapterOut
