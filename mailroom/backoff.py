"""Capped exponential backoff with jitter, shared by reconnects and webhook retries, and the
``Retry-After`` a peer may ask for."""

from __future__ import annotations

import email.utils
import random
import time
from datetime import UTC

__all__ = ["backoff_delay", "retry_after"]


def backoff_delay(attempt: int, *, initial_s: float, max_s: float) -> float:
    """Delay before retry number ``attempt`` (1-based): half fixed, half random ("equal jitter").

    The cap keeps it at most ``max_s``; the fixed half keeps it from collapsing to zero, and the
    random half keeps replicas that failed together from retrying together.
    """
    ceiling: float = min(max_s, initial_s * 2.0 ** min(max(attempt - 1, 0), 32))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²": str.isdigit() takes more than 0-9
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 §5.6.7: HTTP-dates are GMT; "-0000" parses naive
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())
