"""One IMAP connection: the only module that imports aioimaplib.

``ImapSession.open`` connects (implicit TLS, STARTTLS or plain), logs in, asks for CAPABILITY
and SELECTs. Every command runs under a timeout and races the connection-lost event, so a
dropped connection surfaces at once as ``ImapConnectionLost`` instead of hanging until a timer.
Every ``* n EXISTS`` the server sends, whatever command it arrives with, sets ``new_mail``:
aioimaplib drops untagged responses that arrive during other commands, and without this a
message appended between a SEARCH and the next IDLE would wait for the next arrival. Those
that arrive during an IDLE are counted in ``pushes``: a server can advertise IDLE and never
push (Cyrus without idled, Courier with IMAP_ENHANCEDIDLE=0), which the watcher notices.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import logging
import re
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator
from typing import Any

from aioimaplib import aioimaplib

from mailroom.backoff import ONCE_MORE, Retry
from mailroom.config import ImapMailboxConfig
from mailroom.envelope import FAILED_KEYWORD
from mailroom.errors import ImapAuthError, ImapConnectionLost, ImapError, ImapLimitError
from mailroom.redact import printable
from mailroom.sources.imap_wire import (
    LINE_BYTES,
    RESPONSE_BYTES,
    UID_MAX,
    BodyLimits,
    Event,
    FetchedMessage,
    Framer,
    Hierarchy,
    Limits,
    capability_code,
    fetch_flags,
    login_segments,
    mailbox_name,
    number,
    parse_fetch,
    parse_list_delimiter,
    parse_namespace,
    response_text,
    told_capabilities,
    uid_set,
)
from mailroom.sources.lifecycle import wait_any
from mailroom.trust.tls import client_context

__all__ = ["ImapSession"]

# What this adapter uses of aioimaplib beyond its documented API, written against 2.0.3: the
# classes it subclasses and the methods it overrides or calls are checked here, at import, so
# that a release that moves one fails at once and not silently at run time. The attributes
# only an instance has are checked where they are used; tests/test_imap_canary.py names every
# internal and undocumented behaviour this module relies on, with what it is for.
INTERNALS = (
    "CONNECTED",
    "Command",
    "Command._reset_timer",
    "FetchCommand.FETCH_MESSAGE_DATA_RE",
    "FetchCommand.append_to_resp",
    "FetchCommand.wait_data",
    "IMAP4.create_client",
    "IMAP4.idle_done",
    "IMAP4.idle_start",
    "IMAP4ClientProtocol._continuation",
    "IMAP4ClientProtocol._response_done",
    "IMAP4ClientProtocol._handle_line",
    "IMAP4ClientProtocol._untagged_response",
    "IMAP4ClientProtocol.capability",
    "IMAP4ClientProtocol.execute",
    "IMAP4ClientProtocol.new_tag",
    "IMAP4ClientProtocol.search",
    "IdleCommand",
    "SELECTED",
    "tagged_status_response_re",
)


def internals_missing(module: Any = aioimaplib) -> list[str]:
    """The ``INTERNALS`` that ``module`` (aioimaplib's) lacks."""
    missing = []
    for path in INTERNALS:
        owner = module
        for name in path.split("."):
            owner = getattr(owner, name, None)
        if owner is None:
            missing.append(path)
    return missing


def internals_moved(what: str) -> RuntimeError:
    """The error for an aioimaplib internal that is gone: it names this adapter."""
    return RuntimeError(
        f"aioimaplib {importlib.metadata.version('aioimaplib')} has no {what}, which "
        "mailroom/sources/imap_session.py relies on (written against aioimaplib 2.0.3): port "
        "the adapter, or pin aioimaplib==2.0.3; tests/test_imap_canary.py says what each is for"
    )


if _missing := internals_missing():
    raise internals_moved(", ".join(_missing))

log = logging.getLogger("mailroom.imap")
# aioimaplib's DEBUG lines contain whole messages and, for some commands, credentials: never
# enabled, whatever the root logger's level.
logging.getLogger("aioimaplib").setLevel(logging.WARNING)

COMMAND_TIMEOUT_S = 30.0
SIZE_BATCH = 2048  # UIDs per UID FETCH (RFC822.SIZE) without SEARCHRES
# What a sweep asks of each message found: its size (for max_message_bytes and the budget) and
# when it arrived (the watcher tells mail no push announced from mail that just came).
SWEEP_ITEMS = "UID RFC822.SIZE INTERNALDATE"
LOGOUT_TIMEOUT_S = 5.0

_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_EXISTS = re.compile(rb"^(?:\* )?(\d{1,10}) EXISTS")  # longer: no count of ours (RFC 3501 §9)
_EXPUNGE = re.compile(rb"^(?:\* )?(\d{1,10}) EXPUNGE")
SEARCH_LINE_MAX_BYTES = 64 * 1024 * 1024  # a SEARCH answer: 11 bytes per message at most
_DEFAULT_LIMITS = Limits()
EVENTS_PER_TURN = 256  # lines and literals read per turn of the event loop (a few ms)
_SECRET_COMMANDS = frozenset(("LOGIN", "AUTHENTICATE XOAUTH2"))
_SETTLED_FLAGS = frozenset((b"\\seen", b"\\deleted", FAILED_KEYWORD.lower().encode()))
_LIST_FLAGS = re.compile(rb"^\(([^)]*)\) ")


_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only

# What a silent server most often means: implicit TLS and a plain connection talking past each
# other (each waits for the other to speak first), by the value of ``ssl``.
_GREETING_HINT = {
    False: "if this is a TLS port (993), set ssl: true (start_tls is for a plain port, 143)",
    True: "is the server up, and is this its IMAP port?",
}
_CAPABILITY_SETS: dict[frozenset[str], frozenset[str]] = {}


def _shared(capabilities: frozenset[str]) -> frozenset[str]:
    """One object for each set of capabilities seen (a few servers' worth, bounded)."""
    if len(_CAPABILITY_SETS) >= 64:
        return capabilities
    return _CAPABILITY_SETS.setdefault(capabilities, capabilities)


class _FetchCommand(aioimaplib.FetchCommand):  # type: ignore[misc]
    """aioimaplib's FetchCommand rescans every line received so far for each new line to see
    whether a response's parentheses are closed (quadratic in the lines of a response), and
    restarts its timer (a new timer handle) at every line; this one keeps the count as the
    lines come, and restarts the timer once per read (``touch``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open = 0  # "(" minus ")" in the lines of the FETCH response being read
        self._progress = False  # data came since the timer was last restarted

    def append_to_resp(self, line: Any, result: str = "Pending") -> None:
        if type(line) is bytes:
            if self.FETCH_MESSAGE_DATA_RE.match(line):
                self._open = 0
            self._open += line.count(b"(") - line.count(b")")
        super().append_to_resp(line, result)

    def wait_data(self) -> bool:
        return self._open != 0

    def _reset_timer(self) -> None:
        self._progress = True

    def touch(self) -> None:
        """Restart the timer if data came since it was last restarted."""
        if self._progress:
            self._progress = False
            super()._reset_timer()


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """aioimaplib's protocol with mailroom's framing, telling us about every EXISTS and BYE.

    aioimaplib's own ``data_received`` copies the pending line for every read (8 MiB without
    a CRLF cost 8 s of the event loop), buffers literals of any announced size, recurses once
    per line, handles a whole read at once however many lines it holds, and keeps every
    untagged response of an IDLE until DONE (issue 18). Here the ``Framer`` splits the bytes in
    linear time within the ``Limits`` the session sets for each command; the lines and literals
    go to aioimaplib's line handler in a loop, at most ``EVENTS_PER_TURN`` of them per turn of
    the event loop (reading pauses meanwhile), so a flood of short lines delays no other
    mailbox. A server that breaks a limit loses its connection (``violation`` says why).
    """

    session: ImapSession | None = None
    current_command: Any
    pending_sync_command: Any
    capabilities: set[str] | frozenset[str]  # aioimaplib's set; shared once logged in
    greeted_capabilities: set[str] | None = None  # what the greeting told (``capability``)
    quickack: Any = None  # the TCP socket, once connected (Linux: TCP_QUICKACK)

    def ack_quickly(self) -> None:
        """Cyrus and Courier write a response in several small writes with Nagle on: each
        waits for our delayed ACK, 40 ms (measured: a pipelined SEARCH + FETCH took 48 ms on
        Cyrus, 44 ms on Courier, 0.2 ms on Dovecot). Quick ACKs end the wait; Linux leaves
        quick-ACK mode as it sees fit, so this is asked again after every write and read."""
        if self.quickack is not None:
            self.quickack.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.framer = Framer()
        self.violation: ImapLimitError | None = None
        self._greeted = False
        self._chunks: deque[bytes] = deque()  # received, not yet read
        self._events: Iterator[Event] | None = None  # the chunk being read
        self._working = False  # a turn is scheduled, or running
        self._lost: tuple[Exception | None] | None = None  # connection_lost, held until read

    def data_received(self, d: bytes) -> None:
        self.ack_quickly()
        if self.violation is None:
            self._chunks.append(d)
            if not self._working:
                self._work()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._working:  # what came before the loss is read first (a BYE, a tagged OK)
            self._lost = (exc,)
        else:
            super().connection_lost(exc)

    def _work(self) -> None:
        """Read what was received, at most ``EVENTS_PER_TURN`` lines and literals; then
        pause reading and come back in the next turn of the event loop."""
        self._working = True
        try:
            done = self._read(EVENTS_PER_TURN)
        except ImapLimitError as exc:
            self.violation = exc
            log.warning(
                "%s: %s; dropping the connection",
                self.session.id if self.session is not None else "imap",
                exc,
            )
            done = self._drop()
        except Exception as exc:
            # aioimaplib's protocol errors quote the pending command, which can be LOGIN
            # with its password or AUTHENTICATE with a token: log the class only.
            log.error("IMAP protocol error (%s); dropping the connection", type(exc).__name__)
            done = self._drop()
        self._progressed()
        transport = self.transport
        if not done:
            if transport is not None and not transport.is_closing():
                transport.pause_reading()
            self.loop.call_soon(self._work)
            return
        self._working = False
        if self._lost is not None:
            (reason,), self._lost = self._lost, None
            super().connection_lost(reason)
        elif transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _read(self, budget: int) -> bool:
        """Hand up to ``budget`` lines and literals to aioimaplib; True when all were read."""
        while True:
            if self._events is None:
                if not self._chunks:
                    return True
                self._events = self.framer.feed(self._chunks.popleft())
            for event in self._events:
                if isinstance(event, bytearray):
                    self.current_command.append_to_resp(event)
                else:
                    self._line(*event)
                budget -= 1
                if budget <= 0:
                    return False
            self._events = None

    @property
    def quiet(self) -> bool:
        """Nothing received since the last tagged response (the framer's count, a partial
        line, or chunks not read yet)."""
        return not self._chunks and self._events is None and self.framer.quiet

    def _drop(self) -> bool:
        self._chunks.clear()
        self._events = None
        if self.transport is not None:
            self.transport.abort()
        return True

    def _progressed(self) -> None:
        """After a turn: restart the timers of commands that received data, and forget the
        pushes of an IDLE (``_on_untagged`` saw them; aioimaplib would queue them until DONE)."""
        if self.framer.in_literal and self.current_command is not None:
            self.current_command._reset_timer()  # a large body on its way is no stall
        for command in self.pending_async_commands.values():
            if isinstance(command, _FetchCommand):
                command.touch()
        idle = self.pending_sync_command
        if isinstance(idle, aioimaplib.IdleCommand):
            idle.buffer.clear()

    def _line(self, line: bytes, literal: int | None) -> None:
        """aioimaplib's ``_handle_responses`` for one line, without its recursion."""
        if self.state == aioimaplib.CONNECTED:
            if self._greeted:  # RFC 3501 §7.1: one greeting; aioimaplib would start a task each
                return
            self._greeted = True
            self.greeted_capabilities = capability_code(line)
        elif aioimaplib.tagged_status_response_re.match(line):
            self.framer.settled()
        command = self._handle_line(line, self.current_command)
        if literal is not None:
            self.current_command = command or aioimaplib.Command("NIL", "unused", loop=self.loop)
        elif command is not None and command.wait_data():
            self.current_command = command
        else:
            self.current_command = None

    async def capability(self) -> None:
        """aioimaplib asks for CAPABILITY after the greeting: not when the greeting told them
        (RFC 3501 §7.1; Dovecot's does: one round trip less at start). STARTTLS and a login
        ask again (``ImapSession``)."""
        told, self.greeted_capabilities = self.greeted_capabilities, None
        if told is None:
            await super().capability()
        else:
            self.capabilities = told

    def _untagged_response(self, line: bytes) -> Any:
        if self.session is not None:
            self.session._on_untagged(line)
        return super()._untagged_response(line)

    def _continuation(self, line: bytes) -> None:
        command = self.pending_sync_command
        if command is not None and command.name == "IDLE" and self.session is not None:
            # Courier says which IDLE it runs: "+ entering ENHANCED idle mode" pushes.
            self.session.idle_reply = line[:200].decode("utf-8", "replace")
        if isinstance(command, _LoginCommand) and command.following:
            # A synchronising literal of LOGIN: the server is ready for it (RFC 3501 §7.5).
            self.transport.write(command.following.pop(0).encode() + b"\r\n")
            return
        super()._continuation(line)
        if command is not None and command.name == "AUTHENTICATE":
            # A failed XOAUTH2 gets a "+ <base64 JSON error>" challenge and waits for an empty
            # client response before its tagged NO (RFC 7628 §3.2.3); aioimaplib sends nothing.
            self.transport.write(b"\r\n")

    @property
    def idle_acknowledged(self) -> asyncio.Event:
        """Set by the server's continuation to an IDLE (aioimaplib's ``_idle_event``)."""
        try:
            event: asyncio.Event = self._idle_event
        except AttributeError:
            raise internals_moved("IMAP4ClientProtocol._idle_event") from None
        return event

    def _response_done(self, line: bytes) -> None:
        """aioimaplib takes any tagged answer to be the pending sync command's while there is
        one; an IDLE pipelined behind a UID STORE (``store_then_idle``) is pending before the
        STORE's answer comes: that answer goes to the STORE, by its tag."""
        sync = self.pending_sync_command
        if sync is None or line.split(b" ", 1)[0] == sync.tag.encode():
            super()._response_done(line)
            return
        self.pending_sync_command = None
        try:
            super()._response_done(line)
        finally:
            self.pending_sync_command = sync


