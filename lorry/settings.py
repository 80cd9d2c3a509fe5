"""One typed settings object per process (DESIGN §12). Built by the caller, never at import."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_RESERVED_SLUGS = (
    "www",
    "api",
    "admin",
    "app",
    "console",
    "dashboard",
    "docs",
    "status",
    "mail",
    "smtp",
    "static",
    "assets",
    "cdn",
    "auth",
    "login",
    "metrics",
    "health",
    "lorry",
)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lorry"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


_CSV_FIELDS = ("import_roots", "cors_origins", "passthrough_fields", "reserved_slugs", "trusted_proxies")


class LorrySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORRY_", extra="ignore", frozen=True)

    database_url: str = "sqlite+aiosqlite:///./.lorry/lorry.db"
    base_domain: str = "lorry.localhost"
    public_url_template: str = "https://{slug}.{base_domain}/v1"
    path_routing: bool = False
    adapter_store: Path = Path("./.lorry/adapters")
    import_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    max_lora_rank: int = Field(default=64, ge=1, le=512)
    bootstrap_admin_token: str | None = None
    engines: list[dict[str, Any]] = Field(default_factory=list)
    shutdown_deadline_s: float = Field(default=30.0, ge=0)
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_first_byte_timeout_s: float = Field(default=120.0, gt=0)
    upstream_idle_timeout_s: float = Field(default=60.0, gt=0)
    upstream_total_timeout_s: float = Field(default=1800.0, gt=0)
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    passthrough_fields: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Reverse proxies whose X-Forwarded-For the gateway believes (addresses or CIDR ranges).
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)

    reserved_slugs: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_RESERVED_SLUGS)
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_upload_bytes: int = Field(default=1_073_741_824, ge=1024)
    change_log_retention_s: float = Field(default=86_400.0, gt=0)
    log_level: str = "info"
    # Run `alembic upgrade head` on start: the embedded default; production runs `lorry migrate`.
    auto_migrate: bool = False

    @field_validator(*_CSV_FIELDS, mode="before")
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR range") from None
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def public_url(self, slug: str) -> str:
        return self.public_url_template.format(slug=slug, base_domain=self.base_domain)
