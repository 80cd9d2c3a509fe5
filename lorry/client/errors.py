"""The one error a client call raises for a non-2xx answer."""

from __future__ import annotations

from typing import Any

import orjson


class CloudApiError(Exception):
    """A non-2xx answer from the control plane, with the server's message and code."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(status, message, code)
        self.status = status
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return f"{self.status} {self.code or 'error'}: {self.message}"


def error_from_response(status: int, body: bytes) -> CloudApiError:
    """`{"error": message, "code": code}` as the server sends it; any other body is the message."""
    parsed: Any = None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str) and parsed["error"]:
        code = parsed.get("code")
        return CloudApiError(status, parsed["error"], code if isinstance(code, str) else None)
    text = body.decode("utf-8", errors="replace").strip()
    return CloudApiError(status, text or f"the control plane answered {status}")