class _LoginCommand(aioimaplib.Command):  # type: ignore[misc]
    """LOGIN with its arguments as ``login_segments`` made them: aioimaplib's own login sends
    the password as a quoted string whatever it holds, 8-bit included (RFC 3501 forbids it)."""

    def __init__(self, tag: str, segments: list[str], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__("LOGIN", tag, loop=loop)
        self._first, self.following = segments[0], segments[1:]

    def __repr__(self) -> str:  # the line aioimaplib sends
        return f"{self.tag} {self._first}"


class _Client(aioimaplib.IMAP4):  # type: ignore[misc]
    """aioimaplib's client, speaking through ``_Protocol``."""

    protocol: _Protocol

    @property
    def idle_waiter(self) -> asyncio.TimerHandle | None:
        """The timer ``idle_start`` arms to stop waiting for pushes (None before the first)."""
        try:
            waiter: asyncio.TimerHandle | None = self._idle_waiter
        except AttributeError:
            raise internals_moved("IMAP4._idle_waiter") from None
        return waiter

    def create_client(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop,
        conn_lost_cb: Any = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = _Protocol(local_loop, conn_lost_cb)
        self._client_task = local_loop.create_task(
            local_loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context)
        )


def tls_context(config: ImapMailboxConfig) -> ssl.SSLContext:
    """Verification on by default; ``ca_file`` adds a private CA to the system's."""
    return client_context(ca_file=config.ca_file, verify=config.tls_verify)


class ImapSession:
    """An authenticated connection with the configured mailbox selected."""

    def __init__(
        self,
        config: ImapMailboxConfig,
        timeout_s: float,
        malformed: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.id = config.id
        self.timeout_s = timeout_s
        self._malformed = malformed
        self.lost = asyncio.Event()
        self._waiting: set[asyncio.Task[Any]] = set()  # tasks awaiting a command in _run
        self._cancelled_by_loss: set[asyncio.Task[Any]] = set()
        self.new_mail = asyncio.Event()
        self.exists = 0  # the server's message count, from EXISTS and EXPUNGE responses
        self._expunges = 0  # EXPUNGE responses seen so far
        self._idling: asyncio.Future[Any] | None = None  # an IDLE not yet ended by DONE
        self._idle_ahead: asyncio.Future[Any] | None = None  # started by store_then_idle
        self._idle_base = 0  # messages 1.._idle_base were swept before the IDLE began
        self.pushes = 0  # EXISTS growths announced during an IDLE (a push), ever
        self.idle_reply: str | None = None  # the server's "+ ..." to the last IDLE
        self.bye: str | None = None
        self.uidvalidity = 0
        self.capabilities: frozenset[str] = frozenset()
        self._hierarchy: Hierarchy | None = None  # asked for on first use (resolve)
        self._client: _Client | None = None
        self._token: Callable[[], Awaitable[str]] | None = None

    # -- connection ----------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        config: ImapMailboxConfig,
        *,
        timeout_s: float = COMMAND_TIMEOUT_S,
        token: Callable[[], Awaitable[str]] | None = None,
        malformed: Callable[[str], None] | None = None,
    ) -> ImapSession:
        """Connect, log in and select; ``ImapError`` (or a subclass) says what failed.

        ``token`` gives the OAuth access token for ``auth: xoauth2`` (``TokenProvider.token``);
        ``malformed`` is told of each message the server described out of range (skipped).
        """
        session = await cls.connect(config, timeout_s=timeout_s, token=token, malformed=malformed)
        try:
            await session.login()
            await session.select()
        except BaseException:
            session.abort()
            raise
        return session

    @classmethod
    async def connect(
        cls,
        config: ImapMailboxConfig,
        *,
        timeout_s: float = COMMAND_TIMEOUT_S,
        token: Callable[[], Awaitable[str]] | None = None,
        malformed: Callable[[str], None] | None = None,
    ) -> ImapSession:
        """Only connect (greeting, implicit TLS or STARTTLS); ``login()`` and ``select()``
        follow. ``open`` does all three; ``mailroom check`` reports each step on its own."""
        session = cls(config, timeout_s, malformed)
        session._token = token
        try:
            await session._connect()
        except BaseException:
            session.abort()
            raise
        return session

    @property
    def _imap(self) -> _Client:
        """The client of this session (``ImapConnectionLost`` before it was connected)."""
        if self._client is None:
            raise ImapConnectionLost("not connected")
        return self._client

    @property
    def tls(self) -> ssl.SSLObject | None:
        """The TLS layer (implicit TLS, or after STARTTLS), or None on a plain connection."""
        if self._client is None or self._client.protocol.transport is None:
            return None
        layer: ssl.SSLObject | None = self._client.protocol.transport.get_extra_info("ssl_object")
        return layer

    async def _connect(self) -> None:
        config = self.config
        context = tls_context(config) if config.ssl or config.start_tls else None
        where = f"{config.host}:{config.port}"
        try:
            client = _Client(
                config.host,
                config.port,
                timeout=self.timeout_s,
                conn_lost_cb=self._on_lost,
                ssl_context=context if config.ssl else None,
            )
            if not isinstance(client.protocol, _Protocol):  # IMAP4.__init__ calls create_client
                raise internals_moved("IMAP4.__init__ calling create_client")
            client.protocol.session = self
            self._client = client
            await client.wait_hello_from_server()
        except ssl.SSLCertVerificationError as exc:
            raise ImapConnectionLost(
                f"TLS certificate of {where} not trusted ({exc.verify_message}); "
                "set ca_file to the CA that signed it"
            ) from exc
        except ssl.SSLError as exc:
            raise ImapConnectionLost(
                f"TLS handshake with {where} failed ({exc.reason}); is ssl/start_tls right for "
                "this port?"
            ) from exc
        except TimeoutError as exc:
            raise ImapConnectionLost(
                f"no IMAP greeting from {where} in {self.timeout_s:g}s; "
                + _GREETING_HINT[config.ssl]
            ) from exc
        except OSError as exc:
            raise ImapConnectionLost(f"cannot connect to {where}: {exc.strerror or exc}") from exc
        self._keepalive()
        if config.start_tls and context is not None:  # made above for start_tls
            await self._starttls(context)

    def _keepalive(self) -> None:
        # A peer that vanishes without FIN/RST (a dead NAT, a pulled cable) is noticed by TCP
        # keepalive within ~30 s, even in the middle of a 29-minute IDLE.
        client = self._imap
        sock = client.protocol.transport.get_extra_info("socket")
        if sock is None:
            return
        if _TCP_QUICKACK is not None:
            client.protocol.quickack = sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)

    async def _starttls(self, context: ssl.SSLContext) -> None:
        # aioimaplib has no STARTTLS helper: send the command, then upgrade the transport
        # (RFC 3501 §6.2.1); capabilities must be asked for again afterwards.
        client = self._imap
        protocol = client.protocol
        if "STARTTLS" not in protocol.capabilities:
            raise ImapError(
                f"{self.config.host}:{self.config.port} does not offer STARTTLS; "
                "use ssl: true on its TLS port, or start_tls: false"
            )
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        await self._run("STARTTLS", protocol.execute(command))
        if not protocol.quiet:
            # Anything after the tagged OK came in clear text, before TLS: a man in the middle
            # injecting responses (CVE-2011-0411's kind). Nothing of it may be believed.
            self.abort()
            raise ImapConnectionLost(
                f"{self.config.host}:{self.config.port} sent more after its STARTTLS answer, "
                "before TLS began; refused (someone on the path may be injecting responses)"
            )
        try:
            transport = await asyncio.wait_for(
                protocol.loop.start_tls(
                    protocol.transport, protocol, context, server_hostname=self.config.host
                ),
                self.timeout_s,
            )
        except ssl.SSLCertVerificationError as exc:
            raise ImapConnectionLost(
                f"TLS certificate of {self.config.host} not trusted ({exc.verify_message}); "
                "set ca_file to the CA that signed it"
            ) from exc
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            raise ImapConnectionLost(f"STARTTLS handshake failed: {exc}") from exc
        protocol.transport = transport
        await self._run("CAPABILITY", protocol.capability())

    async def login(self) -> None:
        """LOGIN or AUTHENTICATE XOAUTH2, then CAPABILITY again; ``ImapAuthError`` if refused."""
        client = self._imap
        protocol = client.protocol
        if "LOGINDISABLED" in protocol.capabilities:
            raise ImapAuthError(
                "the server refuses LOGIN on this connection (LOGINDISABLED); "
                "set start_tls: true or ssl: true"
            )
        if self.config.auth == "xoauth2":
            if self._token is None:
                raise RuntimeError("auth: xoauth2 needs a token source (ImapSession.open)")
            # SASL XOAUTH2 (Microsoft, "Authenticate an IMAP ... connection using OAuth").
            response = await self._run(
                "AUTHENTICATE XOAUTH2",
                client.xoauth2(self.config.user, await self._token()),
                check=False,
            )
            if response.result != "OK":
                raise ImapAuthError(
                    f"XOAUTH2 as {self.config.user} refused: {response_text(response)}; "
                    "check the app's access to this mailbox and the oauth scope"
                )
        else:
            password = self.config.password
            if password is None:  # the config requires one with auth: password
                raise RuntimeError("auth: password without a password")
            response = await self._password_login(self.config.user, password.reveal())
            if response.result != "OK":
                raise ImapAuthError(
                    f"login as {self.config.user} refused: {response_text(response)}; "
                    "check user and password"
                )
        # RFC 3501 §6.2.3: capabilities may change after login; ask again, unless the answer
        # to the login told them (§7.1: Dovecot's does: one round trip less at start).
        told: Collection[str] | None = told_capabilities(response.lines)
        if told is None:
            await self._run("CAPABILITY", protocol.capability())
            told = protocol.capabilities
        # aioimaplib keeps them as a set of its own; the same server gives every session
        # the same forty-odd words: shared, they cost 8 MiB less across 1,000 mailboxes.
        protocol.capabilities = _shared(frozenset(told))
        self.capabilities = _shared(frozenset(c.upper() for c in told))

    async def _password_login(self, user: str, password: str) -> Any:
        """LOGIN, both as quoted strings when they are printable ASCII. 8-bit credentials go
        where RFC 3501 allows them: AUTHENTICATE PLAIN with the initial response (RFC 4616,
        RFC 4959: UTF-8 inside base64) where the server has AUTH=PLAIN and SASL-IR (Dovecot,
        Cyrus, Exchange, Gmail), else LOGIN with literals (Courier)."""
        protocol = self._imap.protocol
        capabilities = {c.upper() for c in protocol.capabilities}
        ascii_only = all(" " <= char <= "~" for char in user + password)
        if not ascii_only and {"AUTH=PLAIN", "SASL-IR"} <= capabilities:
            plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            command = aioimaplib.Command(
                "AUTHENTICATE", protocol.new_tag(), "PLAIN", plain, loop=protocol.loop
            )
            what = "AUTHENTICATE PLAIN"
        else:
            literal_plus = (
                bool({"LITERAL+", "LITERAL-"} & capabilities)
                and len(f"{user}{password}".encode()) <= 4096
            )
            segments = login_segments(user, password, literal_plus=literal_plus)
            command, what = _LoginCommand(protocol.new_tag(), segments, protocol.loop), "LOGIN"
        response = await self._run(what, protocol.execute(command), check=False)
        if response.result == "OK":
            protocol.state = aioimaplib.AUTH  # as aioimaplib's own login() does
        return response

    async def select(self, *, readonly: bool = False) -> None:
        """SELECT (or EXAMINE, ``readonly``) the configured mailbox and read its UIDVALIDITY."""
        client = self._imap
        name = mailbox_name(await self.resolve(self.config.mailbox))
        response = await self._run(
            "EXAMINE" if readonly else "SELECT",
            client.examine(name) if readonly else client.select(name),
            check=False,
        )
        if response.result != "OK":
            raise ImapError(
                f"cannot select mailbox {self.config.mailbox!r}: {response_text(response)}; "
                "check the mailbox setting"
            )
        if readonly:  # aioimaplib's examine() leaves its state at AUTH: no command would go
            client.protocol.state = aioimaplib.SELECTED
        for line in response.lines:
            if isinstance(line, bytes) and (match := _UIDVALIDITY.search(line)):
                value = number(match.group(1), UID_MAX, minimum=1)
                if value is None:
                    raise ImapError(
                        "the server sent a UIDVALIDITY out of range on SELECT (RFC 3501 §9: a "
                        "non-zero 32-bit number)"
                    )
                self.uidvalidity = value
        if not self.uidvalidity:
            raise ImapError("the server sent no UIDVALIDITY on SELECT; mailroom needs UIDs")

    def _on_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        self._cancel_idle()
        for task in self._waiting:  # a command in flight gets no answer now: end it
            self._cancelled_by_loss.add(task)
            task.cancel()

    def _cancel_idle(self) -> None:
        """An open IDLE ends with the connection: its task, and aioimaplib's timer for it
        (``IMAP4._idle_waiter``, which idle_start arms: None before the first IDLE)."""
        if self._idling is not None:
            self._idling.cancel()
        if self._client is not None and self._client.idle_waiter is not None:
            self._client.idle_waiter.cancel()

    @property
    def token_expired(self) -> bool:
        """The server ended the session because the OAuth token expired (Exchange Online:
        ``* BYE Session invalidated - AccessTokenExpired``)."""
        return self.bye is not None and "AccessTokenExpired" in self.bye

    def _on_untagged(self, line: bytes) -> None:
        if match := _EXISTS.match(line):
            # Only growth is new mail; some servers repeat an unchanged count on every command.
            count = int(match.group(1))
            if count > self.exists:
                self.new_mail.set()
                if self._idling is not None:
                    self.pushes += 1
            self.exists = count
        elif match := _EXPUNGE.match(line):
            self.exists = max(0, self.exists - 1)
            self._expunges += 1
            if int(match.group(1)) <= self._idle_base:
                self._idle_base -= 1  # the swept messages moved down by one
        elif self._idling is not None and (flags := fetch_flags(line)) is not None:
            # Another client made a message unseen again (``mailroom redrive`` clearing
            # $MailroomFailed and \Seen; RFC 3501 §7.4.2, sent during IDLE): sweep now, not
            # at the next idle_timeout.
            if not flags & _SETTLED_FLAGS:
                self.new_mail.set()
        elif line.startswith((b"* BYE", b"BYE")):
            self.bye = printable(line[:400].decode("utf-8", "replace").removeprefix("* "), 300)

    def abort(self) -> None:
        """Drop the connection without a word (after a loss or a protocol error)."""
        self.lost.set()
        self._cancel_idle()
        if self._client is not None and self._client.protocol.transport is not None:
            self._client.protocol.transport.abort()

    async def logout(self) -> None:
        """LOGOUT politely, bounded; the connection is closed either way."""
        if self._client is not None and not self.lost.is_set():
            try:
                async with asyncio.timeout(LOGOUT_TIMEOUT_S):
                    if self._idling is not None:
                        await self._end_idle()
                    await self._client.logout()
            except (ImapError, aioimaplib.AioImapException, TimeoutError, OSError) as exc:
                log.debug("%s: LOGOUT failed: %r", self.id, exc)
        self.abort()

    # -- commands ------------------------------------------------------------------------------

    async def _run(
        self,
        what: str,
        awaitable: Awaitable[Any],
        *,
        timeout_s: float | None = None,
        check: bool = True,
        limits: Limits | None = None,
    ) -> Any:
        """Await one command: ``ImapConnectionLost`` on loss or timeout, ``ImapError`` on NO/BAD.

        The command is awaited in the caller's task (no extra tasks: this is the hot path);
        a loss cancels that task from ``_on_lost`` and the cancellation becomes the error.
        ``limits``: what its answer may hold, when more than ``Limits()`` (message bodies, a
        long SEARCH answer).
        """
        if self.lost.is_set():
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise ImapConnectionLost(f"{what}: connection lost")
        if self._idling is not None:
            try:
                await self._end_idle()
            except BaseException:
                if asyncio.iscoroutine(awaitable):
                    awaitable.close()
                raise
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("IMAP commands run in a task")
        limit = timeout_s or self.timeout_s
        cancelling = task.cancelling()
        self._waiting.add(task)
        framer = self._client.protocol.framer if self._client is not None else None
        if framer is not None and limits is not None:
            framer.limits = limits
        try:
            async with asyncio.timeout(limit):
                response = await awaitable
        except asyncio.CancelledError:
            if task not in self._cancelled_by_loss:
                raise
            self._cancelled_by_loss.discard(task)
            if task.uncancel() > cancelling:  # someone else cancelled us too: honour that
                raise
            raise ImapConnectionLost(f"{what}: connection lost{self._loss_detail()}") from None
        except TimeoutError as exc:
            self.abort()
            raise ImapConnectionLost(f"{what}: no answer in {limit:g}s") from exc
        except (aioimaplib.AioImapException, OSError) as exc:
            self.abort()
            # aioimaplib's errors may quote the command, and LOGIN's has the password in it.
            shown = "" if what in _SECRET_COMMANDS else f" {printable(str(exc), 200)}"
            raise ImapConnectionLost(f"{what}: {type(exc).__name__}{shown}") from exc
        finally:
            self._waiting.discard(task)
            if framer is not None and limits is not None:
                framer.limits = _DEFAULT_LIMITS
        if check and response is not None and response.result != "OK":
            raise ImapError(f"{what} failed: {response.result} {response_text(response)}")
        return response

    async def search(self, criteria: str) -> list[int]:
        """``UID SEARCH <criteria>``, ascending."""
        client = self._imap
        # No CHARSET: Exchange and Yahoo reject CHARSET utf-8 (aioimaplib#126); RFC 3501 §6.4.4.
        response = await self._run(
            "UID SEARCH",
            client.protocol.search(criteria, charset=None, by_uid=True),
            limits=self._many_limits(line=True),
        )
        return self._searched(response)

    def _searched(self, response: Any) -> list[int]:
        """The numbers of a SEARCH response, ascending; one out of range is skipped and counted.
        aioimaplib strips "* SEARCH" from the untagged lines; the last line is the tagged one."""
        found: list[int] = []
        bad = 0
        for line in response.lines[:-1]:
            if isinstance(line, bytes):
                for token in line.split():
                    if (uid := number(token, UID_MAX, minimum=1)) is not None:
                        found.append(uid)
                    elif token.isdigit():
                        bad += 1
        if bad:
            self._malformed_item(f"{bad} UIDs out of range in a SEARCH answer")
        return sorted(found)

    def _many_limits(self, *, line: bool) -> Limits:
        """Limits for an answer that may name every message of the mailbox: one SEARCH line
        (``line``), or a FETCH response each."""
        count = min(self.exists, SEARCH_LINE_MAX_BYTES // 11)
        if line:
            longest = min(SEARCH_LINE_MAX_BYTES, LINE_BYTES + 11 * count)
            return Limits(line_bytes=longest, response_bytes=RESPONSE_BYTES + longest)
        return Limits(response_bytes=RESPONSE_BYTES + 128 * count)

    def _malformed_item(self, what: str) -> None:
        log.warning("%s: the server sent %s; skipped", self.id, what)
        if self._malformed is not None:
            self._malformed(what)

    async def fetch(
        self, uids: Iterable[int], items: str, *, limits: Limits | None = None
    ) -> list[FetchedMessage]:
        """``UID FETCH`` of ``items`` (must include UID and RFC822.SIZE); ``limits`` when the
        answer holds message bodies (``BodyLimits``)."""
        return await self._fetch(uid_set(uids), items, limits)

    async def _fetch(
        self, message_set: str, items: str, limits: Limits | None
    ) -> list[FetchedMessage]:
        client = self._imap
        protocol = client.protocol
        command = _FetchCommand(
            protocol.new_tag(),
            message_set,
            f"({items})",
            prefix="UID",
            loop=protocol.loop,
            timeout=self.timeout_s,
        )
        response = await self._run(
            "UID FETCH",
            protocol.execute(command),
            timeout_s=self.timeout_s * 10,  # the per-line timer above catches a stall sooner
            limits=limits,
        )
        return parse_fetch(response.lines, malformed=self._malformed_item)

    async def search_sizes(self, criteria: str) -> list[FetchedMessage]:
        """UIDs, RFC822.SIZE and INTERNALDATE of the messages matching ``criteria``, ascending.

        With SEARCHRES (RFC 5182) this is one round trip: ``UID SEARCH RETURN (SAVE)`` and
        ``UID FETCH $ (SWEEP_ITEMS)`` pipelined (§2.1 allows it). Otherwise SEARCH, then
        FETCH in batches.
        """
        client = self._imap
        if "SEARCHRES" not in self.capabilities:
            uids = await self.search(criteria)
            found: list[FetchedMessage] = []
            for start in range(0, len(uids), SIZE_BATCH):
                found += await self.fetch(uids[start : start + SIZE_BATCH], SWEEP_ITEMS)
            return found
        protocol = client.protocol
        search = aioimaplib.Command(
            "SEARCH",
            protocol.new_tag(),
            "RETURN",
            "(SAVE)",
            criteria,
            prefix="UID",
            loop=protocol.loop,
        )
        return await self._search_then_fetch(
            "UID SEARCH", search, f"({SWEEP_ITEMS})", limits=self._many_limits(line=False)
        )

    async def fetch_pushed(
        self, criteria: str, *, max_count: int, body_bytes: int
    ) -> list[FetchedMessage] | None:
        """The messages an IDLE push announced that match ``criteria``, with their bodies,
        in one round trip: DONE, ``SEARCH RETURN (SAVE) criteria <new sequence numbers>``
        and ``UID FETCH $ (UID RFC822.SIZE BODY.PEEK[]<0.body_bytes>)``, pipelined. Without
        SEARCHRES (Cyrus, Courier, Exchange), ``UID SEARCH criteria <new sequence numbers>``
        and ``FETCH <new sequence numbers> (...)`` instead, the same sequence numbers EXISTS
        announced: the messages the search did not find are dropped (their bodies read in
        vain, at most ``max_count``), where DONE, SEARCH, FETCH sizes and FETCH bodies took
        four round trips (issue 21 item 5).

        A body of ``body_bytes`` or more may be cut short: it comes back as None (the size is
        known), to be fetched the ordinary way. None instead of a list when this does not
        apply: not idling, or more than ``max_count`` new messages (the bodies of all of them
        would be read at once). An EXPUNGE that crosses the pipelined SEARCH
        may have moved a new message below its sequence range: then ``new_mail`` is set again,
        so the caller sweeps the whole mailbox next.
        """
        client = self._imap
        low, high = self._idle_base + 1, self.exists
        if self._idling is None:
            return None
        if not 0 < high - low + 1 <= max_count:
            return None
        protocol = client.protocol
        expunges = self._expunges
        # The range goes last: any criteria followed by one more search key is valid
        # (RFC 3501 §6.4.4: keys are ANDed; "CHARSET x" may only come first).
        items = f"(UID RFC822.SIZE FLAGS BODY.PEEK[]<0.{body_bytes}>)"
        timeout_s = self.timeout_s * 10  # up to max_count bodies
        try:
            limits = BodyLimits(body_bytes, count=max_count)
            if "SEARCHRES" in self.capabilities:
                search = aioimaplib.Command(
                    "SEARCH",
                    protocol.new_tag(),
                    "RETURN",
                    "(SAVE)",
                    criteria,
                    f"{low}:{high}",
                    loop=protocol.loop,
                )
                fetched = await self._search_then_fetch(
                    "SEARCH", search, items, timeout_s=timeout_s, limits=limits
                )
            else:
                fetched = await self._search_and_fetch(
                    criteria, f"{low}:{high}", items, timeout_s=timeout_s, limits=limits
                )
        except ImapConnectionLost:
            raise
        except ImapError as exc:
            # Most likely an EXPUNGE still on its way put `high` past the last message
            # (RFC 3501 §9: BAD): the full sweep needs no sequence numbers.
            log.info("%s: %s; sweeping the whole mailbox instead", self.id, exc)
            self.new_mail.set()
            return None
        if self._expunges != expunges:
            self.new_mail.set()
        return [
            FetchedMessage(item.uid, item.size, None)
            if item.body is not None and len(item.body) >= body_bytes
            else item
            for item in fetched
        ]

    async def _search_and_fetch(
        self,
        criteria: str,
        sequence: str,
        items: str,
        *,
        timeout_s: float,
        limits: Limits | None = None,
    ) -> list[FetchedMessage]:
        """``UID SEARCH criteria sequence`` and ``FETCH sequence items``, pipelined after DONE
        (one round trip): what the FETCH brought of the messages the SEARCH found, in UID
        order. Sequence numbers cannot shift between the two: a server sends no EXPUNGE
        during a SEARCH or a FETCH (RFC 3501 §7.4.1), and one before them shifts both alike."""
        protocol = self._imap.protocol
        search = aioimaplib.Command(
            "SEARCH", protocol.new_tag(), criteria, sequence, prefix="UID", loop=protocol.loop
        )
        fetch = _FetchCommand(
            protocol.new_tag(), sequence, items, loop=protocol.loop, timeout=self.timeout_s
        )
        searched, fetched = await self._pipeline(
            "UID SEARCH + FETCH", [search, fetch], timeout_s=timeout_s, limits=limits
        )
        for name, response in (("UID SEARCH", searched), ("FETCH", fetched)):
            if response.result != "OK":
                raise ImapError(f"{name} failed: {response.result} {response_text(response)}")
        found = set(self._searched(searched))
        return sorted(
            (item for item in parse_fetch(fetched.lines) if item.uid in found),
            key=lambda item: item.uid,
        )

    async def _search_then_fetch(
        self,
        what: str,
        search: Any,
        items: str,
        *,
        timeout_s: float | None = None,
        limits: Limits | None = None,
    ) -> list[FetchedMessage]:
        """``search`` (a SEARCH with ``RETURN (SAVE)``, RFC 5182) and ``UID FETCH $ items``,
        pipelined (§2.1 allows it), after DONE when an IDLE is open: one round trip. The
        messages come in UID order."""
        client = self._imap
        protocol = client.protocol
        fetch = _FetchCommand(
            protocol.new_tag(), "$", items, prefix="UID", loop=protocol.loop, timeout=self.timeout_s
        )
        searched, fetched = await self._pipeline(
            f"{what} + UID FETCH $", [search, fetch], timeout_s=timeout_s, limits=limits
        )
        for name, response in ((what, searched), ("UID FETCH $", fetched)):
            if response.result != "OK":
                raise ImapError(f"{name} failed: {response.result} {response_text(response)}")
        found = parse_fetch(fetched.lines, malformed=self._malformed_item)
        return sorted(found, key=lambda item: item.uid)

    async def _pipeline(
        self,
        what: str,
        commands: list[Any],
        *,
        timeout_s: float | None = None,
        limits: Limits | None = None,
    ) -> list[Any]:
        """Send DONE when an IDLE is open, then ``commands``, without waiting in between, and
        await their responses. aioimaplib's ``execute`` would wait for the IDLE to end and for each
        command before the next one of the same kind; the commands here are registered with
        its protocol directly (each of a different kind, so responses are routed by kind)."""
        client = self._imap
        protocol = client.protocol
        idle, self._idling = self._idling, None
        pending: dict[str, Any] = protocol.pending_async_commands

        async def run() -> list[Any]:
            if idle is not None:
                client.idle_done()  # writes DONE
            for command in commands:
                if pending.get(command.untagged_resp_name) is not None:
                    raise RuntimeError(f"{command.name}: one of its kind is pending already")
                pending[command.untagged_resp_name] = command
            try:
                protocol.transport.write(b"".join(f"{c!r}\r\n".encode() for c in commands))
                protocol.ack_quickly()
                if idle is not None:
                    await idle
                    self._drain_idle_queue()
                for command in commands:
                    await command.wait()
            finally:
                for command in commands:
                    name = command.untagged_resp_name
                    if pending.get(name) is command:
                        del pending[name]
            return [command.response for command in commands]

        try:
            responses: list[Any] = await self._run(
                what, run(), timeout_s=timeout_s, check=False, limits=limits
            )
            return responses
        finally:
            if idle is not None and not idle.done():
                idle.cancel()

    async def store(self, uids: Iterable[int], flags: str, *, remove: bool = False) -> None:
        """``UID STORE uids +FLAGS.SILENT (flags)``, or ``-FLAGS.SILENT`` to ``remove`` them."""
        client = self._imap
        change = "-FLAGS.SILENT" if remove else "+FLAGS.SILENT"
        await self._run("UID STORE", client.uid("store", uid_set(uids), change, f"({flags})"))

    def _silent_store(self, uids: Iterable[int], flags: str) -> aioimaplib.Command:
        """``UID STORE uids +FLAGS.SILENT (flags)`` to pipeline with another command.

        aioimaplib routes untagged responses by kind and counts a STORE's as FETCH responses:
        the STORE here takes none (``.SILENT``), so an unsolicited FETCH (flags another client
        changed, or a server that answers a ``.SILENT`` STORE anyway) goes to the command beside
        it."""
        protocol = self._imap.protocol
        return aioimaplib.Command(
            "STORE",
            protocol.new_tag(),
            uid_set(uids),
            "+FLAGS.SILENT",
            f"({flags})",
            prefix="UID",
            untagged_resp_name="STORE",
            loop=protocol.loop,
        )

    async def store_and_fetch(
        self, uids: Iterable[int], flags: str, fetch: Iterable[int], items: str, *, limits: Limits
    ) -> tuple[ImapError | None, list[FetchedMessage] | ImapError]:
        """``UID STORE uids +FLAGS.SILENT (flags)`` and ``UID FETCH fetch (items)``, pipelined
        (RFC 3501 §5.5: the two name different messages): one round trip where a settlement
        and the next FETCH window took two (issue 23). The STORE's refusal (None: OK), and what
        the FETCH brought or its refusal: each answer stands on its own.

        An unsolicited FETCH meanwhile (``_silent_store``) goes to the FETCH, which passes over
        what holds no body (``parse_fetch``)."""
        protocol = self._imap.protocol
        store = self._silent_store(uids, flags)
        command = _FetchCommand(
            protocol.new_tag(),
            uid_set(fetch),
            f"({items})",
            prefix="UID",
            loop=protocol.loop,
            timeout=self.timeout_s,
        )
        stored, fetched = await self._pipeline(
            "UID STORE + UID FETCH", [store, command], timeout_s=self.timeout_s * 10, limits=limits
        )
        refused = None
        if stored.result != "OK":
            refused = ImapError(f"UID STORE failed: {stored.result} {response_text(stored)}")
        if fetched.result != "OK":
            failed = ImapError(f"UID FETCH failed: {fetched.result} {response_text(fetched)}")
            return refused, failed
        return refused, parse_fetch(fetched.lines, malformed=self._malformed_item)

    async def store_then_idle(self, uids: Iterable[int], flags: str) -> ImapError | None:
        """``UID STORE uids +FLAGS.SILENT (flags)`` and IDLE, pipelined: where a burst's
        settlement is all there is to do before idling, one write and one round trip where
        there were two (issue 23). The STORE's refusal, or None. The IDLE is left open for the
        next ``idle()`` to wait in; a server that refuses it gets the next one the usual way.

        The IDLE is aioimaplib's pending sync command from the start (``_Protocol`` sends the
        STORE's tagged answer to the STORE, and untagged lines meanwhile go where an IDLE's
        go); everything up to the current message count was swept, as ``idle()`` requires."""
        protocol = self._imap.protocol
        if self._idling is not None:
            await self._end_idle()
        store = self._silent_store(uids, flags)
        idle = aioimaplib.IdleCommand(protocol.new_tag(), protocol.idle_queue, loop=protocol.loop)
        started: asyncio.Future[Any] = asyncio.ensure_future(idle.wait())  # the IDLE's life
        pending: dict[str, Any] = protocol.pending_async_commands

        async def run() -> Any:
            if pending.get("STORE") is not None or protocol.pending_sync_command is not None:
                raise RuntimeError("store_then_idle: a command is pending already")
            pending["STORE"] = store
            protocol.pending_sync_command = idle
            protocol.idle_acknowledged.clear()
            self._idle_base = self.exists
            protocol.transport.write(f"{store!r}\r\n{idle!r}\r\n".encode())
            protocol.ack_quickly()
            try:
                await store.wait()
            finally:
                if pending.get("STORE") is store:
                    del pending["STORE"]
            # "+ idling", or refused
            await wait_any((protocol.idle_acknowledged,), futures=(started,))
            return store.response

        try:
            stored = await self._run("UID STORE + IDLE", run(), check=False)
        except BaseException:
            started.cancel()
            raise
        if protocol.pending_sync_command is idle and not started.done():
            self._idling = self._idle_ahead = started
        else:
            started.cancel()
            log.info("%s: the server refused IDLE after UID STORE: %s", self.id, idle.response)
        if stored.result != "OK":
            return ImapError(f"UID STORE failed: {stored.result} {response_text(stored)}")
        return None

    async def expunge(self, uids: Iterable[int]) -> None:
        """``UID EXPUNGE`` (RFC 4315) when the server has UIDPLUS, else plain EXPUNGE."""
        client = self._imap
        if "UIDPLUS" in self.capabilities:
            await self._run("UID EXPUNGE", client.uid("expunge", uid_set(uids)))
        else:
            await self._run("EXPUNGE", client.expunge())

    async def resolve(self, folder: str) -> str:
        """The server's name for the configured ``folder`` (``Hierarchy.resolve``: ``Failed``
        is ``INBOX.Failed`` on Cyrus and Courier), from NAMESPACE (RFC 2342), else from
        ``LIST "" ""``, asked once per connection."""
        if folder.upper() == "INBOX":
            return "INBOX"
        if self._hierarchy is None:
            self._hierarchy = await self._ask_hierarchy()
        return self._hierarchy.resolve(folder)

    async def named(self, folder: str) -> str:
        """``folder`` as a message names it: ``'Failed' (INBOX.Failed on this server)``."""
        where = await self.resolve(folder)
        return repr(folder) if where == folder else f"{folder!r} ({where} on this server)"

    async def _ask_hierarchy(self) -> Hierarchy:
        client = self._imap
        protocol = client.protocol
        if "NAMESPACE" in self.capabilities:
            response = await self._run("NAMESPACE", protocol.namespace(), check=False)
            for line in response.lines[:-1]:
                if isinstance(line, bytes) and (found := parse_namespace(line)) is not None:
                    return found
        # RFC 3501 §6.3.8: LIST "" "" answers with the hierarchy delimiter.
        response = await self._run("LIST", client.list('""', '""'), check=False)
        for line in response.lines[:-1]:
            if isinstance(line, bytes):
                listed, delimiter = parse_list_delimiter(line)
                if listed:
                    return Hierarchy(delimiter=delimiter)
        log.info("%s: the server told no hierarchy delimiter; folder names as written", self.id)
        return Hierarchy(delimiter=None)

    async def create(self, folder: str) -> None:
        """CREATE ``folder``; an existing folder is fine."""
        client = self._imap
        name = mailbox_name(await self.resolve(folder))
        response = await self._run("CREATE", client.create(name), check=False)
        if response.result != "OK" and b"ALREADYEXISTS" not in b" ".join(
            line for line in response.lines if isinstance(line, bytes)
        ):
            raise ImapError(f"cannot create folder {folder!r}: {response_text(response)}")

    async def folder_exists(self, folder: str) -> bool:
        """Whether ``folder`` exists and can hold messages (LIST, RFC 3501 §6.3.8)."""
        client = self._imap
        name = mailbox_name(await self.resolve(folder))
        response = await self._run("LIST", client.list('""', name))
        for line in response.lines[:-1]:  # aioimaplib strips "* LIST"; the last is the tagged one
            if isinstance(line, bytes) and (match := _LIST_FLAGS.match(line)):
                flags = match.group(1).lower()
                if b"\\noselect" not in flags and b"\\nonexistent" not in flags:
                    return True
        return False

    async def move(self, uids: Iterable[int], folder: str, *, expunge: bool) -> None:
        """Move to ``folder`` (created when missing): UID MOVE (RFC 6851), else COPY + delete.

        Without MOVE the originals are flagged ``\\Seen \\Deleted``, then expunged by UID when
        the server has UIDPLUS, or by plain EXPUNGE only when ``expunge`` allows it (a plain
        EXPUNGE also removes other clients' deleted messages).
        """
        client = self._imap
        uids = list(uids)
        target = mailbox_name(await self.resolve(folder))
        verb = "move" if "MOVE" in self.capabilities else "copy"
        retry = Retry(ONCE_MORE)  # RFC 3501 §6.4.7: TRYCREATE, the folder is created first
        while True:
            retry.begin()
            response = await self._run(
                f"UID {verb.upper()}", client.uid(verb, uid_set(uids), target), check=False
            )
            if response.result == "OK":
                break
            trycreate = b"TRYCREATE" in b" ".join(
                line for line in response.lines if isinstance(line, bytes)
            )
            if trycreate and retry.delay() is not None:
                await self.create(folder)
                continue
            raise ImapError(f"UID {verb.upper()} to {folder!r} failed: {response_text(response)}")
        if verb == "copy":
            await self.store(uids, "\\Seen \\Deleted")
            if expunge or "UIDPLUS" in self.capabilities:
                await self.expunge(uids)

    async def idle(
        self, wake: Iterable[asyncio.Event], timeout_s: float, *, new_mail: bool = True
    ) -> bool:
        """IDLE (RFC 2177) until new mail (unless ``new_mail`` is False: it is still noted in
        ``self.new_mail``), any of ``wake``, or ``timeout_s``.

        Returns True when ``timeout_s`` ran out with nothing happening. The IDLE is left open:
        the next command ends it with DONE, pipelined when it is a sweep (one round trip
        saved), or waiting for the server's answer to DONE otherwise.
        """
        client = self._imap
        if new_mail:
            wake = (*wake, self.new_mail)
        ahead, self._idle_ahead = self._idle_ahead, None
        if self._idling is not None and self._idling is not ahead:
            await self._end_idle()
            if new_mail and self.new_mail.is_set():  # announced during the DONE: sweep first
                return False
        if "IDLE" not in self.capabilities:
            # Without IDLE the periodic sweep is all there is: wait out the interval.
            timed_out = await self._wait_any(wake, timeout_s)
            self._raise_if_lost("waiting")
            return timed_out
        if self._idling is None:
            # Everything up to here was swept (new mail is checked for before idling, with no
            # await in between): what lies beyond is what a push announces.
            self._idle_base = self.exists
            # idle_start() can hang when the server answers BYE (aioimaplib#110): bound it.
            self._idling = await self._run(
                "IDLE", client.idle_start(timeout=timeout_s + 60), check=False
            )
        timed_out = await self._wait_any(wake, timeout_s)
        self._raise_if_lost("IDLE")
        return timed_out

    async def end_idle(self) -> None:
        """DONE, when an IDLE is open (``idle`` leaves it so)."""
        if self._idling is not None:
            await self._end_idle()

    async def _end_idle(self) -> None:
        """DONE, and wait for the server to end the IDLE (when one is open)."""
        client = self._imap
        idle, self._idling = self._idling, None
        if idle is None:
            return
        client.idle_done()
        await self._run("DONE", idle)
        self._drain_idle_queue()

    def _drain_idle_queue(self) -> None:
        client = self._imap
        queue: asyncio.Queue[Any] = client.protocol.idle_queue
        while not queue.empty():  # the pushes were seen by _on_untagged already
            queue.get_nowait()

    def _raise_if_lost(self, what: str) -> None:
        if self.lost.is_set():
            raise ImapConnectionLost(f"{what}: connection lost{self._loss_detail()}")

    def _loss_detail(self) -> str:
        """Why the connection ended, as far as known: the server's BYE, or the bound it broke."""
        if self.violation is not None:
            return f" ({self.violation})"
        return f" ({self.bye})" if self.bye else ""

    @property
    def violation(self) -> ImapLimitError | None:
        """The bound the server broke, when that is what ended the connection."""
        return self._client.protocol.violation if self._client is not None else None

    async def _wait_any(self, wake: Iterable[asyncio.Event], timeout_s: float) -> bool:
        """Wait for any of ``wake`` or a loss; True when ``timeout_s`` ran out."""
        return await wait_any((*wake, self.lost), timeout_s=timeout_s)
