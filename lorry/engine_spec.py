"""An engine as Lorry sees it, and the engines configured statically in ``LORRY_ENGINES``.

Shared by the control plane (which also keeps engines in the database) and the gateway, so both
read the same list the same way: one set of checks and one normalisation.
"""

from __future__ import annotations

import re
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from lorry.settings import LorrySettings

STATIC_ID_PREFIX = "static:"
NAME_PATTERN = r"[a-z0-9][a-z0-9_.-]*"
MAX_URL_LENGTH = 500
MAX_PATH_LENGTH = 500
_NAME_RE = re.compile(NAME_PATTERN)


def _has_control_or_space(value: str) -> bool:
    return any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in value)


def check_engine_name(name: str) -> str:
    """Names are unique across the catalogue and appear in logs and metrics labels."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            "must start with a lowercase letter or digit and contain only lowercase letters, digits, "
            "'-', '_' and '.'"
        )
    return name


def normalise_engine_url(url: str) -> str:
    """An absolute http(s) URL without credentials, query or fragment; no trailing slash."""
    if not url or _has_control_or_space(url):
        raise ValueError("must be a non-empty URL without whitespace or control characters")
    if "?" in url or "#" in url:
        raise ValueError("must not have a query or fragment")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("must be an absolute http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("must not carry credentials; give the engine an apiKey instead")
    if not parts.hostname:
        raise ValueError("must name a host")
    if port == 0:
        raise ValueError("has an invalid port")
    normalised = urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))
    if len(normalised) > MAX_URL_LENGTH:
        raise ValueError(f"must be at most {MAX_URL_LENGTH} characters")
    return normalised


def normalise_adapter_root(path: str) -> str:
    """An absolute POSIX path as the engine sees the store: no `..`, no empty or `.` segments."""
    if not path.startswith("/"):
        raise ValueError("must be an absolute path")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        raise ValueError("must not contain control characters")
    segments = [segment for segment in path.split("/") if segment not in ("", ".")]
    if ".." in segments:
        raise ValueError("must not contain '..'")
    normalised = "/" + "/".join(segments)
    if len(normalised) > MAX_PATH_LENGTH:
        raise ValueError(f"must be at most {MAX_PATH_LENGTH} characters")
    return normalised


def default_adapter_root(settings: LorrySettings) -> str:
    """Where an engine on this host sees the store when none is given: the store itself."""
    return settings.adapter_store.resolve().as_posix()


def check_lora_capacity(max_loras: int, max_cpu_loras: int | None) -> None:
    if max_cpu_loras is not None and max_cpu_loras < max_loras:
        raise ValueError(f"maxCpuLoras ({max_cpu_loras}) must be at least maxLoras ({max_loras})")


class ServingEngine(Protocol):
    @property
    def enabled(self) -> bool: ...
    @property
    def base_model(self) -> str: ...
    @property
    def max_lora_rank(self) -> int: ...


def engine_serves(engine: ServingEngine, base_model: str | None, rank: int | None) -> bool:
    """Whether ``engine`` can serve a deployment of ``base_model`` (with an adapter of ``rank``):
    the one rule for the control plane's status and the gateway's routing."""
    return (
        engine.enabled
        and base_model is not None
        and engine.base_model == base_model
        and (rank is None or engine.max_lora_rank >= rank)
    )


class EngineSpec(BaseModel):
    """One engine as the catalogue sees it; `id` of a static engine is `static:<name>`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    id: str = ""
    name: str = Field(min_length=1, max_length=100)
    url: str = Field(min_length=1, max_length=500)
    base_model: str = Field(min_length=1, max_length=300)
    served_model_name: str = ""
    adapter_root: str = ""
    max_loras: int = Field(default=4, ge=1)
    max_cpu_loras: int | None = Field(default=None, ge=1)
    max_lora_rank: int = Field(default=16, ge=1)
    enabled: bool = True
    api_key: str | None = Field(default=None, exclude=True, repr=False)
    source: str = "api"

    def serves(self, base_model: str | None, rank: int | None) -> bool:
        return engine_serves(self, base_model, rank)


def static_engines(settings: LorrySettings) -> list[EngineSpec]:
    """Engines from LORRY_ENGINES; a malformed entry is a startup error, not a silent skip.

    They get the same checks and normalisation as engines created through the API.
    """
    engines: list[EngineSpec] = []
    names: set[str] = set()
    for index, raw in enumerate(settings.engines):
        try:
            spec = EngineSpec.model_validate(raw)
            check_engine_name(spec.name)
            if spec.name in names:
                raise ValueError(f"the name '{spec.name}' is used twice")
            names.add(spec.name)
            check_lora_capacity(spec.max_loras, spec.max_cpu_loras)
            update = {
                "id": f"{STATIC_ID_PREFIX}{spec.name}",
                "source": "static",
                "url": normalise_engine_url(spec.url),
                "served_model_name": spec.served_model_name or spec.base_model,
                "adapter_root": (
                    normalise_adapter_root(spec.adapter_root)
                    if spec.adapter_root
                    else default_adapter_root(settings)
                ),
            }
        except ValueError as exc:  # pydantic's ValidationError included
            raise ValueError(f"LORRY_ENGINES[{index}] is not a valid engine: {exc}") from exc
        engines.append(spec.model_copy(update=update))
    return engines
