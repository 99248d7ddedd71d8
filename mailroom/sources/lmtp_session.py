"""One LMTP session (RFC 2033): aiosmtpd's ``LMTP``, bounded, answering once per recipient.

The only importer of aiosmtpd. Its ``LMTP`` (LHLO instead of EHLO) brings the command loop,
MAIL and RCPT parsing and STARTTLS; this subclass adds what LMTP and a stranger on the other
end need (STYLE rule 20):

- **LHLO** offers PIPELINING and ENHANCEDSTATUSCODES (both required by RFC 2033 §5), 8BITMIME,
  SMTPUTF8, SIZE and, with a certificate, STARTTLS; never AUTH (the command is gone).
- **Every reply has an enhanced status code** (``lmtp_wire.enhance`` for aiosmtpd's own).
- **DATA** is read here, not by aiosmtpd: its reader answers a message over the limit with one
  reply where LMTP needs one per recipient, and drops lines over 1,000 octets where mail has
  them. Lines of any length are taken, dot-stuffing undone (RFC 5321 §4.5.2), the size bounded
  by ``max_message_bytes`` (beyond it the rest is read and dropped, then 552 for each
  recipient); it is read up to each dot that ends a line, not line by line. Then one reply
  per accepted recipient, in RCPT order, each as soon as its outcome is known (RFC 2033 §4.2).
- **Bounds**: a command line (and the reader's buffer) is bounded; an idle session is closed
  after ``idle_timeout``, and the whole of DATA must arrive within it too (aiosmtpd's timer
  runs from the DATA command); five unknown commands end a session; the listener caps
  connections (421 beyond ``max_connections``) and recipients (452 beyond
  ``max_recipients``).
- **Stopping**: a session between transactions gets 421 and is closed; one in a transaction
  finishes it first.

The session knows nothing of webhooks: it asks its listener (``Transactions``) whether a sender
or recipient is welcome, for room before DATA, and for the replies after it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, AnyStr, Protocol

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope as Transaction
from aiosmtpd.smtp import Session as SmtpSession

from mailroom.sources import lmtp_wire as wire
from mailroom.sources.budget import Reservation

__all__ = ["LmtpSession", "Transactions"]

# aiosmtpd logs every command line, every sender and recipient, and each session's AUTH
# mechanisms at INFO: addresses do not belong in mailroom's log at that level.
logging.getLogger("mail.log").setLevel(logging.WARNING)

LINE_MAX_BYTES = 64 * 1024  # the reader's buffer: a command line, or a piece of a DATA line
COMMAND_MAX_BYTES = 512  # RFC 5321 §4.5.3.1.4
MAIL_PARAMETERS_BYTES = 26 + 10  # SIZE=<n> and SMTPUTF8 (aiosmtpd's own allowance)
# Commands an LMTP server of mailroom's does not take (aiosmtpd's AUTH would offer LOGIN and
# PLAIN after STARTTLS, with a callback that refuses everyone).
WITHOUT = ("AUTH", "EXPN")


class Transactions(Protocol):
    """What a session asks of its listener."""

    @property
    def stopping(self) -> bool:
        """New sessions and new transactions get 421."""
        ...

    def opened(self, session: LmtpSession) -> str | None:
        """A connection came: None to greet it, or the 421 that turns it away."""
        ...

    def closed(self, session: LmtpSession) -> None:
        """The connection is gone."""
        ...

    def transaction_over(self, session: LmtpSession) -> None:
        """The session's transaction ended (RSET, its replies, a lost connection)."""
        ...

    def check_recipient(self, address: str, accepted: int, size: int | None) -> str | None:
        """None to accept ``address`` at RCPT (``accepted`` recipients so far, of a message of
        the ``size`` MAIL declared), or the reply that refuses it."""
        ...

    async def room(self, count: int, size: int) -> Reservation | None:
        """Room in the in-flight budget for ``count`` deliveries of ``size`` bytes in all,
        or None when there is none soon (452)."""
        ...

    def give_back(self, reservation: Reservation) -> None:
        """The reservation is not used (the message was too large, or never came)."""
        ...

    async def deliver(
        self, sender: str, recipients: Sequence[str], data: bytes, reservation: Reservation
    ) -> list[Callable[[], Awaitable[str]]]:
        """Hand the message over, one delivery per distinct recipient; the replies, one per
        entry of ``recipients`` (RCPT order), each awaited in turn for its reply line."""
        ...


