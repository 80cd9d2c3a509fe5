"""What rolling a credential does to the old one; shared by admin tokens and deployment keys."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol


class Rollable(Protocol):
    revoked_at: datetime | None
    expires_at: datetime | None


def end_with_grace(old: Rollable, now: datetime, grace_period_seconds: int) -> datetime | None:
    """Shorten the old credential's life to the grace period (0 revokes it now), never lengthen it.

    Returns its original expiry, which the successor inherits: rolling never extends a lifetime.
    """
    original_expiry = old.expires_at
    ends_at = now + timedelta(seconds=grace_period_seconds)
    if grace_period_seconds == 0:
        old.revoked_at = now
        old.expires_at = now
    elif original_expiry is None or ends_at < original_expiry:
        old.expires_at = ends_at
    return original_expiry
