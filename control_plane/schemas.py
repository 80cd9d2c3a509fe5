"""Base models for the admin API: camelCase on the wire, strict on input."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, PlainSerializer, StrictStr
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from lorry.db.types import isoformat

Timestamp = Annotated[datetime, PlainSerializer(isoformat, return_type=str)]


def plain_text(value: str) -> str:
    """No control characters or lone surrogates: neither belongs in a name, PostgreSQL rejects NUL,
    and no driver can encode a lone surrogate."""
    if any(ord(char) < 32 or ord(char) == 127 or 0xD800 <= ord(char) <= 0xDFFF for char in value):
        raise PydanticCustomError("control_characters", "must not contain control characters")
    return value


PlainText = Annotated[StrictStr, AfterValidator(plain_text)]


class ResponseModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, serialize_by_alias=True)


class RequestModel(BaseModel):
    """Unknown fields are an error: a typo in an operator's script must not be silently ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=False, extra="forbid")


class ErrorBody(BaseModel):
    error: str
    code: str
