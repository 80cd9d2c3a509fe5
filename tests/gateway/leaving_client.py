"""A streaming client that leaves mid-stream, for the client-disconnect check (issue 5).

It counts the tokens it has received, and when it decides to leave it first takes what has
already reached its socket: bytes the gateway delivered to the client's host were received,
whether or not a busy client process had got round to reading them. What the engine generated
beyond that was still inside the gateway or the engine when the client left, and that is what the
check bounds. A raw socket (with ``h11`` for the HTTP framing) because an HTTP client library
cannot say which bytes are already waiting in its socket.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11
import orjson


@dataclass(frozen=True)
class Departure:
    received: int  # tokens received before leaving, including those waiting in the socket
    waiting: int  # of which were waiting in the socket when the client decided to leave
    events: int
    rate: float  # tokens per second while streaming
    left_at: float  # time.monotonic() when the connection was closed


class _TokenCounter:
    """Tokens in an SSE stream of chat chunks, counted by their logprobs (one entry per token:
    vLLM merges several tokens into one event when its client lags)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.tokens = 0
        self.events = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            payload = event.removeprefix(b"data: ")
            if payload == b"[DONE]":
                continue
            choices = orjson.loads(payload).get("choices") or []
            content = (choices[0].get("logprobs") or {}).get("content") if choices else None
            if content:
                self.tokens += len(content)
                self.events += 1


def stream_then_leave(url: str, body: dict[str, Any], tokens: int, *, timeout: float = 120.0) -> Departure:
    """POST a streaming ``body`` to ``url``, read until ``tokens`` tokens, then leave (blocking)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    payload = orjson.dumps(body)
    connection = h11.Connection(h11.CLIENT)
    counter = _TokenCounter()
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        request = h11.Request(
            method="POST",
            target=parts.path,
            headers=[
                ("host", parts.netloc),
                ("content-type", "application/json"),
                ("content-length", str(len(payload))),
            ],
        )
        sock.sendall(connection.send(request) + connection.send(h11.Data(data=payload)))
        sock.sendall(connection.send(h11.EndOfMessage()))
        started = 0.0
        while counter.tokens < tokens:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                assert event.status_code == 200, event
                started = time.monotonic()
            elif isinstance(event, h11.Data):
                counter.feed(bytes(event.data))
            else:
                raise AssertionError(f"the stream ended after {counter.tokens} tokens: {event!r}")
        rate = counter.tokens / (time.monotonic() - started)
        before_leaving = counter.tokens
        sock.setblocking(False)
        while True:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            connection.receive_data(data)
        while isinstance(event := connection.next_event(), h11.Data):
            counter.feed(bytes(event.data))
    return Departure(
        received=counter.tokens,
        waiting=counter.tokens - before_leaving,
        events=counter.events,
        rate=rate,
        left_at=time.monotonic(),
    )
