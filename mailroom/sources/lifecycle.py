"""One lifecycle for every source: supervision, the in-flight set, settlement.

A source watches one mailbox and hands each new message to the dispatcher as an ``Envelope``.
What every kind of source shares lives here, once; ``ImapWatcher`` and ``GraphPoller`` add
only what is IMAP or Graph:

- **Supervision** (``run``, the one restart loop of a source): ``_serve`` is one connection's
  life. Whatever ends it (a lost connection, a refused login, a bug) is logged and retried under
  the kind's ``backoff`` policy (honouring a ``Retry-After`` the error carries), much longer
  after repeated authentication failures (providers lock accounts after a run of bad logins),
  and never reaches another mailbox. An unexpected error is logged with its traceback and
  counted as a restart. ``run`` itself never raises.
- **State**: one ``SourceState`` (starting, connected, reconnecting, stopped), reported to the
  ``Monitor`` as it changes.
- **The in-flight set**: messages handed out and not settled, capped per mailbox (a fairness
  cap, ``max_in_flight``/``max_in_flight_bytes``) and by the process-wide ``Budget``, which a
  source reserves before it fetches.
- **Settlement**: the dispatcher's ``settle(outcome)`` queues a ``Settlement`` and wakes the
  source, which takes them (``_take_settlements``) and applies them its own way, on its own
  connection, reporting each with ``_settled`` (or ``_requeue``). A settle that comes after the
  source stopped leaves the message as it is: it is found again after a restart, with the same
  webhook-id.
- **Release without settling**: ``release(key)`` takes a message out of the in-flight set and
  gives back its budget, untouched on the server (a UIDVALIDITY change, a refused hand-out).

``_stuck`` holds messages the server would not settle (or not serve): they are not handed out
again until the next connection.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from mailroom.backoff import Backoff
from mailroom.config import MailboxConfig
from mailroom.envelope import Envelope, Outcome
from mailroom.errors import ImapAuthError, SourceError, TokenError
from mailroom.logs import MailboxLog
from mailroom.observe.monitor import AuthFailure, Monitor, SourceState
from mailroom.sources.budget import Budget

__all__ = ["Settlement", "Source", "unlimited_budget"]

C = TypeVar("C", bound=MailboxConfig)  # the kind's config
K = TypeVar("K", bound=Hashable)  # the source's key for a message: an IMAP UID, a Graph id
T = TypeVar("T")  # what a settlement needs besides the key (a settlement's tag)

# Backoff starts afresh only after a connection that served this long: one that fails right
# after login (a search_command the server refuses, say) must not become a login storm.
SERVED_LONG_S = 60.0
# After the first refused login in a row, wait this long and more: providers lock accounts
# after repeated bad logins (Microsoft 365's smart lockout, Gmail's "too many login attempts").
AUTH_BACKOFF = Backoff(initial_s=60.0, max_s=1800.0)
# A source's run ending in a bug of its own (not of a connection): the pause before it goes on.
CRASH_BACKOFF = Backoff(initial_s=1.0, max_s=300.0)


def unlimited_budget() -> Budget:
    """A budget that never refuses: for a source run on its own (tests, ``check``)."""
    return Budget(messages=2**62, size=2**62)


@dataclass(slots=True)
class Settlement(Generic[K, T]):
    """An outcome the dispatcher decided, waiting to be applied on the server.

    ``tag`` is what the source needs besides the key (IMAP: the UIDVALIDITY it was fetched
    under and its webhook-id; Graph: the message's categories); ``epoch`` is the source's
    ``_epoch`` when the message was handed out."""

    key: K
    outcome: Outcome
    tag: T
    epoch: int
    done: asyncio.Future[None] = field(repr=False)
    why: str = ""  # the dispatcher's reason (a push source tells its sender)


class Source(abc.ABC, Generic[C, K, T]):
    """The shared lifecycle of a source of kind ``C`` (its config), naming messages by ``K``
    and keeping a ``T`` beside each until it is settled; a kind implements ``_serve``."""

    max_in_flight: ClassVar[int]  # messages handed out and not settled, per mailbox
    max_in_flight_bytes: ClassVar[int] = 64 * 1024 * 1024
    backoff: ClassVar[Backoff] = Backoff(initial_s=1.0, max_s=60.0)  # between connections
    retrying: ClassVar[str] = "reconnecting"  # what the log says comes after a failure

    def __init__(
        self,
        config: C,
        submit: Callable[[Envelope], None],
        *,
        stopping: asyncio.Event,
        drained: asyncio.Event,
        monitor: Monitor | None = None,
        budget: Budget | None = None,
        logger: logging.Logger,
    ) -> None:
        self.config: C = config
        self.id = config.id
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
        self._settlements: list[Settlement[K, T]] = []
        self._closed = False  # run() ended: settlements can no longer be applied
        self._connected_at: float | None = None
        self._attempt = 0  # connections failed since the last one that served long
        self._auth_failures = 0
        self.state = SourceState.STARTING
        self.restarts = 0  # unexpected errors survived

    # -- what a kind of source implements ------------------------------------------------------

    @abc.abstractmethod
    async def _serve(self) -> None:
        """One connection's life: return once ``finished()``; raise to be retried."""

    async def _close(self) -> None:
        """Release what the source holds (sessions, tokens) after ``run`` ends."""

    def _on_error(self, exc: Exception) -> None:
        """Called once per failed connection, before the backoff (drop a refused token)."""

    async def handed_over(self) -> None:
        """Once stopping: until the source has handed over all it took in. A pull source
        takes nothing more once stopped; a push source (LMTP) lets its open transactions hand
        their messages over first. The caller bounds the wait (``shutdown_timeout``)."""

    # -- supervision ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch until stopped and drained. Never raises (cancellation aside): whatever goes
        wrong, in a connection or in this loop, is logged and retried here."""
        self._closed = False
        try:
            while not self.finished():
                try:
                    await self._connection()
                except Exception:  # a bug in the supervision itself: still stops no one else
                    self.restarts += 1
                    self._monitor.restarted(self.id)
                    delay = CRASH_BACKOFF.delay(self.restarts)
                    self.log.exception("the source failed; going on in %.1fs", delay)
                    await self._sleep(delay)
        finally:
            self._closed = True
            self._set_state(SourceState.STOPPED, "stopped")
            try:
                self._abandon()
                await self._close()
            except Exception:
                self.log.exception("could not close the source cleanly")

    async def _connection(self) -> None:
        """One connection's life; what ends it is logged and waited out (``_after_error``)."""
        self._connected_at = None
        self._stuck.clear()
        try:
            await self._serve()
        except Exception as exc:
            if not self.finished():
                await self._after_error(exc)

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
            return AUTH_BACKOFF.delay(self._auth_failures - 1)
        retry_after_s = exc.retry_after_s if isinstance(exc, SourceError) else None
        return self.backoff.delay(self._attempt, retry_after_s)

    async def _after_error(self, exc: Exception) -> None:
        delay = self._delay_after(exc)
        expected = isinstance(exc, SourceError)
        auth = self._auth_failures > 0
        self._on_error(exc)
        if isinstance(exc, ImapAuthError):
            self._monitor.auth_error(self.id, AuthFailure.LOGIN)
        elif isinstance(exc, TokenError):
            self._monitor.auth_error(self.id, AuthFailure.TOKEN)
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
            extra={
                "attempt": self._attempt,
                "error": type(exc).__name__,
                "delay_s": round(delay, 3),
            },
        )
        self._set_state(SourceState.RECONNECTING, f"{type(exc).__name__}: {exc}")
        await self._sleep(delay)

    def _set_connected(self) -> None:
        """The connection works (IMAP: logged in and selected; Graph: a poll succeeded)."""
        if self._connected_at is None:
            self._connected_at = time.monotonic()
        self._auth_failures = 0
        self._set_state(SourceState.CONNECTED)

    def _set_state(self, state: SourceState, reason: str | None = None) -> None:
        """Now in ``state``; told to the monitor (``CONNECTED`` after every success)."""
        self.state = state
        self._monitor.state(self.id, state, reason)

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
        tag: T,
        recipient: str | None = None,
        deadline: float | None = None,
        native_id: str | None = None,
    ) -> None:
        """Hand one fetched message to the dispatcher; ``charged`` bytes of the budget (already
        taken) are given back when it is settled or released. A push source names the
        envelope ``recipient`` and the ``deadline`` of its reply (``Envelope``); ``native_id``
        is the key unless given ("": none MailRoom would know)."""
        self._pending[key] = charged
        self._pending_bytes += charged
        epoch = self._epoch

        async def settle(outcome: Outcome, why: str) -> None:
            if self._closed:
                self.log.warning(
                    "%s: %s after the source stopped; left as it is on the server (delivered "
                    "again after a restart, same webhook-id)",
                    ref,
                    outcome.value,
                )
                return
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._settlements.append(Settlement(key, outcome, tag, epoch, done, why))
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
                recipient=recipient,
                deadline=deadline,
                native_id=str(key) if native_id is None else native_id,
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

    def _take_settlements(self) -> list[Settlement[K, T]]:
        batch, self._settlements = self._settlements, []
        return batch

    def _settled(self, settlement: Settlement[K, T]) -> None:
        """``settlement`` is applied (or refused for good): the message leaves the set."""
        if settlement.epoch == self._epoch:
            self._forget(settlement.key)
        if not settlement.done.done():
            settlement.done.set_result(None)

    def _requeue(self, batch: list[Settlement[K, T]]) -> None:
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


