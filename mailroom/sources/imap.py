"""``ImapWatcher``: sweep → IDLE → sweep, one task per IMAP mailbox.

The loop, on one connection (supervision, the in-flight set and settlement are the shared
``Source`` lifecycle):

1. Apply queued settlements (one UID STORE/MOVE per kind, batched). In a backlog that waits
   for the room they free, the next FETCH window goes with their UID STORE, pipelined: one
   round trip for both (``_fetch_ahead``).
2. When the server said EXISTS (or after a (re)connect or an IDLE timeout): ``UID SEARCH``, then
   ``UID FETCH (RFC822.SIZE)`` for the new UIDs. The result is the backlog.
   After a push of a few messages, the sweep is narrower and quicker: the pushed messages
   only, fetched with their bodies in the same round trip as DONE (``fetch_pushed``), and
   handed out at once.
3. Fetch the backlog with ``BODY.PEEK[]`` in batches bounded in count and bytes, each reserved
   in the process-wide budget first, and only while this mailbox's own in-flight cap has room:
   a 10,000-message backlog is never held in memory at once.
4. Nothing to do, or no room: IDLE until EXISTS, a settlement, room, stop, or about
   ``idle_timeout`` (jittered, so a thousand mailboxes do not sweep in step). While messages
   handed out await their outcomes, or a reservation waits for the budget, not IDLE but wait
   for them (up to ``OUTCOMES_WAIT_S``), and apply the settlements of a burst together
   (``SETTLE_LINGER_S``): an IDLE ended for each settlement, or for the grant, cost DONE, the
   command and IDLE again.

A server can advertise IDLE and never push (Cyrus without idled, Courier with
IMAP_ENHANCEDIDLE=0): then a periodic sweep finds mail that arrived well before it, during an
IDLE no push interrupted. The watcher warns once, counts it (``mailroom_idle_without_push``) and,
until a push is seen, ends each IDLE after ``NO_PUSH_POLL_S``: the server reports new mail in
its answer to DONE, and the sweep follows at once (issue 21).

Every EXISTS seen on the connection, during any command, sets ``new_mail``; the loop searches
again before it idles, so a message that lands between a SEARCH and the IDLE never waits.
Settlements queued while the connection was down are applied after the reconnect when
UIDVALIDITY is unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable

from mailroom import identity
from mailroom.config import ImapMailboxConfig
from mailroom.envelope import FAILED_KEYWORD, Envelope, Outcome
from mailroom.errors import ImapAuthError, ImapConnectionLost, ImapError
from mailroom.observe.monitor import Monitor
from mailroom.sources.budget import Budget, Reservation
from mailroom.sources.imap_session import ImapSession
from mailroom.sources.imap_wire import BodyLimits, FetchedMessage
from mailroom.sources.lifecycle import Settlement, Source, wait_any

__all__ = ["ImapWatcher", "message_key", "search_criteria", "webhook_id"]

log = logging.getLogger("mailroom.imap")

MAX_IN_FLIGHT = 256  # messages handed to the dispatcher and not yet settled on the server
FETCH_BATCH = 128  # messages per UID FETCH BODY.PEEK[]
FIRST_FETCH_BATCH = 16  # a backlog starts small, so the first POST goes out at once
# Each next batch this many times larger, up to FETCH_BATCH: 16, then 128 (doubling took five
# round trips to the first 256 messages: 16, 32, 64, 128, 16; issue 23).
BATCH_GROWTH = 8
FETCH_BATCH_BYTES = 8 * 1024 * 1024
BODY_ITEMS = "UID RFC822.SIZE FLAGS BODY.PEEK[]"  # each body at most its announced size (plus
# slack, ``BodyLimits``): a server cannot fill memory with a message it said was small (issue 18)
PUSH_MAX = 8  # at most this many new messages are fetched with their push (fetch_pushed)
PUSH_BODY_BYTES = 1024 * 1024  # a longer body comes with a push cut short, then fetched again
IDLE_JITTER = 0.1  # each IDLE lasts idle_timeout minus up to this fraction of it
# While deliveries are under way, their outcomes are awaited without IDLE for up to
# OUTCOMES_WAIT_S, and applied together once all have come or the first has waited
# SETTLE_LINGER_S: each IDLE ended for a settlement costs DONE, the command and IDLE again
# (issue 23: three round trips and some 0.5 ms of CPU for each message, at 1,000 mailboxes).
OUTCOMES_WAIT_S = 5.0
SETTLE_LINGER_S = 0.2
MAX_LEARNED_SIZES = 1024  # messages remembered as larger than the server announced
DIGEST_ON_LOOP_BYTES = 1024 * 1024  # a larger message is hashed in a worker thread

# IDLE without push: mail found by a periodic sweep that arrived at least this long before it,
# during an IDLE no push interrupted, was not announced (server clocks are assumed within this).
PUSH_GRACE_S = 10.0
NO_PUSH_POLL_S = 5.0  # then each IDLE lasts this long, until a push is seen
# A refusal that may pass (RFC 5530 response codes): the dead letters wait for the next try.
_TRANSIENT = re.compile(r"\[(?:UNAVAILABLE|INUSE|SERVERBUG|LIMIT)\b", re.IGNORECASE)


def _may_pass(exc: ImapError) -> bool:
    """A lost connection, or a refusal that may pass: not a verdict on the folder."""
    return isinstance(exc, ImapConnectionLost) or _TRANSIENT.search(str(exc)) is not None


def message_key(raw: bytes, *, too_large: bool) -> str:
    """What names a fetched message in its webhook-id (``identity``): its bytes, or its header
    block when only that was fetched (over ``max_message_bytes``)."""
    return identity.header(raw) if too_large else identity.content(raw)


def webhook_id(config: ImapMailboxConfig, raw: bytes, *, too_large: bool = False) -> str:
    """The webhook-id of the message ``raw`` (its header block, ``too_large``) in the
    mailbox of ``config``, wherever it lies on that account: the watched folder or
    ``failed_folder``."""
    return identity.webhook_id(config.identity, message_key(raw, too_large=too_large))


def search_criteria(config: ImapMailboxConfig) -> str:
    """What is searched for: ``search_command`` and UNSEEN and not dead-lettered, so that
    criteria like ``ALL`` cannot find settled mail again (unless ``search_command_exact``).
    RFC 3501 §6.4.4: search keys are ANDed, and CHARSET may only come first."""
    if config.search_command_exact:
        return config.search_command
    tokens = config.search_command.upper().split()
    unseen = "" if {"UNSEEN", "NEW"} & set(tokens) else " UNSEEN"
    return f"{config.search_command}{unseen} NOT KEYWORD {FAILED_KEYWORD}"


class SettleAction(enum.Enum):
    """What settling does to a message on the IMAP server (``ImapWatcher._action``)."""

    MARK_SEEN = "mark seen"  # delivered, delete_after_delivery off
    DELETE = "delete"  # delivered: \\Seen \\Deleted, expunged with expunge_deleted
    FLAG = "flag"  # dead letter without failed_folder: $MailroomFailed and \\Seen
    MOVE = "move"  # dead letter: to failed_folder (its webhook-id needs no keyword: identity)


Tag = int  # what a settlement needs: the UIDVALIDITY it was fetched under
# What each settlement but a MOVE stores (DELETE: \\Seen as well: with expunge_deleted off the
# message stays, and must not match the next UNSEEN sweep).
_STORE_FLAGS = {
    SettleAction.MARK_SEEN: "\\Seen",
    SettleAction.DELETE: "\\Seen \\Deleted",
    SettleAction.FLAG: f"{FAILED_KEYWORD} \\Seen",
}


class ImapWatcher(Source[ImapMailboxConfig, int, Tag]):
    """Watches one IMAP mailbox and hands every new message to ``submit``.

    ``connects`` (``limits.connects``) caps connects and logins across the process; ``token``
    gives the access token for ``auth: xoauth2`` (a shared ``TokenProvider``'s ``token``),
    ``invalidate`` drops one the server refused.
    """

    max_in_flight = MAX_IN_FLIGHT

    def __init__(
        self,
        config: ImapMailboxConfig,
        submit: Callable[[Envelope], None],
        *,
        stopping: asyncio.Event,
        drained: asyncio.Event,
        monitor: Monitor | None = None,
        budget: Budget | None = None,
        connects: Budget | None = None,
        token: Callable[[], Awaitable[str]] | None = None,
        invalidate: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(
            config, submit, stopping=stopping, drained=drained, monitor=monitor, budget=budget,
            logger=log,
        )  # fmt: skip
        self._connects = connects or Budget(messages=1, size=0)
        self._token = token
        self._invalidate = invalidate
        self._session: ImapSession | None = None
        self._batch = FIRST_FETCH_BATCH  # messages in the next UID FETCH
        self._full_sweep = True  # the next sweep searches the whole mailbox, not just a push
        self._uidvalidity = 0
        self._reserved: tuple[Reservation, list[FetchedMessage]] | None = None
        self._sizes: dict[int, int] = {}  # uid → the size its literal announced (``_learn``)
        self._folder_refused: str | None = None  # why failed_folder refused dead letters for good
        self._push: bool | None = None  # the server pushed (True), did not (False), not known
        self._warned_no_push = False
        self._quiet_since: datetime.datetime | None = None  # start of an IDLE without a push
        self._last_sweep = 0.0  # monotonic time of the last periodic (full) sweep
        self._settle_by = 0.0  # monotonic: queued settlements go out by then at the latest
        self._outcomes_until = 0.0  # monotonic: awaited without IDLE until then

    # -- one connection ------------------------------------------------------------------------

    async def _serve(self) -> None:
        self._session = None
        # limits.connects: no connect storm at start, after an outage or after a reload
        async with self._connects.hold():
            session = self._session = await ImapSession.open(
                self.config, token=self._token, malformed=self._malformed
            )
        try:
            self._on_connected(session)
            await self._loop(session)
            await session.logout()
        finally:
            self._unreserve()
            session.abort()  # no-op after a LOGOUT
            self._learn(session)

    def _malformed(self, what: str) -> None:
        self._monitor.malformed(self.id)

    def _learn(self, session: ImapSession) -> None:
        """A message sent larger than announced broke its bound and the connection: its true
        size is remembered, so the next connection fetches it as what it is (alone, or only
        its header when over max_message_bytes) instead of breaking again (issue 18)."""
        violation = session.violation
        if violation is None:
            return
        self._monitor.violation(self.id)
        if violation.uid is not None and violation.size is not None:
            if len(self._sizes) >= MAX_LEARNED_SIZES:
                del self._sizes[next(iter(self._sizes))]
            self._sizes[violation.uid] = violation.size

    def _on_error(self, exc: Exception) -> None:
        """Drop the OAuth token the server refused or ended the session over."""
        if self._invalidate is None:
            return
        expired = self._session is not None and self._session.token_expired
        if isinstance(exc, ImapAuthError) or expired:
            self.log.info("the server refused or expired the access token; getting a new one")
            self._invalidate()

    def _on_connected(self, session: ImapSession) -> None:
        if self._uidvalidity and session.uidvalidity != self._uidvalidity:
            # RFC 3501 §2.3.1.1: the old UIDs name nothing now; the messages will be found
            # again by the sweep under their new UIDs (and a new webhook-id).
            self.log.warning(
                "UIDVALIDITY changed from %d to %d; %d unsettled messages will be fetched anew",
                self._uidvalidity,
                session.uidvalidity,
                self.pending,
            )
            self._release_all()
            self._sizes.clear()
        self._uidvalidity = session.uidvalidity
        self._set_connected()
        self.log.info(
            "connected to %s:%d, mailbox %s (UIDVALIDITY %d, %s)",
            self.config.host,
            self.config.port,
            self.config.mailbox,
            session.uidvalidity,
            "IDLE" if "IDLE" in session.capabilities else "no IDLE: sweeping every idle_timeout",
        )

    async def _loop(self, session: ImapSession) -> None:
        folder = self.config.failed_folder
        # failed_folder refused before: fixed on the server meanwhile? Then it is ready again.
        if (
            self._folder_refused is not None
            and folder is not None
            and await session.folder_exists(folder)
        ):
            self._folder_accepted()
        backlog: deque[FetchedMessage] = deque()
        session.new_mail.set()  # sweep after every (re)connect
        self._full_sweep = True
        while True:
            self._wake.clear()
            # In a backlog, fetching goes first while there is room for a batch: settlements
            # wait and then go out in larger batches, and the dispatcher is never starved.
            # A reservation the budget has not granted yet leaves room for settlements.
            reserved = self._reserved
            fetch_first = not self._stopping.is_set() and (
                reserved[0].done()
                if reserved is not None
                else bool(backlog) and self._has_capacity(min(len(backlog), FIRST_FETCH_BATCH))
            )
            if self._settlements and not fetch_first:
                if not await self._linger(session):
                    await self._apply_settlements(session, backlog)
                continue
            if self._stopping.is_set():
                self._unreserve(backlog)
                if self._drained.is_set():
                    return
                await self._wait(session, self._drained)
                continue
            if (reserved := self._reserved) is not None:
                if reserved[0].done():
                    self._outcomes_until = 0.0  # the outcomes of this batch get a wait of their own
                    await self._fetch_reserved(session, *reserved)
                elif not await self._await_outcomes(session, room=True):
                    # The budget is spent elsewhere: IDLE until room comes.
                    await self._idle(session, new_mail=False)
                continue
            if session.new_mail.is_set() and not backlog:
                session.new_mail.clear()
                self._batch = FIRST_FETCH_BATCH
                backlog = await self._sweep(session)
                continue
            if backlog and self._has_capacity():
                self._reserve(backlog)
                continue
            if not backlog and await self._await_outcomes(session):
                continue
            # Nothing to do, or this mailbox's cap is full (then new mail waits for the backlog).
            await self._idle(session, new_mail=not backlog)

    async def _linger(self, session: ImapSession) -> bool:
        """With settlements queued and more outcomes due for messages in flight, wait (without
        IDLE) up to ``SETTLE_LINGER_S`` from the first for them to go in one command; False:
        apply them now."""
        now = time.monotonic()
        if not self._settle_by:
            self._settle_by = now + SETTLE_LINGER_S
        # Enough to free a FETCH window in a backlog; every outcome due otherwise.
        due = len(self._settlements) < min(self.pending, FETCH_BATCH)
        if not due or now >= self._settle_by or self._stopping.is_set():
            self._settle_by = 0.0
            return False
        await self._wait(session, self._stopping, timeout_s=self._settle_by - now)
        return True

    async def _await_outcomes(self, session: ImapSession, *, room: bool = False) -> bool:
        """With messages in flight and nothing else to do, wait for their outcomes without
        IDLE (up to ``OUTCOMES_WAIT_S`` in all; new mail is seen in the answer to the next
        command then); False: IDLE instead. ``room``: wait so for the budget to grant a
        reservation (new mail cannot be fetched before it anyway): in a burst across 1,000
        mailboxes most wait for it a moment, and an IDLE ended by the grant cost IDLE, DONE
        and two round trips each (issue 23)."""
        now = time.monotonic()
        waiting = room or (self.pending and not session.new_mail.is_set())
        if not waiting or self._stopping.is_set():
            self._outcomes_until = 0.0
            return False
        if not self._outcomes_until:
            self._outcomes_until = now + OUTCOMES_WAIT_S
        if now >= self._outcomes_until:
            self._outcomes_until = 0.0  # IDLE once; the next wait starts after it
            return False
        await self._wait(session, self._stopping, timeout_s=self._outcomes_until - now)
        return True

    async def _idle(self, session: ImapSession, *, new_mail: bool = True) -> None:
        """IDLE until woken, stopped, the (jittered) idle_timeout, or new mail if ``new_mail``.

        While a backlog waits for room, new mail cannot be swept before it: waking for it
        would only end the IDLE and start it again, round trip after round trip, until room
        comes (measured: 16 CPU-seconds per 1,000 messages after an outage across 1,000
        mailboxes, bench/many_mailboxes.py)."""
        timeout_s = self.config.idle_timeout_s * (1 - random.uniform(0, IDLE_JITTER))
        if self._push is False:  # ask at every DONE instead (the module docstring)
            timeout_s = min(timeout_s, NO_PUSH_POLL_S)
        started, pushes = datetime.datetime.now(datetime.UTC), session.pushes
        timed_out = await session.idle((self._wake, self._stopping), timeout_s, new_mail=new_mail)
        if session.pushes != pushes and self._push is not True:
            if self._push is False:
                self.log.info("the server pushed new mail during IDLE: idling for idle_timeout")
            self._push = True
        if not timed_out:
            return
        periodic = self.config.idle_timeout_s * (1 - IDLE_JITTER)
        if self._push is False and time.monotonic() - self._last_sweep < periodic:
            return  # the next idle() ends this one: its DONE brings what is new
        session.new_mail.set()  # periodic sweep: also finds mail no push announced
        self._full_sweep = True
        if session.pushes == pushes and "IDLE" in session.capabilities:
            self._quiet_since = started

    async def _wait(
        self, session: ImapSession, event: asyncio.Event, *, timeout_s: float | None = None
    ) -> None:
        await wait_any((self._wake, event, session.lost), timeout_s=timeout_s)
        if session.lost.is_set():
            raise ImapConnectionLost("connection lost")

    async def _sweep(self, session: ImapSession) -> deque[FetchedMessage]:
        """Find new mail. After a push, the pushed messages come with their bodies in the
        same round trip and are handed out at once; otherwise (or when that does not apply)
        ``UID SEARCH`` over the whole mailbox, sizes only: the backlog to fetch."""
        criteria = search_criteria(self.config)
        found = None
        pushed: Reservation | None = None
        if not self._full_sweep and self._has_capacity(PUSH_MAX, PUSH_MAX * PUSH_BODY_BYTES):
            pushed = self._budget.reserve(PUSH_MAX, PUSH_MAX * PUSH_BODY_BYTES)
            if not pushed.done():
                self._budget.cancel(pushed)
                pushed = None
        try:
            if pushed is not None:
                found = await session.fetch_pushed(
                    criteria,
                    max_count=PUSH_MAX,
                    body_bytes=min(PUSH_BODY_BYTES, self.config.max_message_bytes),
                )
            if found is None:
                self._full_sweep = False
                self.log.debug("sweeping the whole mailbox")
                self._last_sweep = time.monotonic()
                found = await session.search_sizes(criteria)
                self._unannounced(found)
            else:
                self.log.debug("the push brought %d new messages", len(found))
            backlog: deque[FetchedMessage] = deque()
            handed: list[tuple[FetchedMessage, bytes]] = []
            for item in found:
                if item.uid in self._pending or item.uid in self._stuck:
                    continue
                if (learned := self._sizes.get(item.uid, 0)) > item.size:
                    item = dataclasses.replace(item, size=learned, body=None)  # noqa: PLW2901
                if item.body is None:
                    backlog.append(item)
                else:
                    handed.append((item, item.body))
            if pushed is not None:
                self._budget.use(pushed, len(handed), sum(item.size for item, _ in handed))
            for item, body in handed:  # at most PUSH_BODY_BYTES each: hashed here
                self._give(item, body, message_key(body, too_large=False), too_large=False)
        finally:
            if pushed is not None:
                self._budget.cancel(pushed)
        if backlog:
            self.log.debug("sweep found %d new messages", len(backlog))
        elif handed:
            # Pushed mail handed out: let the dispatcher take it before this task goes on to
            # IDLE again (the loop does the dispatcher's tasks in order of creation).
            await asyncio.sleep(0)
        return backlog

    def _unannounced(self, found: list[FetchedMessage]) -> None:
        """After an IDLE that ran out without a push: did this sweep find new mail that came
        well into it (INTERNALDATE)? Then the server does not push."""
        quiet_since, self._quiet_since = self._quiet_since, None
        if quiet_since is None:
            return
        now = datetime.datetime.now(datetime.UTC)
        earliest = quiet_since.replace(microsecond=0)  # INTERNALDATE has whole seconds
        latest = now - datetime.timedelta(seconds=PUSH_GRACE_S)
        waited = [
            item
            for item in found
            if item.internal_date is not None
            and earliest <= item.internal_date <= latest
            and item.uid not in self._pending
        ]
        if not waited:
            return
        self._monitor.idle_without_push(self.id)
        self._push = False
        if not self._warned_no_push:
            self._warned_no_push = True
            oldest = min(item.internal_date for item in waited if item.internal_date)
            self.log.warning(
                "the server advertises IDLE but did not push: %d message(s) waited up to "
                "%.0fs for the periodic sweep (idle_timeout %gs). Turn push on in the server "
                "(Cyrus: run idled; Courier: IMAP_ENHANCEDIDLE=1) or set a shorter "
                "idle_timeout; until a push is seen, mailroom asks for new mail every %gs",
                len(waited),
                (now - oldest).total_seconds(),
                self.config.idle_timeout_s,
                NO_PUSH_POLL_S,
            )

    def _reserve(self, backlog: deque[FetchedMessage], freed: tuple[int, int] = (0, 0)) -> None:
        """Take the next batch off ``backlog`` and reserve room for it in the budget; ``freed``:
        (messages, bytes) of this mailbox's cap that settlements about to be applied free."""
        room, room_bytes = self._room()
        room, room_bytes = room + freed[0], room_bytes + freed[1]
        shared, shared_bytes = self._budget.room()
        budget = min(FETCH_BATCH_BYTES, room_bytes, shared_bytes)
        # The first batch of a sweep is small and each next one BATCH_GROWTH times larger: the
        # dispatcher starts posting while the rest of a backlog is still being fetched.
        # No larger than the shared budget has room for now: with none, one message waits
        # its turn (a large request at the head of the queue would hold up every mailbox).
        limit = min(room, self._batch, max(1, shared))
        self._batch = min(self._batch * BATCH_GROWTH, FETCH_BATCH)
        batch: list[FetchedMessage] = []
        taken = 0
        while backlog and len(batch) < limit:
            item = backlog[0]
            cost = self._cost(item)
            if batch and taken + cost > budget:
                break  # always take at least one message, however large
            taken += cost
            batch.append(backlog.popleft())
        reservation = self._budget.reserve(len(batch), taken)
        reservation.granted.add_done_callback(lambda _: self._wake.set())
        self._reserved = (reservation, batch)

    def _cost(self, item: FetchedMessage) -> int:
        """What a message holds in memory once fetched: its size, or a header block's."""
        if item.size > self.config.max_message_bytes:
            return min(item.size, PUSH_BODY_BYTES)  # only the header block is fetched
        return item.size

    def _unreserve(self, backlog: deque[FetchedMessage] | None = None) -> None:
        """Give back a reservation not fetched yet; its messages go back to ``backlog``."""
        if self._reserved is not None:
            reservation, batch = self._reserved
            self._reserved = None
            self._budget.cancel(reservation)
            if backlog is not None:
                backlog.extendleft(reversed(batch))

    async def _fetch_reserved(
        self,
        session: ImapSession,
        reservation: Reservation,
        batch: list[FetchedMessage],
        fetched_small: list[FetchedMessage] | None = None,
    ) -> None:
        """Fetch ``batch`` and hand it out; ``fetched_small``: what came already of its
        messages within max_message_bytes (``_store_and_fetch``)."""
        cap = self.config.max_message_bytes
        small = {item.uid: item.size for item in batch if item.size <= cap}
        large = [item.uid for item in batch if item.size > cap]
        handed: list[tuple[FetchedMessage, bytes, bool]] = []
        if small:
            fetched = fetched_small
            if fetched is None:
                fetched = await session.fetch(small, BODY_ITEMS, limits=BodyLimits(cap, small))
            handed += [(item, body, False) for item, body in self._received(list(small), fetched)]
        if large:
            # RFC822.SIZE told us before fetching: only the header block, for the notice, and
            # at most PUSH_BODY_BYTES of it (RFC 3501 §6.4.5: a partial fetch of a section).
            fetched = await session.fetch(
                large,
                f"UID RFC822.SIZE FLAGS BODY.PEEK[HEADER]<0.{PUSH_BODY_BYTES}>",
                limits=BodyLimits(PUSH_BODY_BYTES, count=len(large)),
            )
            handed += [(item, body, True) for item, body in self._received(large, fetched)]
        keys = [await _message_key(body, too_large) for _, body, too_large in handed]
        self._reserved = None
        charged = sum(self._charge(item, body, too_large) for item, body, too_large in handed)
        self._budget.use(reservation, len(handed), charged)
        for (item, body, too_large), key in zip(handed, keys, strict=True):
            self._give(item, body, key, too_large=too_large)

    def _received(
        self, asked: list[int], fetched: list[FetchedMessage]
    ) -> list[tuple[FetchedMessage, bytes]]:
        """What came back of ``asked`` with its content, each once, in order."""
        got = {item.uid for item in fetched if item.body is not None} & set(asked)
        missing = sorted(set(asked) - got)
        if missing:
            self._full_sweep = True
            # Expunged by another client meanwhile, or a server that answered NIL: nothing
            # to deliver now; a message still there is asked for again by the next sweep.
            self.log.info(
                "no content for uids %s; they are looked at again on the next sweep", missing
            )
        received = []
        for item in fetched:
            if item.uid in got and item.body is not None:
                got.discard(item.uid)
                received.append((item, item.body))
        return received

    @staticmethod
    def _charge(item: FetchedMessage, body: bytes, too_large: bool) -> int:
        return len(body) if too_large else item.size

    def _give(self, fetched: FetchedMessage, body: bytes, message: str, *, too_large: bool) -> None:
        """Hand out ``fetched``, named ``message`` (``message_key``) in its webhook-id."""
        uid, uidvalidity = fetched.uid, self._uidvalidity
        key = identity.webhook_id(self.config.identity, message)
        if self.config.legacy_id_keywords and fetched.webhook_id is not None:
            key = fetched.webhook_id  # dead-lettered before 0.2: its $MailroomId_ keyword
        self._hand_out(
            uid,
            ref=f"uid {uid}",
            idempotency_key=key,
            raw=body,
            size=max(fetched.size, self._sizes.get(uid, 0)),  # a server's lie is not believed
            charged=self._charge(fetched, body, too_large),
            too_large=too_large,
            tag=uidvalidity,
        )

    # -- settlements ---------------------------------------------------------------------------

    async def _apply_settlements(
        self, session: ImapSession, backlog: deque[FetchedMessage] | None = None
    ) -> None:
        """Apply the queued settlements, one command per action for the whole batch; with a
        ``backlog`` waiting for the room they free, the next FETCH window goes with them
        (``_fetch_ahead``)."""
        batch = self._take_settlements()
        current = [s for s in batch if s.tag == session.uidvalidity]
        for stale in (s for s in batch if s.tag != session.uidvalidity):
            self._settled(stale)  # UIDVALIDITY changed: the sweep finds it again
        groups: dict[SettleAction, list[Settlement[int, Tag]]] = {}
        for settlement in current:
            groups.setdefault(self._action(settlement.outcome), []).append(settlement)
        if (ahead := self._fetch_ahead(groups, backlog)) is not None:
            ((action, group),) = groups.items()
            await self._store_and_fetch(session, action, group, *ahead)
            return
        if self._idles_next(session, groups, backlog):
            ((action, group),) = groups.items()
            await self._store_then_idle(session, action, group)
            return
        for action, group in groups.items():
            uids = [s.key for s in group]
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
                self._settled(settlement)

    def _fetch_ahead(
        self,
        groups: dict[SettleAction, list[Settlement[int, Tag]]],
        backlog: deque[FetchedMessage] | None,
    ) -> tuple[Reservation, list[FetchedMessage]] | None:
        """The next FETCH window of ``backlog``, reserved counting the room that ``groups``
        frees: sent with their one ``UID STORE``, it costs no round trip of its own (issue
        23: a backlog at a 50 ms round trip went STORE, wait, FETCH, wait). None where that
        does not apply: no backlog, another action than a STORE (a MOVE, an EXPUNGE: sequence
        numbers move), a message over max_message_bytes, no room at once, or stopping."""
        if not backlog or self._reserved is not None or self._stopping.is_set():
            return None
        if len(groups) != 1:
            return None
        ((action, group),) = groups.items()
        expunges = action is SettleAction.DELETE and self.config.expunge_deleted
        if action is SettleAction.MOVE or expunges:
            return None
        freed = sum(self._pending.get(s.key, 0) for s in group)
        self._reserve(backlog, freed=(len(group), freed))
        reserved = self._reserved
        if reserved is None:
            return None
        reservation, batch = reserved
        cap = self.config.max_message_bytes
        if not batch or not reservation.done() or any(item.size > cap for item in batch):
            self._unreserve(backlog)  # the loop reserves it again, and waits for the budget
            return None
        return reserved

    def _idles_next(
        self,
        session: ImapSession,
        groups: dict[SettleAction, list[Settlement[int, Tag]]],
        backlog: deque[FetchedMessage] | None,
    ) -> bool:
        """Whether IDLE is all that follows ``groups``: one STORE that settles everything in
        flight, with no backlog, no new mail and no stop. Then the IDLE goes with the STORE
        (``store_then_idle``): a burst's settlement went STORE, wait, IDLE, wait (issue 23)."""
        if len(groups) != 1 or backlog is None or backlog or self._reserved is not None:
            return False
        if self._stopping.is_set() or session.new_mail.is_set():
            return False
        if "IDLE" not in session.capabilities:
            return False
        ((action, group),) = groups.items()
        expunges = action is SettleAction.DELETE and self.config.expunge_deleted
        if action is SettleAction.MOVE or expunges:
            return False
        return self.pending == len(group)

    async def _store_then_idle(
        self, session: ImapSession, action: SettleAction, group: list[Settlement[int, Tag]]
    ) -> None:
        """The one STORE of ``group`` with the IDLE that follows it (``_idles_next``)."""
        uids = [s.key for s in group]
        try:
            refused = await session.store_then_idle(uids, _STORE_FLAGS[action])
        except BaseException:  # lost, or cancelled: nothing may be dropped unresolved
            self._requeue(group)
            raise
        if refused is not None:
            self._refused(action, uids, refused)
        for settlement in group:
            self._settled(settlement)

    async def _store_and_fetch(
        self,
        session: ImapSession,
        action: SettleAction,
        group: list[Settlement[int, Tag]],
        reservation: Reservation,
        batch: list[FetchedMessage],
    ) -> None:
        """The one STORE of ``group`` and the FETCH of ``batch``, in one round trip; the
        fetched messages are handed out once the STORE's answer has freed their room."""
        uids = [s.key for s in group]
        sizes = {item.uid: item.size for item in batch}
        try:
            refused, fetched = await session.store_and_fetch(
                uids,
                _STORE_FLAGS[action],
                sizes,
                BODY_ITEMS,
                limits=BodyLimits(self.config.max_message_bytes, sizes),
            )
        except BaseException:  # lost, or cancelled: nothing may be dropped unresolved
            self._requeue(group)
            raise
        if refused is not None:
            self._refused(action, uids, refused)
        for settlement in group:
            self._settled(settlement)  # the room the FETCH was reserved in
        if isinstance(fetched, ImapError):
            raise fetched  # as a FETCH on its own: the connection starts over
        await self._fetch_reserved(session, reservation, batch, fetched_small=fetched)

    def _refused(self, action: SettleAction, uids: list[int], exc: ImapError) -> None:
        what = action.value
        if action is SettleAction.MOVE:
            what = f"move to {self.config.failed_folder}"
        self.log.error(
            "could not %s uids %s: %s; they stay as they are and are not fetched again until "
            "the next reconnect",
            what,
            uids,
            exc,
        )
        self._stuck.update(uids)

    def _action(self, outcome: Outcome) -> SettleAction:
        if not outcome.processed:
            return SettleAction.MOVE if self.config.failed_folder else SettleAction.FLAG
        return SettleAction.DELETE if self.config.delete_after_delivery else SettleAction.MARK_SEEN

    async def _apply(self, session: ImapSession, action: SettleAction, uids: list[int]) -> None:
        config = self.config
        if (flags := _STORE_FLAGS.get(action)) is not None:
            await session.store(uids, flags)
            if action is SettleAction.DELETE and config.expunge_deleted:
                await session.expunge(uids)
        elif config.failed_folder is None:  # _action chooses MOVE only with a failed_folder
            raise ImapError("cannot move to failed_folder: none is configured")
        else:
            await self._move_to_failed_folder(session, uids, config.failed_folder)

    async def _move_to_failed_folder(
        self, session: ImapSession, uids: list[int], folder: str
    ) -> None:
        """Move dead letters to failed_folder (``_move_creating``). Refused for good, a
        configuration problem (a folder the server cannot hold or create, no right to it): they
        are flagged ``$MailroomFailed`` and ``\\Seen`` where they are instead, so they are never
        posted again, and the mailbox is not ready until a move succeeds (issue 21)."""
        try:
            await self._move_creating(session, uids, folder)
        except ImapError as exc:
            if _may_pass(exc):
                raise
            await session.store(uids, _STORE_FLAGS[SettleAction.FLAG])
            refused = (
                f"failed_folder {await session.named(folder)} refused: {exc}; dead letters are "
                f"flagged {FAILED_KEYWORD} in {self.config.mailbox} instead. Create the folder "
                "(or give the user the right to), or fix failed_folder; then `mailroom redrive`"
            )
            if refused != self._folder_refused:
                self.log.error("%s", refused)
            self.log.info("uids %s dead-lettered in place", uids)
            self._folder_refused = refused
            self._monitor.failed_folder(self.id, refused, kept=len(uids))
            return
        self._folder_accepted()

    async def _move_creating(self, session: ImapSession, uids: list[int], folder: str) -> None:
        """``ImapSession.move``, and when the folder is missing, CREATE and once more: also
        where the server says no ``[TRYCREATE]`` (Cyrus: ``NO Mailbox does not exist``)."""
        expunge = self.config.expunge_deleted
        try:
            await session.move(uids, folder, expunge=expunge)
        except ImapError as exc:
            if _may_pass(exc) or await session.folder_exists(folder):
                raise
            await session.create(folder)
            await session.move(uids, folder, expunge=expunge)

    def _folder_accepted(self) -> None:
        if self._folder_refused is not None:
            self._folder_refused = None
            self._monitor.failed_folder(self.id, None)


async def _message_key(body: bytes, too_large: bool) -> str:
    """``message_key`` of a fetched message, in a worker thread when it is large (hashing
    25 MB takes tens of milliseconds: not on the event loop)."""
    if len(body) <= DIGEST_ON_LOOP_BYTES:
        return message_key(body, too_large=too_large)
    return await asyncio.to_thread(message_key, body, too_large=too_large)
