"""Retrying, written once: a ``Backoff`` policy and ``Retry``, one operation's attempts under it.

A policy says how long to wait before each next attempt (capped exponential delays with
"equal jitter"), when to give up (a deadline, a number of attempts, or never), and how far a
peer's ``Retry-After`` is honoured: never sooner than the policy's own delay nor its floor (so
``Retry-After: 0`` or a past date cannot make a tight loop), never later than its cap.

Every loop that retries uses it: a source reconnecting (``sources.lifecycle``), a webhook
post and its circuit (``delivery.posting``, ``delivery.circuit``), a reject notice
(``delivery.reject``), a delivered marker (``delivery.markers``), and the one more attempt
after a fix (``ONCE_MORE``: a fresh token after Graph's 401, a folder created after IMAP's
TRYCREATE). Each logs what failed, the attempt and what comes next (``Retry.extra``).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

__all__ = ["ONCE_MORE", "Backoff", "Retry", "retry_after"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    """A retry policy.

    ``initial_s`` and ``max_s`` bound the exponential delays; ``give_up_after_s`` (since the
    first attempt began) and ``attempts`` (in all, the first included) say when to stop, None
    for never. A ``Retry-After`` is clamped to ``[max(delay, retry_after_min_s),
    retry_after_max_s]``, the cap being ``max_s`` unless given.
    """

    initial_s: float
    max_s: float
    give_up_after_s: float | None = None
    attempts: int | None = None
    jitter: bool = True
    retry_after_min_s: float = 0.0
    retry_after_max_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.initial_s <= self.max_s:
            raise ValueError(f"backoff: need 0 <= initial_s <= max_s, not {self!r}")
        if self.initial_s == 0 and self.attempts is None:
            raise ValueError("backoff: without a delay the attempts must be capped (it would spin)")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"backoff: attempts must be at least 1, not {self.attempts}")

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """The delay after failed attempt number ``attempt`` (1-based), honouring a
        ``Retry-After`` of ``retry_after_s`` seconds within the clamp.

        With jitter, half of it is fixed and half random: the fixed half keeps it from
        collapsing to zero, the random half keeps replicas that failed together from retrying
        together.
        """
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(max(attempt - 1, 0), 32))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2) if self.jitter else ceiling
        if retry_after_s is None:
            return delay
        cap = self.max_s if self.retry_after_max_s is None else self.retry_after_max_s
        return min(max(retry_after_s, delay, self.retry_after_min_s), cap)


# One more attempt at once, after something was fixed (a fresh token, a created folder).
ONCE_MORE = Backoff(initial_s=0.0, max_s=0.0, attempts=2, jitter=False)


class Retry:
    """The attempts of one operation under ``policy``.

    Call ``begin`` as each attempt starts; after it failed, ``delay`` says how long to wait
    before the next one, or None: give up (the attempts are spent, or the deadline would pass
    before the next one).
    """

    def __init__(self, policy: Backoff, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.attempt = 0  # attempts begun
        self._clock = clock
        self._started = clock()

    def begin(self) -> int:
        """A new attempt starts; returns its number (1-based)."""
        self.attempt += 1
        return self.attempt

    @property
    def elapsed_s(self) -> float:
        """Since the first attempt began."""
        return self._clock() - self._started

    @property
    def left_s(self) -> float | None:
        """Until the give-up deadline (None: none)."""
        deadline = self.policy.give_up_after_s
        return None if deadline is None else deadline - self.elapsed_s

    def delay(self, retry_after_s: float | None = None) -> float | None:
        """Attempt ``attempt`` failed: the delay before the next one, or None to give up."""
        policy = self.policy
        if policy.attempts is not None and self.attempt >= policy.attempts:
            return None
        delay = policy.delay(self.attempt, retry_after_s)
        left = self.left_s
        if left is not None and delay > left:
            return None
        return delay

    async def wait(
        self,
        logger: logging.Logger,
        level: int,
        what: str,
        exc: BaseException,
        *,
        delay_s: float,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        """Log ``<what> attempt <n> failed: <exc>; retrying in <delay>s`` (with the attempt,
        the error's class and the delay as fields beside ``fields``), then wait ``delay_s``."""
        logger.log(
            level,
            "%s attempt %d failed: %s; retrying in %.1fs",
            what,
            self.attempt,
            exc,
            delay_s,
            extra={**(fields or {}), **self.extra(exc, delay_s)},
        )
        await asyncio.sleep(delay_s)

    def extra(self, exc: BaseException | None, delay_s: float | None) -> dict[str, Any]:
        """The structured fields of a retry's log line: what failed, which attempt, and the
        delay before the next (None: given up)."""
        fields: dict[str, Any] = {"attempt": self.attempt}
        if exc is not None:
            fields["error"] = type(exc).__name__
        if delay_s is not None:
            fields["delay_s"] = round(delay_s, 3)
        return fields


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
