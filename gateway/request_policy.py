"""What a client may send to an engine: the field table of DESIGN §7.

Four lists decide every top-level field of a chat or completions body:

- **pass** — OpenAI fields and named vLLM sampling extras, forwarded as sent (typed checks are
  the engine's job; its error messages are rewritten on the way back);
- **set** — written by the gateway whatever the client sent: ``model`` (the engine-side name),
  ``cache_salt`` (per deployment) and ``stream_options`` (``include_usage`` only when streaming);
- **dropped** — never forwarded, even when ``LORRY_PASSTHROUGH_FIELDS`` names them;
- **capped** — checked against limits and refused with 400 above them.

Anything else is dropped unless ``LORRY_PASSTHROUGH_FIELDS`` lets it through.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import InvalidRequest


class Endpoint(enum.StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"


# -- the field table ----------------------------------------------------------------------------

PASS_COMMON: frozenset[str] = frozenset(
    {
        # OpenAI
        "temperature",
        "top_p",
        "n",
        "stream",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "response_format",
        "echo",
        # vLLM sampling extras
        "top_k",
        "min_p",
        "repetition_penalty",
        "length_penalty",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "min_tokens",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "truncate_prompt_tokens",
        "prompt_logprobs",
        "allowed_token_ids",
        "bad_words",
        "structured_outputs",
        "add_special_tokens",
        "repetition_detection",
    }
)
PASS_CHAT: frozenset[str] = PASS_COMMON | {
    "messages",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
    "include_reasoning",
    "add_generation_prompt",
    "continue_final_message",
}
PASS_COMPLETIONS: frozenset[str] = PASS_COMMON | {"prompt", "logprobs", "suffix"}

SET_BY_GATEWAY: frozenset[str] = frozenset({"model", "cache_salt", "stream_options"})

DROPPED: frozenset[str] = frozenset(
    {
        "kv_transfer_params",
        "ec_transfer_params",
        "request_id",
        "priority",
        "chat_template",
        "chat_template_kwargs",
        "logits_processors",
        "vllm_xargs",
        "mm_processor_kwargs",
        "media_io_kwargs",
        "cache_salt",
        "prompt_embeds",
        "session_id",
        "stream_interval",
        "documents",
    }
)
# stream_options: only include_usage is read; continuous_usage_stats is never forwarded.

# Normalised to one field: chat sends `max_completion_tokens`, completions `max_tokens`
# (LangChain sends only `max_completion_tokens`; older clients only `max_tokens`).
MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")
SCHEMA_FIELDS = ("response_format", "structured_outputs", "tools")


@dataclass(frozen=True, slots=True)
class Limits:
    max_n: int = 8
    max_output_tokens: int = 32_768
    max_top_logprobs: int = 20
    max_prompt_logprobs: int = 20
    max_schema_bytes: int = 65_536


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """The engine payload without ``model`` (set per engine attempt) and what the client asked."""

    endpoint: Endpoint
    payload: dict[str, Any]
    stream: bool
    include_usage: bool


def _int_field(body: dict[str, Any], name: str, *, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be an integer", param=name)
    if value < low or value > high:
        raise InvalidRequest(
            f"'{name}' must be between {low} and {high} on this deployment (got {value})", param=name
        )
    return value


def _check_caps(endpoint: Endpoint, body: dict[str, Any], limits: Limits) -> int | None:
    _int_field(body, "n", low=1, high=limits.max_n)
    max_tokens = None
    for name in MAX_TOKEN_FIELDS:
        value = _int_field(body, name, low=1, high=limits.max_output_tokens)
        if max_tokens is None:
            max_tokens = value
    _int_field(body, "min_tokens", low=0, high=limits.max_output_tokens)
    if endpoint is Endpoint.CHAT:
        _int_field(body, "top_logprobs", low=0, high=limits.max_top_logprobs)
    else:
        _int_field(body, "logprobs", low=0, high=limits.max_top_logprobs)
    _int_field(body, "prompt_logprobs", low=0, high=limits.max_prompt_logprobs)
    for name in SCHEMA_FIELDS:
        value = body.get(name)
        if value is not None and len(orjson.dumps(value)) > limits.max_schema_bytes:
            raise InvalidRequest(
                f"'{name}' is larger than {limits.max_schema_bytes} bytes on this deployment", param=name
            )
    return max_tokens


def prepare(
    endpoint: Endpoint,
    body: Any,
    *,
    cache_salt: str,
    limits: Limits,
    passthrough: Iterable[str] = (),
) -> PreparedRequest:
    """Applies the field table; raises :class:`InvalidRequest` (400) for a body it cannot send."""
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    if endpoint is Endpoint.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' is required and must be a non-empty array", param="messages")
        allowed = PASS_CHAT
    else:
        prompt = body.get("prompt")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
            raise InvalidRequest("'prompt' is required: a string or a non-empty array", param="prompt")
        allowed = PASS_COMPLETIONS
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    streaming = stream is True
    max_tokens = _check_caps(endpoint, body, limits)

    extra = frozenset(passthrough) - DROPPED - SET_BY_GATEWAY - set(MAX_TOKEN_FIELDS)
    payload: dict[str, Any] = {
        name: value for name, value in body.items() if (name in allowed or name in extra)
    }
    if max_tokens is not None:
        payload["max_completion_tokens" if endpoint is Endpoint.CHAT else "max_tokens"] = max_tokens

    include_usage = False
    if streaming:
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object", param="stream_options")
        include_usage = bool(options and options.get("include_usage") is True)
        # Always asked of the engine, for the token metrics; stripped again if the client did not ask.
        payload["stream_options"] = {"include_usage": True}
    payload["cache_salt"] = cache_salt
    return PreparedRequest(endpoint=endpoint, payload=payload, stream=streaming, include_usage=include_usage)
