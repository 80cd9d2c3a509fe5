"""Talking to one engine: a request with phase timeouts, and the streaming relay (DESIGN §7).

Timeouts (settings, DESIGN §12): *connect* (httpx), *first byte* (response headers and, for a
stream, its first event), *idle* (between two reads), *total* (the whole exchange).

The relay sends each event as soon as it is read: no buffering, no compression,
``Cache-Control: no-cache`` and ``X-Accel-Buffering: no`` so proxies do not hold it either. A
failure after the first byte ends the stream with an error event, never a silent ``[DONE]``.
Closing the upstream response (on any exit, client disconnect included) closes the engine's
connection, which makes vLLM abort the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from gateway.engines import EngineState, UpstreamTimeouts
from gateway.errors import (
    EngineUnreachable,
    GatewayError,
    UpstreamConnectionLost,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    sse_error_event,
)
from gateway.responses import SSEBuffer, StreamProtocolError, StreamRewriter

logger = logging.getLogger("lorry.gateway.proxy")

SSE_HEADERS = {
    "content-type": "text/event-stream; charset=utf-8",
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}


class Deadline:
    """The phase timeouts of one exchange, measured from its start."""

    def __init__(self, timeouts: UpstreamTimeouts) -> None:
        self.timeouts = timeouts
        self.started = time.monotonic()

    def remaining(self) -> float:
        return self.timeouts.total_s - (time.monotonic() - self.started)

    def first_byte(self) -> float:
        return max(0.0, min(self.timeouts.first_byte_s - (time.monotonic() - self.started), self.remaining()))

    def idle(self) -> float:
        return max(0.0, min(self.timeouts.idle_s, self.remaining()))


async def send_request(
    state: EngineState, path: str, body: bytes, request_id: str, deadline: Deadline
) -> httpx.Response:
    """Headers of the engine's answer (body not read). Raises GatewayError subclasses."""
    request = state.client.build_request(
        "POST",
        path,
        content=body,
        headers={"content-type": "application/json", "x-request-id": request_id},
    )
    for attempt in (1, 2):
        try:
            async with asyncio.timeout(deadline.first_byte()):
                response = await state.client.send(request, stream=True)
            state.answered_at = time.monotonic()
            return response
        except TimeoutError:
            raise UpstreamTimeout() from None
        except httpx.ConnectError as exc:
            if connection_refused(exc):
                raise EngineUnreachable() from exc
            raise UpstreamUnavailable() from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            # The connection broke before the answer began: most often a kept-alive connection
            # the engine closed as it was reused. Once more, on a new connection.
            if attempt == 1:
                logger.info(
                    "engine %s: connection broke before its answer (%r); sending again", state.name, exc
                )
                continue
            raise UpstreamUnavailable() from exc
        except httpx.TransportError as exc:  # a connect or pool timeout
            raise UpstreamUnavailable() from exc
    raise AssertionError("unreachable")


def connection_refused(exc: BaseException) -> bool:
    """Did the engine's host refuse the connection (nothing listens: the process is gone)?"""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return True
        current = current.__cause__ or current.__context__
    return False


async def read_chunk(chunks: AsyncIterator[bytes], timeout_s: float) -> bytes | None:
    """The next chunk, None at the end; UpstreamTimeout / UpstreamError on failure."""
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(chunks)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise UpstreamTimeout() from None
    except httpx.TransportError as exc:
        raise UpstreamConnectionLost() from exc
    except httpx.HTTPError as exc:
        raise UpstreamError("The inference engine connection failed") from exc


async def read_body(response: httpx.Response, deadline: Deadline, *, limit: int, first: bool = True) -> bytes:
    """A whole (non-streaming) body under the phase timeouts and a size limit."""
    chunks = response.aiter_raw()
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await read_chunk(chunks, deadline.first_byte() if first and not parts else deadline.idle())
        if chunk is None:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            raise UpstreamError("The inference engine's answer is too large")
        parts.append(chunk)


@dataclass
class StreamStats:
    first_content_at: float | None = None
    error_code: str | None = None
    error: GatewayError | None = None
    completed: bool = False
    events: int = 0


