"""Delivered markers: with replicas, a message is posted once even when its owner changes.

After a message came to its outcome (the webhook answered 2xx, a notice went or was refused,
auto-generated mail was ignored, a permanent failure was dead-lettered), its outcome is recorded
under its webhook-id in the store replicas share, *before* the message is settled on the server.
A replica that finds such a message unsettled (its owner died between the two) settles it
without posting it again. Without replicas (``shared`` is None) there is nothing to check.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from mailroom.backoff import Backoff, Retry
from mailroom.envelope import Envelope, Outcome
from mailroom.errors import ArbitrationError

__all__ = ["UNKNOWN", "Markers", "Shared"]

log = logging.getLogger("mailroom.delivery.dispatch")

# About 5 s in all: then the message is settled anyway (settled mail is not read again).
RECORD_RETRY = Backoff(initial_s=0.2, max_s=2.0, attempts=8)
UNKNOWN = "unknown"  # seen() could not ask: the message waits for the next sweep


class Shared(Protocol):
    """What replicas share (``arbitration.RedisStore``)."""

    async def delivered(self, webhook_id: str) -> str | None: ...

    async def record(self, webhook_id: str, outcome: str) -> None: ...

    async def allow_notice(self, recipient: str, reason: str, window_s: float) -> bool: ...


class Markers:
    """Checks and records markers for the dispatcher."""

    def __init__(self, shared: Shared | None) -> None:
        self.shared = shared

    async def seen(self, envelope: Envelope, fields: dict[str, Any]) -> Outcome | str | None:
        """The outcome another replica recorded for ``envelope``, None when there is none, or
        ``UNKNOWN`` when the store cannot be asked."""
        if self.shared is None:
            return None
        try:
            value = await self.shared.delivered(envelope.idempotency_key)
        except ArbitrationError as exc:
            log.warning(
                "%s: %s: cannot ask whether another replica already delivered it (%s); left "
                "for the next sweep",
                envelope.mailbox,
                envelope.ref,
                exc,
                extra=fields,
            )
            return UNKNOWN
        if value is None:
            return None
        try:
            return Outcome(value)
        except ValueError:
            return Outcome.DELIVERED  # a marker of a newer version: it was settled anyway

    async def record(self, envelope: Envelope, outcome: Outcome, fields: dict[str, Any]) -> None:
        """Record ``outcome`` before the message is settled; retried for a few seconds, then
        given up (settling it is what keeps it from being read again)."""
        if self.shared is None:
            return
        retry = Retry(RECORD_RETRY)
        while True:
            attempt = retry.begin()
            try:
                await self.shared.record(envelope.idempotency_key, outcome.value)
                return
            except ArbitrationError as exc:
                delay = retry.delay()
                if delay is None:
                    log.warning(
                        "%s: %s: its delivered marker could not be written (%d attempts, last: "
                        "%s); settling it anyway",
                        envelope.mailbox,
                        envelope.ref,
                        attempt,
                        exc,
                        extra={**fields, **retry.extra(exc, None)},
                    )
                    return
                await retry.wait(
                    log,
                    logging.DEBUG,
                    f"{envelope.mailbox}: {envelope.ref}: writing its delivered marker:",
                    exc,
                    delay_s=delay,
                    fields=fields,
                )