class LmtpSession(LMTP):
    """One connection from the MTA."""

    # The reader's limit: a longer command line is refused (500) after it was read and
    # dropped in pieces; a DATA line longer than this is read in pieces.
    line_length_limit = LINE_MAX_BYTES

    def __init__(
        self,
        listener: Transactions,
        *,
        hostname: str,
        max_message_bytes: int,
        max_recipients: int,
        idle_timeout_s: float,
        tls_context: Any = None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.listener = listener
        self.max_message_bytes = max_message_bytes
        self.max_recipients = max_recipients
        self.refusal: str | None = None  # the 421 this connection gets instead of a greeting
        self.in_data = False  # between DATA and the last reply
        self.handed = False  # this transaction's message is with the listener
        self._counted = False
        super().__init__(
            self,  # the handler: its handle_MAIL and handle_RCPT hooks are below
            data_size_limit=max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=hostname,  # never None: aiosmtpd would look up the FQDN per connection
            ident="mailroom LMTP",
            tls_context=tls_context,
            timeout=idle_timeout_s,
            loop=loop,
        )
        # aiosmtpd keeps these limits in a dict of the class, which every EHLO of every session
        # raises again: one of this session's own, reset by LHLO.
        self.command_size_limits = collections.defaultdict(lambda: COMMAND_MAX_BYTES)
        for name in WITHOUT:
            self._smtp_methods.pop(name, None)
        self._smtp_methods = {
            name: method if name == "QUIT" else self._gated(method)
            for name, method in self._smtp_methods.items()
        }

    # -- the connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # not the TLS layer that STARTTLS puts on top
        super().connection_made(transport)
        if first:
            self._counted = True
            self.refusal = self.listener.opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self._counted:
            self._counted = False
            self.listener.transaction_over(self)
            self.listener.closed(self)

    async def _handle_client(self) -> None:
        if self.refusal is not None:
            await self.push(self.refusal)
            self.close()
            return
        await super()._handle_client()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def goodbye(self) -> None:
        """Stopping: a 421 to a session between transactions, and close it (RFC 5321 §3.8);
        one in a transaction gets it after its replies."""
        if self.in_transaction or self.transport is None:
            return
        self._writer.write(f"{wire.SHUTTING_DOWN}\r\n".encode())
        self.close()

    @property
    def in_transaction(self) -> bool:
        """Between MAIL and the last reply after DATA."""
        return self.in_data or (self.envelope is not None and self.envelope.mail_from is not None)

    @property
    def open_transaction(self) -> bool:
        """In a transaction whose message is not handed over yet."""
        return self.in_transaction and not self.handed

    def _gated(self, method: Callable[[str | None], Awaitable[None]]) -> Any:
        async def gated(arg: str | None) -> None:
            if self.listener.stopping and not self.in_transaction:
                await self.push(wire.SHUTTING_DOWN)
                self.close()
                return
            await method(arg)

        return gated

    def _set_post_data_state(self) -> None:
        """The transaction is over (after DATA's replies, RSET, LHLO, a new TLS layer)."""
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        self.handed = False
        if self._counted:
            self.listener.transaction_over(self)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            await super().push(wire.enhance(status))
        else:
            await super().push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The path of MAIL or RCPT and what follows it (RFC 5321 §4.1.2: ``<[route:]mailbox>``
        then parameters), in one linear pass; ``(None, None)`` when it is none. In place of
        aiosmtpd's, which runs the email package's header parser (and defines a class) on
        every call: a tenth of the listener's time per message. As aiosmtpd does, the null
        path is ``<>``, and an address without angle brackets is taken up to a space."""
        if not arg:
            return "", ""
        text = arg.strip()
        if not text.startswith("<"):
            address, _, rest = text.partition(" ")
            return (
                (address, rest.lstrip())
                if "<" not in address and ">" not in address
                else (None, None)
            )
        end = text.find(">") if '"' not in text else _closing(text)
        if end < 0:
            return None, None
        path, rest = text[1:end].strip(), text[end + 1 :].lstrip()
        if not path:
            return "<>", rest
        if path.startswith("@"):  # a source route: ignored (RFC 5321 §3.3, §4.1.2)
            _, colon, path = path.partition(":")
            if not colon:
                return None, None
        if not path or _unquoted_space(path):
            return None, None
        return path, rest

    # -- commands ------------------------------------------------------------------------------

    async def smtp_LHLO(self, arg: str | None) -> None:
        """RFC 2033 §4.1: the LMTP greeting; the extensions this server offers."""
        session = self.session
        if not arg or session is None:
            await self.push("501 5.5.4 Syntax: LHLO hostname")
            return
        self._set_rset_state()  # type: ignore[no-untyped-call]
        session.host_name = arg
        session.extended_smtp = True
        self.command_size_limits["MAIL"] = COMMAND_MAX_BYTES + MAIL_PARAMETERS_BYTES
        lines = [
            self.hostname,
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            f"SIZE {self.max_message_bytes}",
            "8BITMIME",
            "SMTPUTF8",
        ]
        if self.tls_context is not None and self._tls_protocol is None:
            lines.append("STARTTLS")
        # RFC 2034 §3: LHLO's reply carries no enhanced status codes (super(): as written).
        for line in lines[:-1]:
            await super().push(f"250-{line}")
        await super().push(f"250 {lines[-1]}")

    async def handle_MAIL(
        self,
        server: LmtpSession,
        session: SmtpSession,
        envelope: Transaction,
        address: str,
        options: list[str],
    ) -> str:
        if not wire.usable_address(address):
            return wire.BAD_ADDRESS
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return wire.SENDER_OK

    async def handle_RCPT(
        self,
        server: LmtpSession,
        session: SmtpSession,
        envelope: Transaction,
        address: str,
        options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return wire.TOO_MANY_RECIPIENTS
        if not wire.usable_address(address) or "@" not in address:
            return wire.BAD_ADDRESS
        declared = _declared_size(envelope.mail_options)
        refusal = self.listener.check_recipient(address, len(envelope.rcpt_tos), declared)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return wire.RECIPIENT_OK

    async def smtp_DATA(self, arg: str | None) -> None:
        """RFC 2033 §4.2: the message, then a reply per accepted recipient in RCPT order."""
        if await self.check_helo_needed("LHLO"):
            return
        envelope = self.envelope
        if envelope is None or envelope.mail_from is None or not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        recipients = list(envelope.rcpt_tos)
        count = len(set(recipients))
        sender = _null(envelope.mail_from)
        declared = _declared_size(envelope.mail_options)
        # Room for a copy per recipient of what MAIL declared, or for one message as large as
        # it may be: the listener delivers no more copies than the budget holds.
        expected = (
            count * min(declared, self.max_message_bytes) if declared else self.max_message_bytes
        )
        self.in_data = True
        try:
            reservation = await self.listener.room(count, expected)
            if reservation is None:
                await self.push(wire.BUSY)
                return
            handed = False
            try:
                await self.push("354 End data with <CR><LF>.<CR><LF>")
                data = await self._read_data()
                if data is None:
                    for _ in recipients:
                        await self.push(wire.too_large(self.max_message_bytes))
                    return
                self._reset_timeout()  # the wait for the replies is bounded by reply_within
                replies = await self.listener.deliver(sender, recipients, data, reservation)
                handed = self.handed = True
                self.listener.transaction_over(self)  # over for handed_over: it is handed
            finally:
                if not handed:
                    self.listener.give_back(reservation)
            del data
            for reply in replies:
                await self.push(await reply())
        finally:
            self.in_data = False
            self._set_post_data_state()
        if self.listener.stopping:
            await self.push(wire.SHUTTING_DOWN)
            self.close()

    async def _read_data(self) -> bytes | None:
        """The message up to the lone dot, unstuffed; None when it was over the limit (the
        rest was read and dropped). Read up to each ``.<CRLF>`` (a lone dot ends the data when
        a line ends before it), or in pieces of the reader's limit where none comes: linear in
        the size, and memory bounded by the limit."""
        limit = self.max_message_bytes
        reader: asyncio.StreamReader = self._reader
        data = bytearray()
        size = 0
        tail = b"\r\n"  # the bytes before the next piece: DATA starts at the start of a line
        while True:
            try:
                piece = await reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:  # no dot-CRLF soon: take a piece
                piece = await reader.read(exc.consumed)
            except asyncio.IncompleteReadError as exc:  # the client went away mid-DATA
                raise ConnectionResetError("the connection ended during DATA") from exc
            if piece.endswith(b".\r\n"):
                before = piece[-5:-3] if len(piece) >= 5 else (tail + piece[:-3])[-2:]
                if before == b"\r\n":  # the lone dot
                    size += len(piece) - 3
                    if size > limit:
                        return None
                    data += piece[:-3]
                    return _unstuffed(data)
            size += len(piece)
            if size > limit:
                data.clear()  # keep reading to the end, keep nothing
            else:
                data += piece
            tail = piece[-2:] if len(piece) >= 2 else (tail + piece)[-2:]


def _closing(text: str) -> int:
    """The index of the ``>`` closing a path whose local part may be quoted (``"a>b"@c``)."""
    quoted = escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def _unquoted_space(path: str) -> bool:
    """Whether ``path`` has a space outside its quoted local part."""
    if '"' not in path:
        return " " in path or "\t" in path
    local, _, domain = path.rpartition("@")
    return " " in domain or not (local.startswith('"') and local.endswith('"'))


def _unstuffed(data: bytearray) -> bytes:
    """RFC 5321 §4.5.2: the client doubled every dot that starts a line; take one away."""
    body = bytes(data)
    data.clear()
    if body.startswith(b"."):
        body = body[1:]
    return body.replace(b"\r\n.", b"\r\n") if b"\r\n." in body else body


def _declared_size(options: list[str]) -> int | None:
    """The SIZE a MAIL command declared (RFC 1870), or None."""
    for option in options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit() and len(value) < 12:
            return int(value)
    return None


def _null(sender: str) -> str:
    """aiosmtpd hands the null reverse-path ``MAIL FROM:<>`` over as ``<>``."""
    return "" if sender == "<>" else sender
