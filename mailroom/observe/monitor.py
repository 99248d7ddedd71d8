"""What the sources, the dispatcher and the coordinator tell the health endpoints and metrics.

``Monitor`` is the one narrow interface from the delivery path to observability: sources,
``delivery`` and ``arbitration`` report events through it, typed by the enums below, and know
nothing else of ``observe`` (no HTTP server, no prometheus-client, no call into ``health``).
``Monitor`` itself ignores every event (tests, ``health: null``); ``observe.health.Health``
records them, logs state changes once each, and feeds ``/readyz`` and ``/metrics``.
"""

from __future__ import annotations

import enum

from mailroom.envelope import Outcome

__all__ = ["AuthFailure", "LeaseChange", "Monitor", "NoticeResult", "SourceState", "StatusClass"]


class SourceState(enum.Enum):
    """Where a mailbox's source is in its life: the one model the source keeps, ``Health``
    records, ``/readyz`` shows and the state-change logs name."""

    STARTING = "starting"  # started, not connected yet
    CONNECTED = "connected"  # IMAP: logged in and selected; Graph: its last poll succeeded
    RECONNECTING = "reconnecting"  # a connection failed or was lost; retried with backoff
    STOPPING = "stopping"  # a shutdown, a reload or a lease stops it; its deliveries drain
    STOPPED = "stopped"  # its run ended


class AuthFailure(enum.Enum):
    """Why a connection failed on its credentials."""

    LOGIN = "login"  # the IMAP server refused the login
    TOKEN = "token"  # no OAuth token: the identity provider refused, or could not be reached


class StatusClass(enum.Enum):
    """How one webhook request ended: its status class, or no answer at all."""

    SUCCESS = "2xx"
    REDIRECT = "3xx"
    CLIENT_ERROR = "4xx"
    SERVER_ERROR = "5xx"
    ERROR = "error"  # no answer: a timeout or a connection error

    @classmethod
    def of(cls, status: int) -> StatusClass:
        """The class of an HTTP status (1xx counts as 2xx, beyond 5xx as 5xx)."""
        return cls(f"{min(max(status // 100, 2), 5)}xx")


class LeaseChange(enum.Enum):
    """Replicas: what happened to one of this replica's mailbox leases."""

    ACQUIRED = "acquired"
    RELEASED = "released"  # handed over (fair share) or given up after a clean stop
    LOST = "lost"  # not renewed in time, or taken by another replica


class NoticeResult(enum.Enum):
    """What became of a reject notice."""

    SENT = "sent"
    REFUSED = "refused"  # the policy or the rate limit forbade it
    DISABLED = "disabled"  # no reject_notices block (or enabled: false)
    FAILED = "failed"  # refused for good, or not sent within retry.give_up_after


class Monitor:
    """The events; every method is cheap, synchronous and never raises."""

    def state(self, mailbox: str, state: SourceState, reason: str | None = None) -> None:
        """The source of ``mailbox`` is in ``state`` now (``reason``: why it left
        ``CONNECTED``). ``CONNECTED`` comes again after each success (every Graph poll)."""

    def auth_error(self, mailbox: str, failure: AuthFailure) -> None:
        """A connection failed on its credentials."""

    def violation(self, mailbox: str) -> None:
        """The server broke a bound (a line, a literal, an answer too large, too deep): its
        connection was dropped, and the source reconnects with backoff."""

    def malformed(self, mailbox: str) -> None:
        """The server described one message out of range (a UID, a size, an id): that message
        was skipped, the others were read."""

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

    def webhook(self, mailbox: str, status: StatusClass, seconds: float) -> None:
        """One webhook request ended after ``seconds``."""

    def circuit(self, webhook: str, *, is_open: bool) -> None:
        """The circuit breaker of ``webhook`` (its label) opened or closed."""

    def arbitration(self, connected: bool, reason: str | None = None) -> None:
        """Replicas: whether Redis answered this round (called every tick)."""

    def leases(self, held: int, live: int) -> None:
        """Replicas: leases this replica holds, replicas alive (every tick)."""

    def lease_change(self, change: LeaseChange) -> None:
        """Replicas: a lease of this replica changed."""

    def marker_hit(self, mailbox: str) -> None:
        """Replicas: a message another replica already brought to an outcome was settled
        without posting it again."""

    def conflict(self, mailbox: str, reason: str | None) -> None:
        """Replicas: ``mailbox``'s lease is held for another mailbox under the same id (another
        deployment in the same namespace; ``reason`` says so), or no longer (None)."""

    def listening(self, mailbox: str) -> None:
        """A listener (a push source) serves: its session, transaction and reply series
        start."""

    def session(self, mailbox: str, *, opened: bool) -> None:
        """A listener's session was opened or closed (one turned away is neither)."""

    def transaction(self, mailbox: str) -> None:
        """A listener took a message (the end of its DATA)."""

    def reply(self, mailbox: str, code: int, seconds: float | None) -> None:
        """A listener answered one recipient with ``code``: after DATA, ``seconds`` after
        its end; at RCPT or before DATA, None."""

    def expect(self, mailboxes: set[str] | None) -> None:
        """Replicas: readiness counts only these mailboxes (this replica's leases); None: all
        configured ones."""
