"""What goes back to the client: engine answers rewritten (DESIGN §7).

- ``model`` becomes the deployment's slug in JSON bodies and in every stream chunk;
- the usage chunk is dropped unless the client asked for it (the gateway always asks the engine,
  for its token metrics);
- engine error messages lose internal adapter names, paths, URLs and vLLM's valid-alias lists.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    UpstreamError,
    UpstreamUnavailable,
)

MAX_MESSAGE_CHARS = 1000
_ADAPTER_NAME = re.compile(r"lora-[0-9a-f]{16}")
_ALIASES = re.compile(r"\s*Valid aliases:.*", re.DOTALL)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"`<>]+", re.IGNORECASE)
_PATH = re.compile(r"(?<![\w.:/])(?:/[\w.@+~-]+){2,}/?")

UsageHook = Callable[[int, int], None]


def sanitise_message(message: str, slug: str) -> str:
    text = _ALIASES.sub("", message)
    text = _ADAPTER_NAME.sub(slug, text)
    text = _URL.sub("<url>", text)
    text = _PATH.sub("<path>", text)
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text.strip() or "The inference engine rejected the request"


def engine_error_message(body: bytes) -> tuple[str | None, str | None]:
    """(message, param) from a vLLM/FastAPI error body, if there is one."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text or None), None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            message = error.get("message")
            param = error.get("param")
            return (
                str(message) if message is not None else None,
                param if isinstance(param, str) else None,
            )
        if isinstance(error, str):
            return error, None
        detail = data.get("detail")
        if detail is not None:
            return (detail if isinstance(detail, str) else orjson.dumps(detail).decode()), None
        message = data.get("message")
        if isinstance(message, str):
            return message, None
    return None, None


def is_model_missing(status: int, body: bytes) -> bool:
    """vLLM's 404 for a model name it does not know: the engine restarted and lost our adapter."""
    if status != 404:
        return False
    message, _ = engine_error_message(body)
    return message is not None and "does not exist" in message


def engine_error(status: int, body: bytes, slug: str) -> GatewayError:
    """The client-facing error for an engine's error answer (before any byte was relayed)."""
    message, param = engine_error_message(body)
    if param is not None and param.startswith("body."):
        param = param[len("body.") :]
    if param in ("model", "lora_name", "lora_path"):
        param = None
    if status in (400, 422):
        return InvalidRequest(sanitise_message(message or "Invalid request", slug), param=param)
    if status == 413:
        return PayloadTooLarge()
    if status in (502, 503, 504):
        return UpstreamUnavailable()
    return UpstreamError()


def rewrite_json_body(body: bytes, slug: str, on_usage: UsageHook | None) -> bytes:
    """A non-streaming success body with ``model`` set to the slug; raises UpstreamError if not JSON."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamError("The inference engine sent an unreadable answer") from None
    if not isinstance(data, dict):
        raise UpstreamError("The inference engine sent an unreadable answer")
    if "model" in data:
        data["model"] = slug
    _record_usage(data.get("usage"), on_usage)
    return orjson.dumps(data)


def _record_usage(usage: Any, on_usage: UsageHook | None) -> None:
    if on_usage is None or not isinstance(usage, dict):
        return
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        on_usage(prompt, completion)


class StreamProtocolError(Exception):
    """The engine's stream is not the SSE we expect; the client gets an error event."""


@dataclass
class EventResult:
    data: bytes | None  # bytes to send (with the blank-line terminator), None: drop
    done: bool = False  # the `[DONE]` marker
    error: bool = False  # an error event (the stream ends after it)
    content: bool = False  # carries generated content (for time to first token)


class StreamRewriter:
    """Rewrites one SSE event at a time; events are split by :class:`SSEBuffer`."""

    def __init__(self, slug: str, *, include_usage: bool, on_usage: UsageHook | None = None) -> None:
        self.slug = slug
        self.include_usage = include_usage
        self.on_usage = on_usage

    def event(self, raw: bytes) -> EventResult:
        data_lines: list[bytes] = []
        comment = False
        for line in raw.split(b"\n"):
            line = line.rstrip(b"\r")
            if not line:
                continue
            if line.startswith(b":"):
                comment = True
            elif line.startswith(b"data:"):
                value = line[5:]
                data_lines.append(value[1:] if value.startswith(b" ") else value)
            # `event:`, `id:`, `retry:` lines: vLLM sends none; nothing to relay.
        if not data_lines:
            return EventResult(b": keep-alive\n\n" if comment else None)
        data = b"\n".join(data_lines)
        if data.strip() == b"[DONE]":
            return EventResult(b"data: [DONE]\n\n", done=True)
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise StreamProtocolError("malformed event from the engine") from None
        if not isinstance(chunk, dict):
            raise StreamProtocolError("unexpected event from the engine")
        if "error" in chunk:
            error = chunk.get("error")
            message = error.get("message") if isinstance(error, dict) else error
            body = UpstreamError(
                sanitise_message(str(message or "The inference engine failed mid-stream"), self.slug)
            ).body()
            return EventResult(b"data: " + orjson.dumps(body) + b"\n\n", error=True)
        if "model" in chunk:
            chunk["model"] = self.slug
        usage = chunk.get("usage")
        choices = chunk.get("choices")
        if usage is not None and choices == []:
            _record_usage(usage, self.on_usage)
            if not self.include_usage:
                return EventResult(None)
        elif not self.include_usage:
            chunk.pop("usage", None)
        return EventResult(b"data: " + orjson.dumps(chunk) + b"\n\n", content=_has_content(choices))


def _has_content(choices: Any) -> bool:
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("tool_calls") or delta.get("reasoning")
        ):
            return True
        if choice.get("text"):
            return True
    return False


class SSEBuffer:
    """Splits a byte stream into events at blank lines, refusing unbounded events."""

    def __init__(self, max_event_bytes: int) -> None:
        self._buffer = b""
        self._max = max_event_bytes

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        if b"\r" in self._buffer:
            self._buffer = self._buffer.replace(b"\r\n", b"\n")
        events = []
        while True:
            index = self._buffer.find(b"\n\n")
            if index == -1:
                break
            events.append(self._buffer[:index])
            self._buffer = self._buffer[index + 2 :]
        if len(self._buffer) > self._max:
            raise StreamProtocolError("event from the engine too large")
        return events

    def tail(self) -> bytes:
        return self._buffer
