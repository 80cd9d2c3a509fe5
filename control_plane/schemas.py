"""Base models for the admin API: camelCase on the wire, strict on input."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, PlainSerializer
from pydantic.alias_generators import to_camel

from lorry.db.types import isoformat

Timestamp = Annotated[datetime, PlainSerializer(isoformat, return_type=str)]


class ResponseModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True)


class RequestModel(BaseModel):
    """Unknown fields are an error: a typo in an operator's script must not be silently ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=False, extra="forbid")


class ErrorBody(BaseModel):
    error: str
    code: str
