"""Capped exponential backoff with jitter, shared by reconnects and webhook retries."""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, *, initial_s: float, max_s: float) -> float:
    """Delay before retry number ``attempt`` (1-based): half fixed, half random ("equal jitter").

    The cap keeps it at most ``max_s``; the fixed half keeps it from collapsing to zero, and the
    random half keeps replicas that failed together from retrying together.
    """
    ceiling: float = min(max_s, initial_s * 2.0 ** min(max(attempt - 1, 0), 32))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
