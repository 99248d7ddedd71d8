"""One lifecycle for every source: supervision, the in-flight set, settlement.

A source watches one mailbox and hands each new message to the dispatcher as an ``Envelope``.
What every kind of source shares lives here, once; ``ImapWatcher`` and ``GraphPoller`` add
only what is IMAP or Graph:

- **Supervision** (``run``): ``_serve`` is one connection's life. Whatever ends it (a lost
  connection, a refused login, a bug) is logged and retried with capped, jittered backoff, much
  longer after repeated authentication failures (providers lock accounts after a run of bad
  logins), and never reaches another mailbox. An unexpected error is logged with its traceback
  and counted as a restart.
- **The in-flight set**: messages handed out and not settled, capped per mailbox (a fairness
  cap, ``max_in_flight``/``max_in_flight_bytes``) and by the process-wide ``Budget``, which a
  source reserves before it fetches.
- **Settlement**: the dispatcher's ``settle(outcome)`` queues a ``Settlement`` and wakes the
  source, which applies it on its own connection (``_apply_settlements``). A settle that comes
  after the source stopped leaves the message as it is: it is found again after a restart, with
  the same webhook-id.
- **Release without settling**: ``release(key)`` takes a message out of the in-flight set and
  gives back its budget, untouched on the server (a UIDVALIDITY change, a refused hand-out).

``_stuck`` holds messages the server would not settle (or not serve): they are not handed out
again until the next connection.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from mailroom.backoff import backoff_delay
from mailroom.envelope import Envelope, Outcome
from mailroom.errors import ImapAuthError, SourceError, TokenError
from mailroom.logs import MailboxLog
from mailroom.observe.monitor import Monitor
from mailroom.sources.budget import Budget

__all__ = ["Activity", "Settlement", "Source", "unlimited_budget"]

K = TypeVar("K", bound=Hashable)

# Backoff starts afresh only after a connection that served this long: one that fails right
# after login (a search_command the server refuses, say) must not become a login storm.
SERVED_LONG_S = 60.0
# After the first refused login in a row, wait this long and more: providers lock accounts
# after repeated bad logins (Microsoft 365's smart lockout, Gmail's "too many login attempts").
AUTH_BACKOFF_INITIAL_S = 60.0
AUTH_BACKOFF_MAX_S = 1800.0


def unlimited_budget() -> Budget:
    """A budget that never refuses: for a source run on its own (tests, ``check``)."""
    return Budget(messages=2**62, size=2**62)


class Activity(enum.Enum):
    """What a source is doing now (for logs and debugging)."""

    STARTING = "starting"
    CONNECTING = "connecting"
    SWEEPING = "sweeping"
    FETCHING = "fetching"
    SETTLING = "settling"
    IDLING = "idling"
    POLLING = "polling"
    WAITING = "waiting"  # for a poll time, a settlement, room
    DRAINING = "draining"
    BACKING_OFF = "backing off"
    STOPPED = "stopped"


@dataclass(slots=True)
class Settlement(Generic[K]):
    """An outcome the dispatcher decided, waiting to be applied on the server.

    ``tag`` is what the source needs besides the key (IMAP: the UIDVALIDITY it was fetched
    under; Graph: the message's categories); ``epoch`` is the source's ``_epoch`` when the
    message was handed out."""

    key: K
    outcome: Outcome
    tag: Any
    epoch: int
    done: asyncio.Future[None] = field(repr=False)


class Source(abc.ABC, Generic[K]):
    """The shared lifecycle; subclasses implement ``_serve`` and ``_apply_settlements``."""

    kind: ClassVar[str]  # "imap" | "graph": task names and metrics
    max_in_flight: ClassVar[int]  # messages handed out and not settled, per mailbox
    max_in_flight_bytes: ClassVar[int] = 64 * 1024 * 1024
    retry_initial_s: ClassVar[float] = 1.0
    retry_max_s: ClassVar[float] = 60.0
    retrying: ClassVar[str] = "reconnecting"  # what the log says comes after a failure

    def __init__(
        self,
        config: Any,
        submit: Callable[[Envelope], None],
        *,
        stopping: asyncio.Event,
        drained: asyncio.Event,
        monitor: Monitor | None = None,
        budget: Budget | None = None,
        logger: logging.Logger,
    ) -> None:
        self.config = config
        self.id: str = config.id
        self.log = MailboxLog(logger, self.id)
        self._submit = submit
        self._stopping = stopping
        self._drained = drained
        self._monitor = monitor or Monitor()
        self._budget = budget or unlimited_budget()
        self._wake = asyncio.Event()
        self._pending: dict[K, int] = {}  # key → bytes charged, handed out and not settled
        self._pending_bytes = 0
        # Bumped when the in-flight set is forgotten (``_release_all``): a settle or release of
        # an earlier hand-out then leaves the set alone, where its key (a UID under a new
        # UIDVALIDITY) may name another message by now.
        self._epoch = 0
        self._stuck: set[K] = set()
        self._settlements: list[Settlement[K]] = []
        self._closed = False  # run() ended: settlements can no longer be applied
        self._connected_at: float | None = None
        self._attempt = 0
        self._auth_failures = 0
        self.activity = Activity.STARTING
        self.restarts = 0  # unexpected errors survived

    # -- what a kind of source implements ------------------------------------------------------

    @abc.abstractmethod
    async def _serve(self) -> None:
        """One connection's life: return once ``finished()``; raise to be retried."""

    @abc.abstractmethod
    async def _apply_settlements(self, *args: Any) -> None:
        """Apply ``_take_settlements()`` on the source's own connection."""

    async def _close(self) -> None:
        """Release what the source holds (sessions, tokens) after ``run`` ends."""

    def _retry_delay(self, exc: Exception, attempt: int) -> float:
        """The delay before the next connection after ``exc``."""
        return backoff_delay(attempt, initial_s=self.retry_initial_s, max_s=self.retry_max_s)

    def _on_error(self, exc: Exception) -> None:
        """Called once per failed connection, before the backoff (drop a refused token)."""

    # -- supervision ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch until stopped and drained. Never raises (cancellation aside)."""
        self._closed = False
        try:
            while not self.finished():
                self._connected_at = None
                self._stuck.clear()
                try:
                    await self._serve()
                except Exception as exc:
                    if self.finished():
                        return
                    await self._after_error(exc)
        finally:
            self._closed = True
            self.activity = Activity.STOPPED
            self._monitor.disconnected(self.id, "stopped")
            self._abandon()
            await self._close()

    def finished(self) -> bool:
        """Stopped, every delivery drained, and every settlement applied."""
        return self._stopping.is_set() and self._drained.is_set() and not self._settlements

    def _delay_after(self, exc: Exception) -> float:
        """Count the failure and say how long to wait before the next connection."""
        now = time.monotonic()
        if self._connected_at is not None and now - self._connected_at > SERVED_LONG_S:
            self._attempt = 0
        self._attempt += 1
        auth = isinstance(exc, ImapAuthError) or (isinstance(exc, TokenError) and exc.code)
        self._auth_failures = self._auth_failures + 1 if auth else 0
        if self._auth_failures > 1:  # the first may be an expired token or a server restart
            return backoff_delay(
                self._auth_failures - 1, initial_s=AUTH_BACKOFF_INITIAL_S, max_s=AUTH_BACKOFF_MAX_S
            )
        return self._retry_delay(exc, self._attempt)

    async def _after_error(self, exc: Exception) -> None:
        delay = self._delay_after(exc)
        expected = isinstance(exc, SourceError)
        auth = self._auth_failures > 0
        self._on_error(exc)
        if isinstance(exc, ImapAuthError):
            self._monitor.auth_error(self.id, "login")
        elif isinstance(exc, TokenError):
            self._monitor.auth_error(self.id, "token")
        if not expected:
            self.restarts += 1
            self._monitor.restarted(self.id)
        loud = not expected or auth or isinstance(exc, TokenError) or self._attempt > 3
        self.log.log(
            logging.ERROR if loud else logging.WARNING,
            "%s: %s; %s in %.1fs (attempt %d)",
            type(exc).__name__,
            exc,
            "restarting" if not expected else self.retrying,
            delay,
            self._attempt,
            exc_info=not expected,
            extra={"attempt": self._attempt, "delay_s": round(delay, 3)},
        )
        self._set_disconnected(f"{type(exc).__name__}: {exc}")
        self.activity = Activity.BACKING_OFF
        await self._sleep(delay)

    def _set_connected(self) -> None:
        """The connection works (IMAP: logged in and selected; Graph: a poll succeeded)."""
        if self._connected_at is None:
            self._connected_at = time.monotonic()
        self._auth_failures = 0
        self._monitor.connected(self.id)

    def _set_disconnected(self, reason: str) -> None:
        self._monitor.disconnected(self.id, reason)

    async def _sleep(self, delay_s: float) -> None:
        """A backoff delay, cut short by stop or, once stopping, by the drain.

        After the drain, settlements may still wait for the server: then the full delay, so a
        dead server is not hammered until the supervisor gives up on this source.
        """
        event = self._drained if self._stopping.is_set() else self._stopping
        if event.is_set():
            await asyncio.sleep(delay_s)
            return
        await wait_any((event,), timeout_s=delay_s)

    # -- the in-flight set ---------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages handed to the dispatcher and not settled yet."""
        return len(self._pending)

    def _has_capacity(self, count: int = 1, size: int = 1) -> bool:
        """Room for ``count`` more messages of ``size`` bytes in all under this mailbox's cap."""
        return (
            len(self._pending) + count <= self.max_in_flight
            and self._pending_bytes + size <= self.max_in_flight_bytes
        )

    def _room(self) -> tuple[int, int]:
        """(messages, bytes) this mailbox may still take under its own cap."""
        return (
            self.max_in_flight - len(self._pending),
            self.max_in_flight_bytes - self._pending_bytes,
        )

    def _hand_out(
        self,
        key: K,
        *,
        ref: str,
        idempotency_key: str,
        raw: bytes,
        size: int,
        charged: int,
        too_large: bool,
        tag: Any,
    ) -> None:
        """Hand one fetched message to the dispatcher; ``charged`` bytes of the budget (already
        taken) are given back when it is settled or released."""
        self._pending[key] = charged
        self._pending_bytes += charged
        epoch = self._epoch

        async def settle(outcome: Outcome) -> None:
            if self._closed:
                self.log.warning(
                    "%s: %s after the source stopped; left as it is on the server (delivered "
                    "again after a restart, same webhook-id)",
                    ref,
                    outcome.value,
                )
                return
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._settlements.append(Settlement(key, outcome, tag, epoch, done))
            self._wake.set()
            await done

        def release(hold: bool) -> None:
            if epoch == self._epoch:
                self.release(key, hold=hold)

        self._submit(
            Envelope(
                mailbox=self.id,
                ref=ref,
                idempotency_key=idempotency_key,
                raw=raw,
                size=size,
                too_large=too_large,
                native_id=str(key),
                _settle=settle,
                _release=release,
            )
        )

    def release(self, key: K, *, hold: bool = True) -> None:
        """Take ``key`` out of the in-flight set without settling it: it stays as it is on the
        server, and is looked at again by the next sweep, or (``hold``) only on the next
        connection."""
        if self._forget(key):
            if hold:
                self._stuck.add(key)
            self._wake.set()

    def _forget(self, key: K) -> bool:
        """Take ``key`` out of the in-flight set and give back its budget; False if absent."""
        charged = self._pending.pop(key, None)
        if charged is None:
            return False
        self._pending_bytes -= charged
        self._budget.release(1, charged)
        return True

    def _release_all(self) -> None:
        """Forget every message in flight (a new UIDVALIDITY, or the source ended)."""
        self._budget.release(len(self._pending), self._pending_bytes)
        self._pending.clear()
        self._pending_bytes = 0
        self._epoch += 1

    # -- settlements ---------------------------------------------------------------------------

    def _take_settlements(self) -> list[Settlement[K]]:
        batch, self._settlements = self._settlements, []
        return batch

    def _settled(self, settlement: Settlement[K]) -> None:
        """``settlement`` is applied (or refused for good): the message leaves the set."""
        if settlement.epoch == self._epoch:
            self._forget(settlement.key)
        if not settlement.done.done():
            settlement.done.set_result(None)

    def _requeue(self, batch: list[Settlement[K]]) -> None:
        """Keep what was not applied for the next connection, in order (settling is safe to
        repeat), or for ``_abandon``."""
        self._settlements[:0] = [s for s in batch if not s.done.done()]

    def _abandon(self) -> None:
        if self._settlements:
            self.log.warning(
                "stopping with %d settlements not applied; those messages stay as they are "
                "and are delivered again (same webhook-id) after a restart",
                len(self._settlements),
            )
        for settlement in self._settlements:
            if not settlement.done.done():
                settlement.done.set_result(None)
        self._settlements.clear()
        self._release_all()


async def wait_any(
    events: tuple[asyncio.Event, ...],
    *,
    futures: tuple[asyncio.Future[Any], ...] = (),
    timeout_s: float | None = None,
) -> None:
    """Until one of ``events`` is set, one of ``futures`` is done, or ``timeout_s`` passed."""
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(e.wait()) for e in events]
    waiters += [asyncio.ensure_future(asyncio.shield(f)) for f in futures]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
