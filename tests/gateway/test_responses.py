"""Response rewriting (DESIGN §7) on vLLM's real shapes and messages (pure, no I/O)."""

from __future__ import annotations

import orjson
import pytest

from gateway.errors import (
    AdapterLoadFailed,
    InvalidRequest,
    NoEngine,
    UpstreamError,
    UpstreamUnavailable,
    error_response,
)
from gateway.responses import (
    SSEBuffer,
    StreamProtocolError,
    StreamRewriter,
    engine_error,
    is_model_missing,
    rewrite_json_body,
    sanitise_message,
)

ADAPTER = "lora-0123456789abcdef"


def vllm_error(message: str, code: int, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": "BadRequestError", "param": param, "code": code}}
    )


@pytest.mark.parametrize(
    "message",
    [
        f"The model `{ADAPTER}` does not exist. Valid aliases: lorry/tiny-llama, {ADAPTER}.",
        f"Loading lora {ADAPTER} failed: No adapter found for /srv/lorry/adapters/abc123",
        "add_lora failed: could not read /var/lib/lorry/store/deadbeef/adapter_model.safetensors",
        "engine at http://10.0.0.5:8000/v1 failed",
    ],
)
def test_sanitise_removes_internal_names_paths_and_aliases(message: str) -> None:
    cleaned = sanitise_message(message, "support-bot")
    assert ADAPTER not in cleaned
    assert "Valid aliases" not in cleaned
    assert "/srv/" not in cleaned and "/var/lib" not in cleaned and "10.0.0.5" not in cleaned
    assert cleaned


def test_sanitise_keeps_useful_validation_messages() -> None:
    message = (
        "max_tokens=5000 cannot be greater than max_model_len=4096. Please request fewer output tokens. "
        "(parameter=max_tokens, value=5000)"
    )
    assert sanitise_message(message, "bot") == message
    assert len(sanitise_message("x" * 5000, "bot")) <= 1000


def test_engine_error_mapping() -> None:
    invalid = engine_error(400, vllm_error("max_tokens too big", 400, "max_tokens"), "bot")
    assert isinstance(invalid, InvalidRequest) and invalid.param == "max_tokens"
    hidden = engine_error(500, vllm_error(f"EngineCore failed for {ADAPTER} at /x/y/z", 500), "bot")
    assert (
        isinstance(hidden, UpstreamError) and ADAPTER not in hidden.message and "/x/y" not in hidden.message
    )
    assert isinstance(engine_error(503, b"", "bot"), UpstreamUnavailable)
    fastapi_422 = engine_error(422, orjson.dumps({"detail": [{"loc": ["body", "messages"]}]}), "bot")
    assert isinstance(fastapi_422, InvalidRequest)
    model_param = engine_error(400, vllm_error("bad model", 400, "model"), "bot")
    assert model_param.param is None
    assert is_model_missing(404, vllm_error(f"The model `{ADAPTER}` does not exist.", 404, "model"))
    assert not is_model_missing(404, vllm_error("Not Found", 404))
    assert not is_model_missing(400, vllm_error("does not exist", 400))


def test_error_headers() -> None:
    load = error_response(AdapterLoadFailed())
    assert load.status_code == 502 and load.headers["x-should-retry"] == "false"
    unavailable = error_response(NoEngine())
    assert unavailable.status_code == 503 and unavailable.headers["retry-after"]
    assert "x-should-retry" not in unavailable.headers
    body = orjson.loads(bytes(load.body))
    assert body == {
        "error": {
            "message": AdapterLoadFailed.default_message,
            "type": "server_error",
            "param": None,
            "code": "adapter_load_failed",
        }
    }


def test_json_body_model_rewritten_and_usage_counted() -> None:
    seen: list[tuple[int, int]] = []
    body = orjson.dumps(
        {"id": "x", "model": ADAPTER, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    )
    out = orjson.loads(rewrite_json_body(body, "bot", lambda p, c: seen.append((p, c))))
    assert out["model"] == "bot" and seen == [(3, 4)]
    with pytest.raises(UpstreamError):
        rewrite_json_body(b"<html>", "bot", None)


def chunk(**fields: object) -> bytes:
    return b"data: " + orjson.dumps(
        {"id": "c", "object": "chat.completion.chunk", "model": ADAPTER, **fields}
    )


def test_stream_rewriter() -> None:
    usage_seen: list[tuple[int, int]] = []
    quiet = StreamRewriter("bot", include_usage=False, on_usage=lambda p, c: usage_seen.append((p, c)))
    content = quiet.event(chunk(choices=[{"index": 0, "delta": {"content": "Hi"}}]))
    assert content.data is not None and content.content
    assert orjson.loads(content.data[len(b"data: ") :])["model"] == "bot"
    assert content.data.endswith(b"\n\n")
    usage_chunk = chunk(choices=[], usage={"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7})
    assert quiet.event(usage_chunk).data is None  # not asked for: dropped, but counted
    assert usage_seen == [(2, 5)]
    loud = StreamRewriter("bot", include_usage=True)
    kept = loud.event(usage_chunk)
    assert kept.data is not None and b'"usage"' in kept.data
    done = quiet.event(b"data: [DONE]")
    assert done.done and done.data == b"data: [DONE]\n\n"
    assert quiet.event(b": keep-alive").data == b": keep-alive\n\n"
    error = quiet.event(b'data: {"error":{"message":"boom in ' + ADAPTER.encode() + b'","code":500}}')
    assert error.error and error.data is not None and ADAPTER.encode() not in error.data
    assert b'"code":"upstream_error"' in error.data
    with pytest.raises(StreamProtocolError):
        quiet.event(b"data: {not json")


def test_sse_buffer_splits_across_reads() -> None:
    buffer = SSEBuffer(max_event_bytes=1000)
    assert buffer.feed(b"data: one\n") == []
    assert buffer.feed(b"\ndata: tw") == [b"data: one"]
    assert buffer.feed(b"o\r\n\r\ndata: three\n\n") == [b"data: two", b"data: three"]
    with pytest.raises(StreamProtocolError):
        buffer.feed(b"x" * 2000)
