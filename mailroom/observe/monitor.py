"""What the sources and the dispatcher tell the health endpoints and the metrics.

The sources and the dispatcher call these methods and know nothing else: no HTTP server, no
prometheus-client. ``Monitor`` itself ignores every event (tests, ``health: null``);
``mailroom.health.Health`` records them, logs state changes once each, and serves ``/healthz``,
``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import enum

from mailroom.envelope import Outcome

__all__ = ["Monitor", "NoticeResult"]


class NoticeResult(enum.Enum):
    """What became of a reject notice."""

    SENT = "sent"
    REFUSED = "refused"  # the policy or the rate limit forbade it
    DISABLED = "disabled"  # no reject_notices block (or enabled: false)
    FAILED = "failed"  # refused for good, or not sent within retry.give_up_after


class Monitor:
    """The events; every method is cheap, synchronous and never raises."""

    def connected(self, mailbox: str) -> None:
        """IMAP: logged in and selected. Graph: a poll succeeded (called after every poll)."""

    def disconnected(self, mailbox: str, reason: str) -> None:
        """The connection was lost or an attempt failed; the source retries with backoff."""

    def auth_error(self, mailbox: str, kind: str) -> None:
        """A connection failed on its credentials: the IMAP ``login`` was refused, or no OAuth
        ``token`` (the identity provider refused the app or could not be reached)."""

    def restarted(self, mailbox: str) -> None:
        """The source survived an unexpected error (a bug): logged, counted, restarted."""

    def failed_folder(self, mailbox: str, refused: str | None, kept: int = 0) -> None:
        """IMAP: the server refused for good to move dead letters to ``failed_folder``
        (``refused`` says why and what to do), so ``kept`` of them were flagged
        ``$MailroomFailed`` where they are instead; None: a move to it succeeded."""

    def idle_without_push(self, mailbox: str) -> None:
        """IMAP: a sweep found mail that had waited well into an IDLE that no push announced
        (the server advertises IDLE but does not push)."""

    def accepted(self, mailbox: str) -> int:
        """The dispatcher took a fetched message; returns the token for ``finished``."""
        return 0

    def finished(self, mailbox: str, token: int) -> None:
        """The dispatcher is done with the message of ``token`` (settled, or abandoned)."""

    def released(self, mailbox: str) -> None:
        """The dispatcher let go of a message unsettled on purpose (``Envelope.release``), to
        be read again: it no longer waits for an outcome here."""

    def outcome(self, mailbox: str, outcome: Outcome, rule: str | None = None) -> None:
        """A message was settled as ``outcome``; ``rule`` names the auto-generated rule that
        made it ignored."""

    def notice(self, mailbox: str, result: NoticeResult) -> None:
        """A reject notice ended as ``result`` (``FAILED``: the message is dead-lettered)."""

    def webhook(self, mailbox: str, status_class: str, seconds: float) -> None:
        """One webhook request ended: ``2xx``..``5xx``, or ``error`` (no answer)."""

    def circuit(self, webhook: str, *, is_open: bool) -> None:
        """The circuit breaker of ``webhook`` (its label) opened or closed."""

    def arbitration(self, connected: bool, reason: str | None = None) -> None:
        """Replicas: whether Redis answered this round (called every tick)."""

    def leases(self, held: int, live: int) -> None:
        """Replicas: leases this replica holds, replicas alive (every tick)."""

    def lease_change(self, change: str) -> None:
        """Replicas: a lease ``acquired``, ``released`` or ``lost``."""

    def marker_hit(self, mailbox: str) -> None:
        """Replicas: a message another replica already brought to an outcome was settled
        without posting it again."""

    def expect(self, mailboxes: set[str] | None) -> None:
        """Replicas: readiness counts only these mailboxes (this replica's leases); None: all
        configured ones."""
