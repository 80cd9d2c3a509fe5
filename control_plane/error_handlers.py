"""One renderer for every error: `{"error": "<message>", "code": "<code>"}` (DESIGN §4)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorry.errors import InvalidRequest, LorryError, MethodNotAllowed, NotFound, PayloadTooLarge
from lorry.json_response import JSONResponse

logger = logging.getLogger("lorry.control_plane")

_STATUS_ERRORS: dict[int, type[LorryError]] = {404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}


def render(error: LorryError) -> Response:
    return JSONResponse(
        {"error": error.message, "code": error.code}, status_code=error.status_code, headers=error.headers
    )


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for item in exc.errors()[:5]:
        location = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path"))
        if item.get("type") == "json_invalid":
            return "Request body is not valid JSON"
        message = str(item.get("msg", "invalid value"))
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts) or "Invalid request"


async def _lorry_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LorryError)
    return render(exc)


async def _validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return render(InvalidRequest(_describe_validation(exc)))


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, LorryError):  # FastAPI wraps errors raised while reading the body
        return render(exc.__cause__)
    if exc.status_code == 400:  # FastAPI's "error parsing the body", e.g. a JSON body that is not UTF-8
        return render(InvalidRequest(str(exc.detail)))
    error_type = _STATUS_ERRORS.get(exc.status_code)
    error = error_type() if error_type else LorryError(str(exc.detail))
    if error_type is None:
        error.status_code = exc.status_code
    error.headers.update(exc.headers or {})
    return render(error)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return render(LorryError())


def install(app: FastAPI) -> None:
    app.add_exception_handler(LorryError, _lorry_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)


class BodyLimitMiddleware:
    """413 before reading an oversized body, and again if a chunked body grows past the limit."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                await render(PayloadTooLarge(f"Request body exceeds {limit} bytes"))(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"Request body exceeds {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)
