"""The one error class tree. Each server renders it with one handler in its own envelope."""

from __future__ import annotations

from collections.abc import Mapping


class LorryError(Exception):
    status_code: int = 500
    code: str = "internal_error"
    default_message: str = "Internal server error"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})
        super().__init__(self.message)


class InvalidRequest(LorryError):
    status_code = 400
    code = "invalid_request"
    default_message = "Invalid request"


class Unauthorized(LorryError):
    status_code = 401
    code = "unauthorized"
    default_message = "Missing or invalid token"


class Forbidden(LorryError):
    status_code = 403
    code = "forbidden"
    default_message = "This token may not act in that scope"


class NotFound(LorryError):
    status_code = 404
    code = "not_found"
    default_message = "Not found"


class MethodNotAllowed(LorryError):
    status_code = 405
    code = "method_not_allowed"
    default_message = "Method not allowed"


class Conflict(LorryError):
    status_code = 409
    code = "conflict"
    default_message = "Conflict"


class PayloadTooLarge(LorryError):
    status_code = 413
    code = "payload_too_large"
    default_message = "Request body too large"


class UnsupportedMediaType(LorryError):
    status_code = 415
    code = "unsupported_media_type"
    default_message = "Unsupported content type"


class ServiceUnavailable(LorryError):
    status_code = 503
    code = "service_unavailable"
    default_message = "Service unavailable"

    def __init__(
        self, message: str | None = None, *, code: str | None = None, retry_after_s: int = 1
    ) -> None:
        super().__init__(message, code=code, headers={"retry-after": str(retry_after_s)})
