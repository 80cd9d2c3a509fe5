"""The one error a client call raises for a non-2xx answer."""

from __future__ import annotations

import contextlib
from typing import Any


class CloudApiError(Exception):
    """A non-2xx answer from the control plane, with the server's message and code."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"{status} {code or 'error'}: {message}")
        self.status = status
        self.message = message
        self.code = code


def error_from_response(status: int, body: bytes) -> CloudApiError:
    import orjson

    parsed: Any = None
    with contextlib.suppress(orjson.JSONDecodeError):
        parsed = orjson.loads(body)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str) and parsed["error"]:
        code = parsed.get("code")
        return CloudApiError(status, parsed["error"], code if isinstance(code, str) else None)
    text = body.decode("utf-8", errors="replace").strip()
    return CloudApiError(status, text or f"lorry control plane answered {status}")
