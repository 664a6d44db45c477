"""Timestamps as stores keep them: UTC, millisecond precision."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["now"]


def now() -> datetime:
    """The current UTC time, truncated to milliseconds."""
    stamp = datetime.now(timezone.utc)
    return stamp.replace(microsecond=stamp.microsecond // 1000 * 1000)