@dataclass(eq=False)
class OpenStream:
    """A stream whose first event(s) are already read: committing to it sends them at once."""

    state: EngineState
    response: httpx.Response
    chunks: AsyncIterator[bytes]
    rewriter: StreamRewriter
    buffer: SSEBuffer
    deadline: Deadline
    pending: list[bytes]
    stats: StreamStats = field(default_factory=StreamStats)
    done: bool = False
    # Set by :meth:`abort` (the shutdown deadline): the relay ends with this error event.
    aborted: GatewayError | None = None
    _read_scope: asyncio.Timeout | None = None

    @classmethod
    async def open(
        cls,
        state: EngineState,
        response: httpx.Response,
        rewriter: StreamRewriter,
        deadline: Deadline,
        *,
        max_event_bytes: int,
    ) -> OpenStream:
        """Reads until the first relayable event; raises GatewayError (retryable before any byte)."""
        stream = cls(
            state=state,
            response=response,
            chunks=response.aiter_raw(),
            rewriter=rewriter,
            buffer=SSEBuffer(max_event_bytes),
            deadline=deadline,
            pending=[],
        )
        while not stream.pending and not stream.done:
            chunk = await read_chunk(stream.chunks, deadline.first_byte())
            if chunk is None:
                raise UpstreamError("The inference engine closed the stream before any event")
            try:
                stream.pending.extend(stream._rewrite(chunk))
            except StreamProtocolError as exc:
                raise UpstreamError(str(exc)) from None
        return stream

    def _rewrite(self, chunk: bytes) -> list[bytes]:
        out, problem = self._rewrite_partial(chunk)
        if problem is not None:
            raise problem
        return out

    def _rewrite_partial(self, chunk: bytes) -> tuple[list[bytes], StreamProtocolError | None]:
        """The client's events for one upstream read, and the protocol error that cut it short."""
        out: list[bytes] = []
        try:
            events = self.buffer.feed(chunk)
        except StreamProtocolError as exc:
            return out, exc
        for raw in events:
            try:
                result = self.rewriter.event(raw)
            except StreamProtocolError as exc:
                return out, exc
            self.stats.events += 1
            if result.content and self.stats.first_content_at is None:
                self.stats.first_content_at = time.monotonic()
            if result.data is not None:
                out.append(result.data)
            if result.error:
                self.stats.error_code = "upstream_error"
                self.done = True
                break
            if result.done:
                self.stats.completed = True
                self.done = True
                break
        return out, None

    def abort(self, error: GatewayError) -> None:
        """End the relay at once with ``error`` as its last event (the shutdown deadline passed).

        A read in progress is interrupted by moving its timeout to now; a relay busy sending sees
        the abort before its next read.
        """
        if self.aborted is not None or self.done:
            return
        self.aborted = error
        scope = self._read_scope
        if scope is not None:
            scope.reschedule(asyncio.get_running_loop().time())

    async def _read(self) -> bytes | None:
        if self.aborted is not None:
            raise self.aborted
        try:
            async with asyncio.timeout(self.deadline.idle()) as scope:
                self._read_scope = scope
                chunk = await anext(self.chunks)
            self.state.answered_at = time.monotonic()
            return chunk
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if self.aborted is not None:
                raise self.aborted from None
            raise UpstreamTimeout() from None
        except httpx.TransportError as exc:
            raise UpstreamConnectionLost() from exc
        except httpx.HTTPError as exc:
            raise UpstreamError("The inference engine connection failed") from exc
        finally:
            self._read_scope = None

    async def relay(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        """Sends everything to the client; ends with an error event on any failure."""
        error: GatewayError | None = None
        try:
            # Everything one read brought is sent at once: as it arrived, in one write (a gateway
            # that fell behind catches up instead of paying per event).
            if self.pending:
                await send(b"".join(self.pending))
            self.pending = []
            while not self.done:
                chunk = await self._read()
                if chunk is None:
                    error = UpstreamError("The inference engine ended the stream unexpectedly")
                    break
                out, problem = self._rewrite_partial(chunk)
                if out:
                    await send(b"".join(out))
                if problem is not None:
                    error = UpstreamError(str(problem))
                    break
                # Neither a read of already-buffered data nor a send suspends: without this the
                # relay of a fast engine would keep the event loop to itself (other streams, a
                # client's disconnect, the operations port and signals would all wait).
                await asyncio.sleep(0)
        except GatewayError as exc:
            error = exc
        if error is None and self.aborted is not None and not self.stats.completed:
            error = self.aborted
        if error is not None:
            self.stats.error_code = error.code
            self.stats.error = error
            # Stop the engine first (closing its request aborts the generation), then tell the
            # client, whose connection may be slow to take the last event.
            await self.aclose()
            await send(sse_error_event(error))

    async def aclose(self) -> None:
        """Close the engine's response (and so its connection: vLLM aborts the generation).

        Shielded: a second cancellation (the client left while the relay was already ending) must
        not interrupt the close half-way and leave the engine generating for nobody.
        """
        with contextlib.suppress(Exception):
            await asyncio.shield(self.response.aclose())
