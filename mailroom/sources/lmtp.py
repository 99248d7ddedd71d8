"""The LMTP listener: a push source. The MTA hands each message over; the reply settles it.

``LmtpListener`` is a ``Source`` like the IMAP watcher and the Graph poller, with what is LMTP's
own:

- **Serving** (``_serve``): an asyncio server on the bound socket the shared resources keep
  (``lmtp_socket``), one ``LmtpSession`` per connection. Ready (``connected``) while it
  listens. At most ``max_connections`` sessions: the next ones get 421.
- **Recipients at RCPT**: an address the template does not match gets 550 5.1.1 there (the MTA
  bounces it to its sender), unless routing is ``forward_all``.
- **Hand-out after DATA**: one delivery per distinct recipient, each an ``Envelope`` with the
  message behind a ``Return-Path`` and a ``Delivered-To`` line, the recipient (its key), its
  own webhook-id (``lmtp_wire.webhook_id``: stable across the MTA's retries) and the deadline
  of its reply. Room in the in-flight budget is taken before the 354 (452 4.3.1 when there is
  none soon), for the size the MAIL command declared; a transaction holds no more copies than
  the budget's bytes (452 for the recipients beyond: the MTA sends them again).
- **Settlement is the reply**: the dispatcher's outcome resolves the recipient's reply (250,
  550, 554: ``lmtp_wire.outcome_reply``); a release (the webhook is down, its circuit open,
  the deadline came, mailroom is stopping) is 451 4.3.0. A recipient still waiting at
  ``reply_within`` gets 451 then, and its delivery goes on to its end: a late 2xx only means
  the MTA's retry is a repeat (same webhook-id).
- **Stopping**: new sessions and sessions between transactions get 421; open transactions
  finish (``handed_over`` waits for them, within the shutdown's bound), their deliveries drain,
  then the server and the sessions left are closed (a reply still owed is 451).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

from mailroom.backoff import Backoff
from mailroom.config import LmtpMailboxConfig
from mailroom.envelope import Envelope
from mailroom.errors import SourceError
from mailroom.mail.routing import RoutingMode
from mailroom.observe.monitor import Monitor
from mailroom.sources import lmtp_wire as wire
from mailroom.sources.budget import Budget, Reservation
from mailroom.sources.lifecycle import Source, wait_any
from mailroom.sources.lmtp_socket import BACKLOG, BoundSocket
from mailroom.trust import tls

if TYPE_CHECKING:
    from mailroom.sources.lmtp_session import LmtpSession

__all__ = ["LmtpListener"]

log = logging.getLogger("mailroom.lmtp")

Key = tuple[int, int]  # (transaction, recipient): one delivery
# Above this size the message's digest is taken in a worker thread (as the dispatcher parses).
OFF_LOOP_BYTES = 64 * 1024
# How long DATA waits for room in the in-flight budget before it answers 452 4.3.1.
ROOM_WAIT_S = 5.0
# The dispatcher's deadline comes this much before the reply's, so that its release, not the
# listener's own timer, answers a delivery the webhook did not take in time.
DEADLINE_MARGIN_S = 1.0
GOODBYE_S = 1.0  # at the end, for the last replies to be written before the sessions close


class LmtpListener(Source[LmtpMailboxConfig, Key, str]):
    """One listener: its sessions, and the replies they wait for (a settlement's tag is the
    delivery's webhook-id)."""

    # Bounded by max_connections times max_recipients; the budget bounds the bytes.
    max_in_flight = 2**31
    max_in_flight_bytes = 2**62
    backoff: ClassVar[Backoff] = Backoff(initial_s=1.0, max_s=30.0)
    retrying = "listening again"

    def __init__(
        self,
        config: LmtpMailboxConfig,
        submit: Callable[[Envelope], None],
        *,
        stopping: asyncio.Event,
        drained: asyncio.Event,
        bound: BoundSocket,
        monitor: Monitor | None = None,
        budget: Budget | None = None,
    ) -> None:
        super().__init__(
            config,
            submit,
            stopping=stopping,
            drained=drained,
            monitor=monitor,
            budget=budget,
            logger=log,
        )
        self.bound = bound
        self.identity = config.identity
        self.sessions: set[LmtpSession] = set()
        self._replies: dict[Key, asyncio.Future[str]] = {}
        self._transactions = itertools.count(1)
        self._quiet = asyncio.Event()  # a transaction ended (for handed_over)
        self._crowded = False  # max_connections reached, as last logged

    # -- what sessions ask (lmtp_session.Transactions) -----------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def opened(self, session: LmtpSession) -> str | None:
        if self.stopping:
            return wire.SHUTTING_DOWN
        if len(self.sessions) >= self.config.max_connections:
            if not self._crowded:
                self._crowded = True
                self.log.warning(
                    "%d sessions open (max_connections); new ones get 421 until some end",
                    len(self.sessions),
                )
            return wire.TOO_MANY_CONNECTIONS
        self.sessions.add(session)
        self._monitor.session(self.id, opened=True)
        return None

    def closed(self, session: LmtpSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._monitor.session(self.id, opened=False)
            if self._crowded and len(self.sessions) < self.config.max_connections * 0.9:
                self._crowded = False
                self.log.info("%d sessions open; taking new ones again", len(self.sessions))

    def transaction_over(self, session: LmtpSession) -> None:
        self._quiet.set()  # wakes handed_over and the last goodbyes

    def check_recipient(self, address: str, accepted: int, size: int | None) -> str | None:
        rules = self.config.routing
        if rules.mode is not RoutingMode.FORWARD_ALL and rules.address.match(address) is None:
            reply = wire.unknown_recipient(address)
        elif size is not None and accepted >= self._copies(size):
            reply = wire.TOO_MANY_RECIPIENTS  # the MTA sends the rest in another transaction
        else:
            return None
        self._monitor.reply(self.id, wire.code(reply), None)
        return reply

    def _copies(self, size: int) -> int:
        """How many deliveries (a copy each) of a message of ``size`` bytes one transaction
        may hold: as many as the in-flight budget takes (``limits.in_flight_bytes``), at least
        one. A 25 MB message to 50 keys is not 1.25 GB in memory."""
        return max(1, self._budget.max_bytes // max(1, size))

    async def room(self, count: int, size: int) -> Reservation | None:
        reservation = self._budget.reserve(count, size)
        try:
            async with asyncio.timeout(min(ROOM_WAIT_S, self.config.reply_within_s)):
                await asyncio.shield(reservation.granted)
        except TimeoutError:
            self._budget.cancel(reservation)
            self._monitor.reply(self.id, wire.code(wire.BUSY), None)
            return None
        except BaseException:
            self._budget.cancel(reservation)
            raise
        return reservation

    def give_back(self, reservation: Reservation) -> None:
        self._budget.cancel(reservation)

    async def deliver(
        self, sender: str, recipients: Sequence[str], data: bytes, reservation: Reservation
    ) -> list[Callable[[], Awaitable[str]]]:
        """One delivery per distinct recipient; a reply per RCPT (duplicates answered alike),
        each to be awaited in turn (a session that is gone awaits none of them)."""
        started = time.monotonic()
        if len(data) > OFF_LOOP_BYTES:
            digest = await asyncio.to_thread(_sha256, data)
        else:
            digest = _sha256(data)
        # More copies than the budget holds (MAIL declared no SIZE, or too small a one): those
        # recipients get 452 and come again in the MTA's next transaction.
        copies = self._copies(len(data))
        distinct = list(dict.fromkeys(recipients))
        later = set(distinct[copies:])
        distinct = distinct[:copies]
        raws = [wire.delivery_header(sender, r) + data for r in distinct]
        self._budget.use(reservation, len(raws), sum(map(len, raws)))
        deadline = started + self.config.reply_within_s
        transaction = next(self._transactions)
        self._monitor.transaction(self.id)
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[str]] = {}
        for index, (recipient, raw) in enumerate(zip(distinct, raws, strict=True)):
            key = (transaction, index)
            future = futures[recipient] = self._replies[key] = loop.create_future()
            webhook_id = wire.webhook_id(self.identity, digest, recipient)
            self._hand_out(
                key,
                ref=f"lmtp {transaction}.{index + 1}",
                idempotency_key=webhook_id,
                raw=raw,
                size=len(raw),
                charged=len(raw),
                too_large=False,
                tag=webhook_id,
                recipient=recipient,
                native_id="",  # MailRoom never had it: no claim of MailRoom's to check
                deadline=deadline - min(DEADLINE_MARGIN_S, self.config.reply_within_s / 10),
            )
            if future.done():  # refused at once (the dispatcher is stopping)
                self._replies.pop(key, None)
        for recipient in later:
            futures[recipient] = loop.create_future()
            futures[recipient].set_result(wire.TOO_MUCH_AT_ONCE)
        return [functools.partial(self._reply, futures[r], started, deadline) for r in recipients]

    async def _reply(self, future: asyncio.Future[str], started: float, deadline: float) -> str:
        """The reply to one recipient: its outcome's, or 451 when ``reply_within`` passed."""
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                reply = await asyncio.shield(future)
        except TimeoutError:
            reply = wire.late(self.config.reply_within_s)
        self._monitor.reply(self.id, wire.code(reply), time.monotonic() - started)
        return reply

    # -- settlement is the reply ----------------------------------------------------------------

    def _answer(self, key: Key, reply: str) -> None:
        future = self._replies.pop(key, None)
        if future is not None and not future.done():
            future.set_result(reply)

    def release(self, key: Key, *, hold: bool = True) -> None:
        """The dispatcher lets go of a delivery: 451, and the MTA tries again later."""
        super().release(key, hold=False)
        self._answer(key, wire.RETRY)

    # -- serving -------------------------------------------------------------------------------

    def _session(self, tls_context: object) -> LmtpSession:
        # here: aiosmtpd, 2 MiB at start where no LMTP listener is configured (issue 23)
        from mailroom.sources.lmtp_session import LmtpSession  # noqa: PLC0415

        config = self.config
        return LmtpSession(
            self,
            hostname=config.hostname,
            max_message_bytes=config.max_message_bytes,
            max_recipients=config.max_recipients,
            idle_timeout_s=config.idle_timeout_s,
            tls_context=tls_context,
            loop=asyncio.get_running_loop(),
        )

    async def _serve(self) -> None:
        config = self.config
        context = None
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            context = tls.server_context(
                cert_file=config.tls_cert_file, key_file=config.tls_key_file
            )
        loop = asyncio.get_running_loop()
        try:
            self.bound.permit(config.listen)  # a reload may have changed socket_mode
            # A duplicate of the kept socket: closing this server leaves the socket listening
            # (connections wait in its backlog) for the listener a reload starts next.
            server = await loop.create_server(
                lambda: self._session(context), sock=self.bound.sock.dup(), backlog=BACKLOG
            )
        except OSError as exc:
            raise SourceError(f"cannot serve on {self.bound.address}: {exc}") from exc
        self._monitor.listening(self.id)
        self._set_connected()
        self.log.info("listening on %s", self.bound.address)
        try:
            await self._run()
        finally:
            server.close()
            await self._close_sessions()

    async def _run(self) -> None:
        """Apply settlements (answer the sessions) until stopped and drained."""
        stopped = False
        while not self.finished():
            self._wake.clear()
            for settlement in self._take_settlements():
                self._answer(
                    settlement.key,
                    wire.outcome_reply(settlement.outcome, settlement.why, settlement.tag),
                )
                self._settled(settlement)
            if self._stopping.is_set() and not stopped:
                stopped = True
                for session in list(self.sessions):
                    session.goodbye()
            if self.finished():
                return
            waits = (self._wake, self._drained) if stopped else (self._wake, self._stopping)
            await wait_any(waits)

    async def handed_over(self) -> None:
        """Until no open transaction is left to hand its message over (stopping)."""
        await self._until(lambda: not any(s.open_transaction for s in self.sessions))

    async def _close_sessions(self) -> None:
        """The end: a reply still owed is 451 (its delivery was abandoned), given a moment to
        be written; then every session is closed, with a 421 where it is between
        transactions."""
        for key in list(self._replies):
            self._answer(key, wire.RETRY)
        try:
            async with asyncio.timeout(GOODBYE_S):
                await self._until(lambda: not any(s.in_data for s in self.sessions))
        except TimeoutError:
            pass
        for session in list(self.sessions):
            session.goodbye()
            session.close()

    async def _until(self, done: Callable[[], bool]) -> None:
        """Until ``done()``, looked at again after each transaction ends."""
        while not done():
            self._quiet.clear()
            await self._quiet.wait()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
