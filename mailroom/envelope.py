"""The one interface between sources and the dispatcher.

A source (IMAP, Graph) hands the dispatcher an ``Envelope``: the exact bytes it fetched and a
``settle`` coroutine it implements. The dispatcher decides an ``Outcome`` and calls ``settle``
exactly once, only after the outcome is known; until then the message stays untouched on the
server, so a crash or a restart finds it again (at-least-once). A message the dispatcher will
not bring to an outcome now (shutting down, a dry run) is ``release``d instead.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

__all__ = ["FAILED_CATEGORY", "FAILED_KEYWORD", "Envelope", "Outcome"]

# How a dead letter without failed_folder is marked where it lies: this IMAP keyword (and \Seen),
# the only keyword mailroom writes; on Graph, this category (and read).
FAILED_KEYWORD = "$MailroomFailed"
FAILED_CATEGORY = "MailroomFailed"


class Outcome(enum.Enum):
    """What happened to a message; the source maps it to seen/delete/move/flag."""

    DELIVERED = "delivered"  # webhook 2xx (or 422 with a reject reason, notice handled)
    REJECTED = "rejected"  # not for us: reject notice sent or refused by policy
    IGNORED = "ignored"  # auto-generated: dropped without a reply
    DEAD_LETTERED = "dead_lettered"  # permanent failure: failed_folder or $MailroomFailed

    @property
    def processed(self) -> bool:
        """Delivered, rejected and ignored mail is settled alike (docs/delivery.md)."""
        return self is not Outcome.DEAD_LETTERED


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """One fetched message on its way to an outcome."""

    mailbox: str
    ref: str  # the source's own name for the message, for logs ("uid 42")
    idempotency_key: str  # stable across restarts: the webhook-id
    raw: bytes = field(repr=False)
    size: int
    too_large: bool = False  # raw holds only the header block; the body was not fetched
    native_id: str = ""  # its id where it lies (IMAP UID, Graph message id): MailRoom's claims
    _settle: Callable[[Outcome], Awaitable[None]] = field(repr=False)
    _release: Callable[[bool], None] = field(repr=False, default=lambda hold: None)

    async def settle(self, outcome: Outcome) -> None:
        """Apply ``outcome`` on the server. Call once; shield it from cancellation."""
        await self._settle(outcome)

    def release(self, *, hold: bool = True) -> None:
        """Let go of the message without settling it: it stays as it is on the server. With
        ``hold`` it is not fetched again until the source's next connection (a dry run); else
        the next sweep finds it again. Instead of ``settle``, never after it."""
        self._release(hold)
