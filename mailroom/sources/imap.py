"""``ImapWatcher``: sweep → IDLE → sweep, one task per IMAP mailbox.

The loop, on one connection:

1. Apply queued settlements (one UID STORE/MOVE per kind, batched).
2. When the server said EXISTS (or after a (re)connect or an IDLE timeout): ``UID SEARCH``, then
   ``UID FETCH (RFC822.SIZE)`` for the new UIDs. The result is the backlog.
   After a push of a few messages, the sweep is narrower and quicker: the pushed messages
   only, fetched with their bodies in the same round trip as DONE (``fetch_pushed``), and
   handed out at once.
3. Fetch the backlog with ``BODY.PEEK[]`` in batches bounded in count and bytes, and only while
   fewer than ``MAX_IN_FLIGHT`` messages (``MAX_IN_FLIGHT_BYTES``) await their outcome: a
   10,000-message backlog is never held in memory at once.
4. Nothing to do: IDLE until EXISTS, a settlement, stop, or ``idle_timeout``.

Every EXISTS seen on the connection, during any command, sets ``new_mail``; the loop searches
again before it idles, so a message that lands between a SEARCH and the IDLE never waits.
A lost connection raises out of the loop; ``run`` reconnects with capped, jittered backoff and
sweeps again. Settlements queued meanwhile are kept and applied after the reconnect when
UIDVALIDITY is unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mailroom.auth import TokenProvider
from mailroom.backoff import backoff_delay
from mailroom.config import ImapMailboxConfig
from mailroom.envelope import Envelope, Outcome
from mailroom.errors import ImapAuthError, ImapConnectionLost, ImapError, SourceError, TokenError
from mailroom.monitor import Monitor
from mailroom.sources.imap_session import ImapSession
from mailroom.sources.imap_wire import FetchedMessage

__all__ = ["ImapWatcher", "idempotency_key"]

log = logging.getLogger("mailroom.imap")

MAX_IN_FLIGHT = 256  # messages handed to the dispatcher and not yet settled on the server
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
FETCH_BATCH = 128  # messages per UID FETCH BODY.PEEK[]
FIRST_FETCH_BATCH = 8  # a backlog starts small, so the first POST goes out at once
FETCH_BATCH_BYTES = 8 * 1024 * 1024
PUSH_MAX = 8  # at most this many new messages are fetched with their push (fetch_pushed)
PUSH_BODY_BYTES = 1024 * 1024  # a longer body comes with a push cut short, then fetched again
RECONNECT_INITIAL_S = 1.0
RECONNECT_MAX_S = 60.0
FAILED_KEYWORD = "$MailroomFailed"


def idempotency_key(mailbox_id: str, uidvalidity: int, uid: int) -> str:
    """The ``webhook-id``: stable for one message across restarts and replicas."""
    digest = hashlib.sha256(f"{mailbox_id}\0{uidvalidity}\0{uid}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


@dataclass(slots=True)
class _Settlement:
    uid: int
    uidvalidity: int
    outcome: Outcome
    done: asyncio.Future[None] = field(repr=False)


class ImapWatcher:
    """Watches one IMAP mailbox and hands every new message to ``submit``."""

    def __init__(
        self,
        config: ImapMailboxConfig,
        submit: Callable[[Envelope], None],
        *,
        stopping: asyncio.Event,
        drained: asyncio.Event,
        monitor: Monitor | None = None,
    ) -> None:
        self.config = config
        self.id = config.id
        self._submit = submit
        self._stopping = stopping
        self._drained = drained
        self._monitor = monitor or Monitor()
        self._wake = asyncio.Event()
        self._pending: dict[int, int] = {}  # uid → size, handed out and not settled
        self._stuck: set[int] = (
            set()
        )  # settlement refused by the server; not re-sent until reconnect
        self._settlements: list[_Settlement] = []
        self._closed = False  # run() ended: settlements can no longer be applied
        self._batch = FIRST_FETCH_BATCH  # messages in the next UID FETCH
        self._full_sweep = True  # the next sweep searches the whole mailbox, not just a push
        self._uidvalidity = 0
        self.state = "starting"
        self.connected = False
        self.reconnects = 0
        # auth: xoauth2: client-credentials tokens from the mailbox's oauth block (via msal).
        self.tokens = (
            TokenProvider(config.oauth, label=config.id) if config.oauth is not None else None
        )

    # -- the task ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch until stopped and drained. Never raises: failures are logged and retried."""
        attempt = 0
        try:
            while not self._finished():
                session = None
                connected_at: float | None = None
                try:
                    self.state = "connecting"
                    session = await ImapSession.open(
                        self.config, token=self.tokens.token if self.tokens else None
                    )
                    connected_at = time.monotonic()
                    self._on_connected(session)
                    await self._serve(session)
                    await session.logout()
                except Exception as exc:
                    if isinstance(exc, SourceError):
                        self._check_token(exc, session)
                    if self._finished():
                        return
                    # Backoff starts afresh only after a connection that served for a while:
                    # one that fails right after login (say, a search_command the server
                    # refuses) must not turn into a login storm.
                    if connected_at is not None and time.monotonic() - connected_at > 60:
                        attempt = 0
                    attempt += 1
                    delay = backoff_delay(
                        attempt, initial_s=RECONNECT_INITIAL_S, max_s=RECONNECT_MAX_S
                    )
                    expected = isinstance(exc, SourceError)
                    loud = not expected or isinstance(exc, ImapAuthError | TokenError)
                    log.log(
                        logging.ERROR if loud else logging.WARNING,
                        "%s: %s: %s; reconnecting in %.1fs (attempt %d)",
                        self.id,
                        type(exc).__name__,
                        exc,
                        delay,
                        attempt,
                        exc_info=not expected,
                        extra={"mailbox": self.id, "attempt": attempt, "delay_s": round(delay, 3)},
                    )
                    self._set_disconnected(f"{type(exc).__name__}: {exc}")
                    await self._sleep(delay)
                finally:
                    if session is not None:
                        session.abort()  # no-op after a LOGOUT
        finally:
            self._closed = True
            self._set_disconnected()
            self._abandon_settlements()
            if self.tokens is not None:
                self.tokens.close()

    def _finished(self) -> bool:
        """Stopped, every delivery drained, and every settlement applied."""
        return self._stopping.is_set() and self._drained.is_set() and not self._settlements

    def _check_token(self, exc: SourceError, session: ImapSession | None) -> None:
        """Drop the OAuth token the server refused or ended the session over."""
        if self.tokens is None:
            return
        if isinstance(exc, ImapAuthError) or (session is not None and session.token_expired):
            log.info(
                "%s: the server refused or expired the access token; getting a new one",
                self.id,
                extra={"mailbox": self.id},
            )
            self.tokens.invalidate()

    async def _sleep(self, delay_s: float) -> None:
        """Sleep for a reconnect delay, cut short by stop or, once stopping, by the drain.

        After the drain, settlements may still wait for the server: then the full delay, so
        a dead server is not hammered until the supervisor gives up on this task.
        """
        event = self._drained if self._stopping.is_set() else self._stopping
        if event.is_set():
            await asyncio.sleep(delay_s)
            return
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({waiter}, timeout=delay_s)
        finally:
            waiter.cancel()

    def _on_connected(self, session: ImapSession) -> None:
        if self._uidvalidity and session.uidvalidity != self._uidvalidity:
            # RFC 3501 §2.3.1.1: the old UIDs name nothing now; the messages will be found
            # again by the sweep under their new UIDs (and a new webhook-id).
            log.warning(
                "%s: UIDVALIDITY changed from %d to %d; %d unsettled messages will be fetched anew",
                self.id,
                self._uidvalidity,
                session.uidvalidity,
                len(self._pending),
                extra={"mailbox": self.id},
            )
            self._pending.clear()
        self._uidvalidity = session.uidvalidity
        self._stuck.clear()
        if self.connected is False and self.state != "starting":
            self.reconnects += 1
        self.connected = True
        self._monitor.connected(self.id)
        self.state = "connected"
        log.info(
            "%s: connected to %s:%d, mailbox %s (UIDVALIDITY %d, %s)",
            self.id,
            self.config.host,
            self.config.port,
            self.config.mailbox,
            session.uidvalidity,
            "IDLE" if "IDLE" in session.capabilities else "no IDLE: sweeping every idle_timeout",
            extra={"mailbox": self.id},
        )

    def _set_disconnected(self, reason: str = "stopped") -> None:
        self._monitor.disconnected(self.id, reason)
        self.connected = False
        if self.state != "stopped":
            self.state = "reconnecting"

    def _abandon_settlements(self) -> None:
        self.state = "stopped"
        if self._settlements:
            log.warning(
                "%s: stopping with %d settlements not applied; those messages stay unread "
                "and are delivered again (same webhook-id) after a restart",
                self.id,
                len(self._settlements),
                extra={"mailbox": self.id},
            )
        for settlement in self._settlements:
            if not settlement.done.done():
                settlement.done.set_result(None)
        self._settlements.clear()

    # -- the loop on one connection ------------------------------------------------------------

    async def _serve(self, session: ImapSession) -> None:
        backlog: deque[FetchedMessage] = deque()
        session.new_mail.set()  # sweep after every (re)connect
        self._full_sweep = True
        while True:
            self._wake.clear()
            # In a backlog, fetching goes first while there is room for a batch: settlements
            # wait and then go out in larger batches, and the dispatcher is never starved.
            fetch_first = (
                backlog
                and not self._stopping.is_set()
                and self._has_capacity(min(len(backlog), FIRST_FETCH_BATCH))
            )
            if self._settlements and not fetch_first:
                await self._apply_settlements(session)
                continue
            if self._stopping.is_set():
                if self._drained.is_set():
                    return
                self.state = "draining"
                await self._wait(session, self._drained)
                continue
            if session.new_mail.is_set() and not backlog:
                session.new_mail.clear()
                self._batch = FIRST_FETCH_BATCH
                self.state = "sweeping"
                backlog = await self._sweep(session)
                continue
            if backlog:
                if self._has_capacity():
                    await self._fetch_batch(session, backlog)
                else:
                    self.state = "waiting for deliveries"
                    await self._wait(session, self._stopping)
                continue
            self.state = "idling"
            if await session.idle((self._wake, self._stopping), self.config.idle_timeout_s):
                session.new_mail.set()  # periodic sweep: also finds mail no push announced
                self._full_sweep = True

    async def _wait(self, session: ImapSession, event: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in (self._wake, event, session.lost)]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if session.lost.is_set():
            raise ImapConnectionLost("connection lost")

    async def _sweep(self, session: ImapSession) -> deque[FetchedMessage]:
        """Find new mail. After a push, the pushed messages come with their bodies in the
        same round trip and are handed out at once; otherwise (or when that does not apply)
        ``UID SEARCH`` over the whole mailbox, sizes only: the backlog to fetch."""
        found = None
        if not self._full_sweep and self._has_capacity(PUSH_MAX, PUSH_MAX * PUSH_BODY_BYTES):
            found = await session.fetch_pushed(
                self.config.search_command,
                max_count=PUSH_MAX,
                body_bytes=min(PUSH_BODY_BYTES, self.config.max_message_bytes),
            )
        if found is None:
            self._full_sweep = False
            found = await session.search_sizes(self.config.search_command)
        else:
            log.debug("%s: the push brought %d new messages", self.id, len(found))
        backlog: deque[FetchedMessage] = deque()
        for item in found:
            if item.uid in self._pending or item.uid in self._stuck:
                continue
            if item.body is None:
                backlog.append(item)
            else:
                self._hand_out(item, too_large=False)
        if backlog:
            log.debug("%s: sweep found %d new messages", self.id, len(backlog))
        elif found:
            # Pushed mail handed out: let the dispatcher take it before this task goes on to
            # IDLE again (the loop does the dispatcher's tasks in order of creation).
            await asyncio.sleep(0)
        return backlog

    def _has_capacity(self, count: int = 1, size: int = 1) -> bool:
        """Room for ``count`` more messages of ``size`` bytes in all under the in-flight bounds."""
        return (
            len(self._pending) + count <= MAX_IN_FLIGHT
            and sum(self._pending.values()) + size <= MAX_IN_FLIGHT_BYTES
        )

    async def _fetch_batch(self, session: ImapSession, backlog: deque[FetchedMessage]) -> None:
        room = MAX_IN_FLIGHT - len(self._pending)
        budget = min(FETCH_BATCH_BYTES, MAX_IN_FLIGHT_BYTES - sum(self._pending.values()))
        small: list[int] = []
        large: list[int] = []
        taken = 0
        # The first batch of a sweep is small and each next one twice as large: the
        # dispatcher starts posting while the rest of a backlog is still being fetched.
        limit = min(room, self._batch)
        self._batch = min(self._batch * 2, FETCH_BATCH)
        while backlog and len(small) + len(large) < limit:
            item = backlog[0]
            if item.size > self.config.max_message_bytes:
                large.append(backlog.popleft().uid)
                continue
            if small and taken + item.size > budget:
                break  # always take at least one message, however large
            taken += item.size
            small.append(backlog.popleft().uid)
        if small:
            fetched = await session.fetch(small, "UID RFC822.SIZE BODY.PEEK[]")
            self._hand_out_all(small, fetched, too_large=False)
        if large:
            # RFC822.SIZE told us before fetching: only the header block, for the notice.
            fetched = await session.fetch(large, "UID RFC822.SIZE BODY.PEEK[HEADER]")
            self._hand_out_all(large, fetched, too_large=True)

    def _hand_out_all(
        self, asked: list[int], fetched: list[FetchedMessage], *, too_large: bool
    ) -> None:
        got = {item.uid for item in fetched if item.body is not None} & set(asked)
        missing = sorted(set(asked) - got)
        if missing:
            self._full_sweep = True
            # Expunged by another client meanwhile, or a server that answered NIL: nothing
            # to deliver now; a message still there is asked for again by the next sweep.
            log.info(
                "%s: no content for uids %s; they are looked at again on the next sweep",
                self.id,
                missing,
                extra={"mailbox": self.id},
            )
        for item in fetched:
            if item.uid in got:  # only what was asked for, once
                got.discard(item.uid)
                self._hand_out(item, too_large=too_large)

    def _hand_out(self, fetched: FetchedMessage, *, too_large: bool) -> None:
        assert fetched.body is not None
        uid, uidvalidity = fetched.uid, self._uidvalidity
        self._pending[uid] = fetched.size if not too_large else len(fetched.body)

        async def settle(outcome: Outcome) -> None:
            if self._closed:
                log.warning(
                    "%s: uid %d: %s after the watcher stopped; left as it is on the server "
                    "(delivered again after a restart, same webhook-id)",
                    self.id,
                    uid,
                    outcome.value,
                    extra={"mailbox": self.id},
                )
                return
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._settlements.append(_Settlement(uid, uidvalidity, outcome, done))
            self._wake.set()
            await done

        self._submit(
            Envelope(
                mailbox=self.id,
                ref=f"uid {uid}",
                idempotency_key=idempotency_key(self.id, uidvalidity, uid),
                raw=fetched.body,
                size=fetched.size,
                too_large=too_large,
                _settle=settle,
            )
        )

    # -- settlements ---------------------------------------------------------------------------

    async def _apply_settlements(self, session: ImapSession) -> None:
        batch, self._settlements = self._settlements, []
        current = [s for s in batch if s.uidvalidity == session.uidvalidity]
        for stale in (s for s in batch if s.uidvalidity != session.uidvalidity):
            stale.done.set_result(None)  # UIDVALIDITY changed: the sweep finds it again
        groups: dict[str, list[_Settlement]] = {}
        for settlement in current:
            groups.setdefault(self._action(settlement.outcome), []).append(settlement)
        for action, group in groups.items():
            uids = [s.uid for s in group]
            try:
                await self._apply(session, action, uids)
            except ImapError as exc:
                if isinstance(exc, ImapConnectionLost):
                    self._requeue(current)
                    raise
                self._refused(action, uids, exc)
            except BaseException:  # cancelled, or a bug: nothing may be dropped unresolved
                self._requeue(current)
                raise
            for settlement in group:
                self._pending.pop(settlement.uid, None)
                settlement.done.set_result(None)

    def _requeue(self, batch: list[_Settlement]) -> None:
        """Keep what was not applied for the next connection (same UIDVALIDITY, same
        messages; STORE and MOVE are safe to repeat), or for _abandon_settlements."""
        self._settlements[:0] = [s for s in batch if not s.done.done()]

    def _refused(self, action: str, uids: list[int], exc: ImapError) -> None:
        log.error(
            "%s: could not %s uids %s: %s; they stay as they are and are not fetched "
            "again until the next reconnect",
            self.id,
            action,
            uids,
            exc,
            extra={"mailbox": self.id},
        )
        self._stuck.update(uids)

    def _action(self, outcome: Outcome) -> str:
        if not outcome.processed:
            return f"move to {self.config.failed_folder}" if self.config.failed_folder else "flag"
        return "delete" if self.config.delete_after_delivery else "mark seen"

    async def _apply(self, session: ImapSession, action: str, uids: list[int]) -> None:
        config = self.config
        if action == "mark seen":
            await session.store(uids, "\\Seen")
        elif action == "delete":
            # \Seen as well: with expunge_deleted off the message stays, and must not match
            # the next UNSEEN sweep.
            await session.store(uids, "\\Seen \\Deleted")
            if config.expunge_deleted:
                await session.expunge(uids)
        elif action == "flag":
            await session.store(uids, f"{FAILED_KEYWORD} \\Seen")
        else:
            assert config.failed_folder is not None
            await session.move(uids, config.failed_folder, expunge=config.expunge_deleted)
