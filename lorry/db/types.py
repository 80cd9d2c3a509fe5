"""Column types that behave the same on PostgreSQL and SQLite."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Dialect
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def is_id(value: str) -> bool:
    """Ids are canonical UUID strings; anything else cannot name a row (and is never sent to SQL)."""
    return _ID.fullmatch(value) is not None


def isoformat(value: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.sssZ``, the one wire format for timestamps (milliseconds truncated).

    A naive value is refused rather than read as the server's local time; the year is always four
    digits (``strftime("%Y")`` drops the zero padding below year 1000 on glibc).
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetimes have no wire format; use an aware UTC value")
    v = value.astimezone(UTC)
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}"
        f".{v.microsecond // 1000:03d}Z"
    )


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, also on SQLite, which stores naive values."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use an aware UTC value")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
