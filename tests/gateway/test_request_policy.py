"""The request field table of DESIGN §7: pass, set, dropped, capped (pure, no I/O)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequest
from gateway.request_policy import (
    DROPPED,
    PASS_CHAT,
    PASS_COMPLETIONS,
    SET_BY_GATEWAY,
    Endpoint,
    Limits,
    prepare,
)

LIMITS = Limits(
    max_n=4, max_output_tokens=1000, max_top_logprobs=5, max_prompt_logprobs=5, max_schema_bytes=2000
)
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(body: dict[str, Any], passthrough: tuple[str, ...] = ()) -> dict[str, Any]:
    return prepare(Endpoint.CHAT, body, cache_salt="salt-1", limits=LIMITS, passthrough=passthrough).payload


def test_lists_are_disjoint() -> None:
    assert not (PASS_CHAT & DROPPED) and not (PASS_COMPLETIONS & DROPPED)
    assert not (PASS_CHAT & SET_BY_GATEWAY) and not (PASS_COMPLETIONS & SET_BY_GATEWAY)
    named = {
        "kv_transfer_params",
        "request_id",
        "priority",
        "chat_template",
        "chat_template_kwargs",
        "logits_processors",
        "vllm_xargs",
        "mm_processor_kwargs",
        "cache_salt",
    }
    assert named <= DROPPED


def test_pass_fields_reach_the_engine() -> None:
    body = {
        "messages": MESSAGES,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["x"],
        "seed": 7,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 2,
        "logit_bias": {"5": 1.0},
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "user": "u1",
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "min_tokens": 3,
        "structured_outputs": {"choice": ["a", "b"]},
    }
    payload = chat(body)
    for name, value in body.items():
        assert payload[name] == value, name


def test_model_is_never_taken_from_the_client() -> None:
    payload = chat({"messages": MESSAGES, "model": "lora-0123456789abcdef"})
    assert "model" not in payload  # set per engine attempt by the proxy


def test_dropped_and_unknown_fields() -> None:
    body: dict[str, Any] = {"messages": MESSAGES, "surprise": 1, "functions": []}
    body.update({name: {"x": 1} for name in DROPPED})
    payload = chat(body)
    assert payload["cache_salt"] == "salt-1"
    for name in DROPPED - {"cache_salt"}:
        assert name not in payload, name
    assert "surprise" not in payload and "functions" not in payload


def test_passthrough_allows_unknown_fields_but_never_dropped_ones() -> None:
    payload = chat(
        {"messages": MESSAGES, "surprise": 1, "chat_template": "x", "cache_salt": "mine"},
        passthrough=("surprise", "chat_template", "cache_salt"),
    )
    assert payload["surprise"] == 1
    assert "chat_template" not in payload
    assert payload["cache_salt"] == "salt-1"


def test_stream_options() -> None:
    streamed = prepare(
        Endpoint.CHAT,
        {
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
        cache_salt="s",
        limits=LIMITS,
    )
    assert streamed.stream and streamed.include_usage
    assert streamed.payload["stream_options"] == {"include_usage": True}
    quiet = prepare(Endpoint.CHAT, {"messages": MESSAGES, "stream": True}, cache_salt="s", limits=LIMITS)
    assert quiet.stream and not quiet.include_usage
    assert quiet.payload["stream_options"] == {"include_usage": True}  # asked of the engine, stripped later
    for stream in (False, None):
        body: dict[str, Any] = {"messages": MESSAGES, "stream_options": {"include_usage": True}}
        if stream is not None:
            body["stream"] = stream
        plain = prepare(Endpoint.CHAT, body, cache_salt="s", limits=LIMITS)
        assert not plain.stream and "stream_options" not in plain.payload


def test_max_tokens_normalised() -> None:
    assert chat({"messages": MESSAGES, "max_tokens": 10}) == {
        "messages": MESSAGES,
        "max_completion_tokens": 10,
        "cache_salt": "salt-1",
    }
    assert chat({"messages": MESSAGES, "max_completion_tokens": 12})["max_completion_tokens"] == 12
    both = chat({"messages": MESSAGES, "max_completion_tokens": 12, "max_tokens": 99})
    assert both["max_completion_tokens"] == 12 and "max_tokens" not in both
    completion = prepare(
        Endpoint.COMPLETIONS, {"prompt": "x", "max_completion_tokens": 9}, cache_salt="s", limits=LIMITS
    ).payload
    assert completion["max_tokens"] == 9 and "max_completion_tokens" not in completion


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 5),
        ("n", 0),
        ("n", "2"),
        ("n", True),
        ("max_tokens", 1001),
        ("max_completion_tokens", 10**9),
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("min_tokens", 1001),
        ("top_logprobs", 6),
        ("prompt_logprobs", 6),
        ("prompt_logprobs", -1),
        ("response_format", {"type": "json_schema", "json_schema": {"schema": {"d": "x" * 3000}}}),
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"d": "x" * 3000}}}]),
        ("structured_outputs", {"json": {"d": "x" * 3000}}),
        ("stream", "yes"),
    ],
)
def test_capped_and_typed_fields(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        chat({"messages": MESSAGES, field: value})
    assert info.value.param == field
    assert info.value.status_code == 400


@pytest.mark.parametrize("body", [[], [1, 2], "text", 3, None, {}, {"messages": []}, {"messages": "hi"}])
def test_chat_body_shape(body: Any) -> None:
    with pytest.raises(InvalidRequest):
        prepare(Endpoint.CHAT, body, cache_salt="s", limits=LIMITS)


@pytest.mark.parametrize("body", [{}, {"prompt": []}, {"prompt": 3}, {"messages": MESSAGES}])
def test_completions_body_shape(body: Any) -> None:
    with pytest.raises(InvalidRequest):
        prepare(Endpoint.COMPLETIONS, body, cache_salt="s", limits=LIMITS)


def test_stream_options_must_be_an_object_when_streaming() -> None:
    with pytest.raises(InvalidRequest):
        chat({"messages": MESSAGES, "stream": True, "stream_options": "yes"})
    # …and are ignored entirely when not streaming (never a failure).
    assert "stream_options" not in chat({"messages": MESSAGES, "stream_options": "yes"})
