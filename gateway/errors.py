"""The data plane's error envelope: OpenAI's ``{"error":{"message","type","param","code"}}`` (DESIGN §7).

Codes are strings. A 503 always carries ``retry-after``; a 5xx that will not succeed on a retry
carries ``x-should-retry: false`` (the OpenAI SDKs honour it). The data plane never answers 409:
the SDKs would retry it.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """One failure answered to a client; rendered by :func:`error_response` or as an SSE event."""

    status_code = 500
    code = "internal_error"
    default_message = "Internal server error"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        param: str | None = None,
        status_code: int | None = None,
        retryable: bool | None = None,
        retry_after_s: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.param = param
        # None: the default for the status (5xx other than 502/503/504 are not retried).
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})
        super().__init__(self.message)

    @property
    def error_type(self) -> str:
        if self.status_code in _TYPES:
            return _TYPES[self.status_code]
        return "server_error" if self.status_code >= 500 else "invalid_request_error"

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.status_code == 503 or self.retry_after_s is not None:
            headers["retry-after"] = str(self.retry_after_s if self.retry_after_s is not None else 1)
        if self.status_code >= 500:
            retryable = self.retryable
            if retryable is None:
                retryable = self.status_code in (502, 503, 504)
            if not retryable:
                headers["x-should-retry"] = "false"
        return headers


class InvalidRequest(GatewayError):
    status_code = 400
    code = "invalid_request"
    default_message = "Invalid request"


class InvalidApiKey(GatewayError):
    status_code = 401
    code = "invalid_api_key"
    default_message = "Invalid API key"


class DeploymentNotFound(GatewayError):
    status_code = 404
    code = "deployment_not_found"
    default_message = "No deployment answers at this address"


class RouteNotFound(GatewayError):
    status_code = 404
    code = "not_found"
    default_message = "Unknown route"


class MethodNotAllowed(GatewayError):
    status_code = 405
    code = "method_not_allowed"
    default_message = "Method not allowed"


class PayloadTooLarge(GatewayError):
    status_code = 413
    code = "payload_too_large"
    default_message = "Request body too large"


class UnsupportedMediaType(GatewayError):
    status_code = 415
    code = "unsupported_media_type"
    default_message = "Request body must be application/json"


class AdapterLoadFailed(GatewayError):
    status_code = 502
    code = "adapter_load_failed"
    default_message = "The deployment's adapter could not be loaded by the inference engine"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, retryable=False)


class UpstreamUnavailable(GatewayError):
    status_code = 503
    code = "upstream_unavailable"
    default_message = "No inference engine is available for this deployment"


class EngineUnreachable(UpstreamUnavailable):
    """The engine refused the connection (or did not accept it in time): eject it, try another."""


class NoEngine(GatewayError):
    status_code = 503
    code = "no_engine"
    default_message = "No inference engine serves this deployment's model"


class UpstreamTimeout(GatewayError):
    status_code = 504
    code = "upstream_timeout"
    default_message = "The inference engine did not answer in time"


class UpstreamError(GatewayError):
    status_code = 502
    code = "upstream_error"
    default_message = "The inference engine failed to process the request"


class UpstreamConnectionLost(UpstreamError):
    """The engine's connection broke while its answer was being read."""

    default_message = "The inference engine connection failed"


class ServiceUnavailable(GatewayError):
    status_code = 503
    code = "service_unavailable"
    default_message = "Service temporarily unavailable"


class ShuttingDown(GatewayError):
    status_code = 503
    code = "shutting_down"
    default_message = "This gateway is shutting down; retry"


def error_response(error: GatewayError, *, request_id: str | None = None) -> Response:
    headers = error.response_headers()
    if request_id is not None:
        headers["x-request-id"] = request_id
    return Response(
        orjson.dumps(error.body()),
        status_code=error.status_code,
        headers=headers,
        media_type="application/json",
    )


def sse_error_event(error: GatewayError) -> bytes:
    """The event that ends a stream which failed after its first byte (never a silent ``[DONE]``)."""
    return b"data: " + orjson.dumps(error.body()) + b"\n\n"
