"""Request and response models for `/v1/admin-tokens`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field, StrictInt

from control_plane.schemas import PlainText, RequestModel, ResponseModel, Timestamp

LABEL_MAX = 80
MAX_GRACE_S = 604_800
DEFAULT_GRACE_S = 86_400


def _label(value: str) -> str:
    value = value.strip()
    if not 1 <= len(value) <= LABEL_MAX:
        raise ValueError(f"label must be 1 to {LABEL_MAX} characters")
    return value


def _iso_string(value: Any) -> Any:
    """Timestamps come as ISO 8601 strings with an offset; numbers are not read as epochs."""
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 datetime string with a timezone")
    return value


Label = Annotated[PlainText, AfterValidator(_label)]
IsoDatetime = Annotated[AwareDatetime, BeforeValidator(_iso_string)]


class CreateAdminTokenRequest(RequestModel):
    label: Label
    kind: Literal["install", "org"]
    org_slug: PlainText | None = None
    expires_at: IsoDatetime | None = None


class RollAdminTokenRequest(RequestModel):
    grace_period_seconds: Annotated[StrictInt, Field(ge=0, le=MAX_GRACE_S)] = DEFAULT_GRACE_S


class AdminTokenDto(ResponseModel):
    id: str
    label: str
    prefix: str
    kind: str
    org_id: str | None
    org_slug: str | None
    enabled: bool
    created_at: Timestamp
    last_used_at: Timestamp | None
    expires_at: Timestamp | None


class CreatedAdminTokenDto(AdminTokenDto):
    """Only ever returned by create and roll: the plaintext is shown once."""

    plaintext: str


class AdminTokenListResponse(ResponseModel):
    tokens: list[AdminTokenDto]


class CreatedAdminTokenResponse(ResponseModel):
    token: CreatedAdminTokenDto


class PreviousToken(ResponseModel):
    id: str
    expires_at: Timestamp


class RolledAdminTokenResponse(ResponseModel):
    token: CreatedAdminTokenDto
    previous: PreviousToken