# ``wait_any`` puts one future among each event's waiters (``asyncio.Event._waiters``, a deque
# of futures that ``set`` resolves; CPython 3.11 to 3.13): checked here, at import, so a Python
# that moves it fails at once and not by never waking.
if not hasattr(asyncio.Event(), "_waiters"):
    raise RuntimeError(
        "asyncio.Event has no _waiters on this Python, which mailroom/sources/lifecycle.py's "
        "wait_any relies on: port wait_any to Event.wait tasks"
    )


async def wait_any(
    events: tuple[asyncio.Event, ...],
    *,
    futures: tuple[asyncio.Future[Any], ...] = (),
    timeout_s: float | None = None,
) -> bool:
    """Until one of ``events`` is set, one of ``futures`` is done, or ``timeout_s`` passed;
    True when the time ran out.

    One future, put among the events' waiters, and no task per event: a thousand IMAP
    watchers wait so several times a burst, and a task each for an event cost a quarter of
    their waits' CPU in scheduling and cancelling them (issue 23)."""
    if any(event.is_set() for event in events) or any(f.done() for f in futures):
        await asyncio.sleep(0)  # a turn of the loop all the same, as a wait would take
        return False
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()

    def wake(_: object = None, timed_out: bool = False) -> None:
        if not waiter.done():
            waiter.set_result(not timed_out)

    for event in events:
        event._waiters.append(waiter)  # Event.set resolves it
    for future in futures:
        future.add_done_callback(wake)
    timer = None if timeout_s is None else loop.call_later(timeout_s, wake, None, True)
    try:
        return not await waiter
    finally:
        if timer is not None:
            timer.cancel()
        for event in events:
            event._waiters.remove(waiter)
        for future in futures:
            future.remove_done_callback(wake)
