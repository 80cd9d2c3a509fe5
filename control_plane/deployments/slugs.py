"""Deployment slugs: hostnames, so lowercase DNS labels with a few extra rules (DESIGN §4)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from lorry.errors import InvalidRequest

MIN_LEN = 2
MAX_LEN = 50
# For the published schema; `check_slug` is what enforces it, rule by rule, with clear messages.
PATTERN = r"^(?!.*--)[a-z0-9][a-z0-9-]*[a-z0-9]$"
_ALLOWED = re.compile(r"[a-z0-9-]+")


def slug_problem(slug: str, reserved: Iterable[str]) -> str | None:
    """Why `slug` cannot be a deployment slug, or None when it can."""
    if not MIN_LEN <= len(slug) <= MAX_LEN:
        return f"Slug must be {MIN_LEN} to {MAX_LEN} characters long (got {len(slug)})"
    if _ALLOWED.fullmatch(slug) is None:
        return "Slug may contain only lowercase letters a-z, digits 0-9 and '-'"
    if slug[0] == "-" or slug[-1] == "-":
        return "Slug must start and end with a lowercase letter or a digit"
    if "--" in slug:
        return "Slug may not contain '--'"
    if slug in {name.lower() for name in reserved}:
        return f"Slug '{slug}' is reserved"
    return None


def check_slug(slug: str, reserved: Iterable[str]) -> None:
    problem = slug_problem(slug, reserved)
    if problem is not None:
        raise InvalidRequest(problem, code="invalid_slug")
