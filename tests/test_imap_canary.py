"""A canary for aioimaplib's internals (issue 19).

mailroom/sources/imap_session.py is written against aioimaplib 2.0.3 and uses more of it than
its documented API: private methods it overrides or calls, attributes only its source shows,
and behaviours no document promises. Each is named below with what the adapter needs it for,
and checked; when an aioimaplib release moves or changes one, its entry fails with a message
that points at the adapter. A new reliance gets an entry here
(``test_every_private_name_the_adapter_uses_is_named``).

The checks speak IMAP over loopback to a scripted peer (the server's side of each exchange is
written out here), so that each behaviour is pinned exactly; the integration tests run the same
adapter against Dovecot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import inspect
import logging
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aioimaplib import aioimaplib

from mailroom.config import ImapMailboxConfig, parse_config
from mailroom.errors import ImapAuthError, ImapConnectionLost
from mailroom.sources import imap_session
from mailroom.sources.imap_session import ImapSession
from mailroom.sources.imap_wire import FetchedMessage, Limits
from tests.helpers import ROOT, wait_until

VERSION = importlib.metadata.version("aioimaplib")
ADAPTER = Path(imap_session.__file__)
CAPABILITIES = "IMAP4rev1 IDLE UIDPLUS MOVE SEARCHRES"
WAIT_S = 5.0

Check = Callable[[], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class Internal:
    name: str  # what aioimaplib has
    use: str  # what imap_session.py needs it for
    check: Check


INTERNALS: list[Internal] = []


def relies_on(name: str, use: str) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        INTERNALS.append(Internal(name, use, check))
        return check

    return register


# -- a scripted IMAP server on loopback ------------------------------------------------------


class Peer:
    """The server's end of one connection: reads the client's lines, writes the answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def line(self) -> str:
        async with asyncio.timeout(WAIT_S):
            return (await self.reader.readline()).decode().removesuffix("\r\n")

    async def expect(self, command: str) -> str:
        """The tag of the next command, which must be ``command`` (all after the tag)."""
        tag, _, rest = (await self.line()).partition(" ")
        assert rest == command, f"the client sent {rest!r}, not {command!r}"
        return tag

    def send(self, *lines: str | bytes) -> None:
        for line in lines:
            self.writer.write((line.encode() if isinstance(line, str) else line) + b"\r\n")


def mailbox(port: int, **overrides: Any) -> ImapMailboxConfig:
    box = {
        "address": "in+%{key}@example.com",
        "host": "127.0.0.1",
        "port": port,
        "user": "u@example.com",
        "password": "pw",
    }
    (config,) = parse_config(
        {"mailboxes": [box], "webhook": {"url": "http://127.0.0.1:9/"}}, env={}
    ).mailboxes
    assert isinstance(config, ImapMailboxConfig)
    return dataclasses.replace(config, **overrides)


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[int, asyncio.Queue[Peer]]]:
    peers: asyncio.Queue[Peer] = asyncio.Queue()
    server = await asyncio.start_server(lambda r, w: peers.put_nowait(Peer(r, w)), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], peers
    finally:
        server.close()
        while not peers.empty():
            peers.get_nowait().writer.close()


async def greet(peer: Peer, capabilities: str = CAPABILITIES) -> None:
    """The greeting and the CAPABILITY aioimaplib asks for after it."""
    peer.send("* OK ready")
    tag = await peer.expect("CAPABILITY")
    peer.send(f"* CAPABILITY {capabilities}", f"{tag} OK done")


async def log_in(peer: Peer, capabilities: str = CAPABILITIES) -> None:
    tag = await peer.expect('LOGIN "u@example.com" "pw"')  # both quoted (login_segments)
    peer.send(f"{tag} OK logged in")
    tag = await peer.expect("CAPABILITY")
    peer.send(f"* CAPABILITY {capabilities}", f"{tag} OK done")


@contextlib.asynccontextmanager
async def session(capabilities: str = CAPABILITIES) -> AsyncIterator[tuple[ImapSession, Peer]]:
    """An ``ImapSession`` logged in, with INBOX (3 messages) selected, and its peer."""
    async with serving() as (port, peers):
        opening = asyncio.create_task(ImapSession.open(mailbox(port), timeout_s=WAIT_S))
        async with asyncio.timeout(WAIT_S):
            peer = await peers.get()
        await greet(peer, capabilities)
        await log_in(peer, capabilities)
        tag = await peer.expect("SELECT INBOX")
        peer.send("* 3 EXISTS", "* OK [UIDVALIDITY 7] UIDs valid", f"{tag} OK [READ-WRITE] done")
        opened = await opening
        opened.new_mail.clear()  # the 3 messages are swept, as the watcher does first
        try:
            yield opened, peer
        finally:
            opened.abort()
            peer.writer.close()


async def searched(
    opened: ImapSession, peer: Peer, criteria: str, *untagged: str, idle: str | None = None
) -> list[int]:
    """``opened.search(criteria)``, the peer answering ``untagged`` lines and OK; first the
    DONE that ends the open IDLE tagged ``idle``, if any."""
    searching = asyncio.create_task(opened.search(criteria))
    if idle is not None:
        assert await peer.line() == "DONE"
        peer.send(f"{idle} OK idle done")
    tag = await peer.expect(f"UID SEARCH {criteria}")
    peer.send(*untagged, f"{tag} OK searched")
    return await searching


async def pushed_during_idle(opened: ImapSession, peer: Peer) -> str:
    """An IDLE that a pushed EXISTS wakes (it stays open); its tag."""
    idling = asyncio.create_task(opened.idle([], 30))
    tag = await peer.expect("IDLE")
    peer.send("+ idling", "* 4 EXISTS")
    assert await idling is False  # woken by the new mail, not timed out
    return tag


def fingerprint(function: Any) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def client(opened: ImapSession) -> Any:
    """The aioimaplib client under the session (the canary looks inside, the adapter may)."""
    return opened._client


# -- private names -----------------------------------------------------------------------------


@relies_on(
    "IMAP4ClientProtocol._handle_line(line, current_cmd)",
    "_Protocol._line hands it each line imap_wire.Framer splits off, with the command a "
    "response continues, as aioimaplib's _handle_responses would (without its recursion); "
    "it returns the command the line went to",
)
async def handle_line() -> None:
    protocol = aioimaplib.IMAP4ClientProtocol(asyncio.get_running_loop())
    assert parameters(protocol._handle_line) == ["line", "current_cmd"]


@relies_on(
    "IMAP4ClientProtocol._untagged_response(line)",
    "_Protocol overrides it to see every untagged line (EXISTS, EXPUNGE, FETCH FLAGS, BYE): "
    "aioimaplib passes each through it, also while a command of another kind runs, and then "
    "drops those no command asked for; without it mail appended during a STORE waits",
)
async def untagged_response() -> None:
    async with session() as (opened, peer):
        storing = asyncio.create_task(opened.store([1], "\\Seen"))
        tag = await peer.expect("UID STORE 1 +FLAGS.SILENT (\\Seen)")
        peer.send("* 4 EXISTS", "* BYE going away", f"{tag} OK stored")
        await storing
        assert (opened.new_mail.is_set(), opened.exists) == (True, 4)
        assert opened.bye == "BYE going away"


@relies_on(
    "IMAP4ClientProtocol._continuation(line) and pending_sync_command",
    "_Protocol overrides it to answer a failed XOAUTH2's '+ <error>' challenge with an empty "
    "line (RFC 7628 §3.2.3), which aioimaplib does not send; the AUTHENTICATE command is "
    "pending_sync_command, named AUTHENTICATE, meanwhile",
)
async def continuation() -> None:
    async def token() -> str:
        return "t0ken"

    async with serving() as (port, peers):
        config = mailbox(port, auth="xoauth2", password=None)
        opening = asyncio.create_task(ImapSession.open(config, timeout_s=WAIT_S, token=token))
        async with asyncio.timeout(WAIT_S):
            peer = await peers.get()
        await greet(peer, CAPABILITIES + " AUTH=XOAUTH2")
        tag, _, command = (await peer.line()).partition(" ")
        assert command.startswith("AUTHENTICATE XOAUTH2 "), command
        peer.send("+ eyJzdGF0dXMiOiI0MDAifQ==")
        assert await peer.line() == ""  # the empty client response
        peer.send(f"{tag} NO [AUTHENTICATIONFAILED] invalid token")
        with pytest.raises(ImapAuthError, match=r"XOAUTH2 as u@example\.com refused"):
            await opening
        peer.writer.close()


@relies_on(
    "Command._reset_timer()",
    "append_to_resp calls it for every line (a new timer handle each: 258,000 lines cost "
    "seconds); _FetchCommand overrides it to note the progress, and restarts aioimaplib's "
    "timer once per read (touch); the protocol calls it for a literal on its way",
)
async def reset_timer() -> None:
    command = aioimaplib.FetchCommand(
        "A1", "1:*", "(UID)", loop=asyncio.get_running_loop(), timeout=30
    )
    timer = command._timer
    assert parameters(command._reset_timer) == []
    command._reset_timer()
    assert timer.cancelled() and command._timer is not timer
    command._timer.cancel()


@relies_on(
    "IMAP4._client_task",
    "_Client.create_client sets it, as aioimaplib's does: wait_hello_from_server awaits it, "
    "so a refused connection is an error at once, not a greeting timeout",
)
async def client_task() -> None:
    with socket.socket() as bound:  # a port nobody listens on: connecting is refused
        bound.bind(("127.0.0.1", 0))
        config = mailbox(bound.getsockname()[1])
        with pytest.raises(ImapConnectionLost, match=r"cannot connect to 127\.0\.0\.1"):
            await ImapSession.open(config, timeout_s=WAIT_S)


@relies_on(
    "IMAP4._idle_waiter",
    "idle_start arms this timer to stop waiting for pushes after its timeout; "
    "ImapSession._cancel_idle cancels it when the connection is lost (it would fire later, "
    "on a dead protocol), through _Client.idle_waiter",
)
async def idle_waiter() -> None:
    async with session() as (opened, peer):
        assert client(opened).idle_waiter is None  # no IDLE yet
        idling = asyncio.create_task(opened.idle([], 30))
        await peer.expect("IDLE")
        peer.send("+ idling")
        await wait_until(lambda: client(opened).idle_waiter is not None, what="the IDLE timer")
        waiter = client(opened).idle_waiter
        assert isinstance(waiter, asyncio.TimerHandle) and not waiter.cancelled()
        opened.abort()
        assert waiter.cancelled()
        with pytest.raises(ImapConnectionLost):
            await idling


# -- undocumented attributes and behaviours ------------------------------------------------------


@relies_on(
    "IMAP4ClientProtocol.current_command, state, CONNECTED and tagged_status_response_re",
    "_Protocol replaces data_received (aioimaplib's copies the pending line for every read: "
    "quadratic, issue 18): the command a response continues is kept in current_command, one "
    "greeting is read while the state is CONNECTED (aioimaplib starts a task per line then), "
    "and a tagged line, found by aioimaplib's own pattern, starts the next command's budget",
)
async def data_received() -> None:
    protocol = aioimaplib.IMAP4ClientProtocol(asyncio.get_running_loop())
    assert (protocol.current_command, protocol.state) == (None, aioimaplib.STARTED)
    protocol.connection_made(None)
    assert protocol.state == aioimaplib.CONNECTED
    assert aioimaplib.tagged_status_response_re.match(b"A1 OK done")
    assert not aioimaplib.tagged_status_response_re.match(b"* OK still here")


@relies_on(
    "IMAP4.create_client(host, port, loop, conn_lost_cb, ssl_context) and IMAP4.protocol",
    "_Client overrides it (aioimaplib's own body, fingerprinted here, with _Protocol); "
    "IMAP4.__init__ must call it, and the client then speaks through self.protocol",
)
async def create_client() -> None:
    assert fingerprint(aioimaplib.IMAP4.create_client) == "4c6284d94662f228"
    assert parameters(aioimaplib.IMAP4.create_client)[1:] == [
        "host", "port", "loop", "conn_lost_cb", "ssl_context"
    ]  # fmt: skip
    async with session() as (opened, _):
        assert type(client(opened).protocol).__name__ == "_Protocol"


@relies_on(
    "FetchCommand.wait_data, FETCH_MESSAGE_DATA_RE and append_to_resp(line, result)",
    "_FetchCommand replaces wait_data (does the FETCH response go on after this line?; "
    "aioimaplib's is fingerprinted here) with a count kept as the lines come; the protocol "
    "asks it after each line, and a message's literal arrives as a bytearray between the "
    "FETCH line and ')'",
)
async def fetch_command() -> None:
    assert fingerprint(aioimaplib.FetchCommand.wait_data) == "17ec7328fd9b7bba"
    assert aioimaplib.FetchCommand.FETCH_MESSAGE_DATA_RE.match(b"1 FETCH (UID 5")
    async with session() as (opened, peer):
        fetching = asyncio.create_task(opened.fetch([5], "UID RFC822.SIZE BODY.PEEK[]"))
        tag = await peer.expect("UID FETCH 5 (UID RFC822.SIZE BODY.PEEK[])")
        peer.writer.write(b"* 1 FETCH (UID 5 RFC822.SIZE 11 BODY[] {11}\r\nhello")
        await peer.writer.drain()
        peer.send(b" world)", f"{tag} OK fetched")
        assert await fetching == [FetchedMessage(5, 11, b"hello world")]


@relies_on(
    "IMAP4ClientProtocol.pending_async_commands, Command.untagged_resp_name, Command.wait(), "
    "Command.response and repr(Command)",
    "_pipeline sends SEARCH RETURN (SAVE) and UID FETCH $ back to back: it registers both in "
    "pending_async_commands under their untagged_resp_name and writes repr(command), which "
    "is the command line; aioimaplib routes untagged lines by name, tagged ones by tag",
)
async def pipeline() -> None:
    loop = asyncio.get_running_loop()
    search = aioimaplib.Command(
        "SEARCH", "A1", "RETURN", "(SAVE)", "UNSEEN", prefix="UID", loop=loop
    )
    assert (repr(search), search.untagged_resp_name) == (
        "A1 UID SEARCH RETURN (SAVE) UNSEEN",
        "SEARCH",
    )
    async with session() as (opened, peer):
        sizing = asyncio.create_task(opened.search_sizes("UNSEEN"))
        searched = await peer.expect("UID SEARCH RETURN (SAVE) UNSEEN")
        fetched = await peer.expect("UID FETCH $ (UID RFC822.SIZE INTERNALDATE)")
        peer.send(f"{searched} OK searched", "* 1 FETCH (UID 7 RFC822.SIZE 100)")
        peer.send(f"{fetched} OK fetched")
        assert await sizing == [FetchedMessage(7, 100, None)]
        assert client(opened).protocol.pending_async_commands == {}


@relies_on(
    "Command(untagged_resp_name=...)",
    "store_and_fetch pipelines UID STORE and UID FETCH: aioimaplib files a UID STORE's "
    "untagged lines under FETCH, so the STORE is registered under a name of its own and an "
    "unsolicited FETCH (flags) goes to the FETCH, which passes over what holds no body",
)
async def store_and_fetch() -> None:
    async with session() as (opened, peer):
        both = asyncio.create_task(
            opened.store_and_fetch(
                [3], "\\Seen", [5], "UID RFC822.SIZE BODY.PEEK[]", limits=Limits()
            )
        )
        stored = await peer.expect("UID STORE 3 +FLAGS.SILENT (\\Seen)")
        fetched = await peer.expect("UID FETCH 5 (UID RFC822.SIZE BODY.PEEK[])")
        peer.send("* 2 FETCH (UID 3 FLAGS (\\Seen))", f"{stored} NO [SERVERBUG] not now")
        peer.writer.write(b"* 3 FETCH (UID 5 RFC822.SIZE 5 BODY[] {5}\r\nhello")
        await peer.writer.drain()
        peer.send(")", f"{fetched} OK fetched")
        refused, found = await both
        assert "UID STORE failed: NO" in str(refused)
        assert found == [FetchedMessage(5, 5, b"hello")]
        assert client(opened).protocol.pending_async_commands == {}


@relies_on(
    "IMAP4ClientProtocol._response_done(line) and IMAP4ClientProtocol._idle_event",
    "store_then_idle writes UID STORE and IDLE at once, the IDLE aioimaplib's pending sync "
    "command from the start: _Protocol._response_done sends the STORE's tagged answer to the "
    "STORE by its tag (aioimaplib's would take it for the IDLE's), and the server's "
    "continuation sets _idle_event (idle_acknowledged), as for idle_start's IDLE",
)
async def store_then_idle() -> None:
    async with session() as (opened, peer):
        both = asyncio.create_task(opened.store_then_idle([3], "\\Seen"))
        stored = await peer.expect("UID STORE 3 +FLAGS.SILENT (\\Seen)")
        idle = await peer.expect("IDLE")
        peer.send("* 2 FETCH (UID 3 FLAGS (\\Seen))", f"{stored} NO [SERVERBUG] not now")
        peer.send("+ idling")
        assert "UID STORE failed: NO" in str(await both)
        waiting = asyncio.create_task(opened.idle([], 30))  # the IDLE open already: no other
        peer.send("* 4 EXISTS")
        assert await waiting is False
        assert client(opened).protocol.pending_async_commands == {}
        ending = asyncio.create_task(opened.end_idle())
        assert await peer.line() == "DONE"
        peer.send(f"{idle} OK idle done")
        await ending
        assert client(opened).protocol.pending_sync_command is None


@relies_on(
    "IMAP4.idle_start(timeout) and IMAP4.idle_done()",
    "ImapSession.idle leaves the IDLE open: idle_start returns the IDLE command's future, "
    "the next command calls idle_done (which writes DONE) and awaits that future",
)
async def idle_start() -> None:
    assert parameters(aioimaplib.IMAP4.idle_start) == ["self", "timeout"]
    async with session() as (opened, peer):
        idle = await pushed_during_idle(opened, peer)
        assert await searched(opened, peer, "UNSEEN", idle=idle) == []


@relies_on(
    "IMAP4ClientProtocol.idle_queue, pending_sync_command and IdleCommand.buffer",
    "aioimaplib keeps every push of an IDLE in the IDLE command's buffer, then its queue, for "
    "wait_server_push, which mailroom does not use (_untagged_response saw them): 38 s of "
    "'* OK still here' took 700 MB; _Protocol empties the buffer after each read (issue 18), "
    "and _drain_idle_queue empties the queue of idle_start's stop marker after each IDLE",
)
async def idle_queue() -> None:
    async with session() as (opened, peer):
        queue = client(opened).protocol.idle_queue
        idle = await pushed_during_idle(opened, peer)
        command = client(opened).protocol.pending_sync_command
        assert isinstance(command, aioimaplib.IdleCommand) and command.buffer == []
        assert queue.empty()
        await searched(opened, peer, "UNSEEN", idle=idle)
        assert queue.empty()


@relies_on(
    "IMAP4ClientProtocol.search(*criteria, charset=None, by_uid=True)",
    "sends no CHARSET (Exchange and Yahoo reject CHARSET utf-8, aioimaplib#126); the "
    "untagged '* SEARCH' comes back stripped, the tagged status line last",
)
async def search() -> None:
    async with session() as (opened, peer):
        assert await searched(opened, peer, "UNSEEN", "* SEARCH 3 1 2") == [1, 2, 3]


@relies_on(
    "IMAP4ClientProtocol.state and aioimaplib.SELECTED",
    "aioimaplib's examine() leaves the state at AUTH, where it refuses every command on a "
    "mailbox; select(readonly=True) sets SELECTED itself",
)
async def examine_state() -> None:
    async with session() as (opened, peer):
        selecting = asyncio.create_task(opened.select(readonly=True))
        tag = await peer.expect("EXAMINE INBOX")
        peer.send("* OK [UIDVALIDITY 7] UIDs valid", f"{tag} OK [READ-ONLY] done")
        await selecting
        assert client(opened).protocol.state == aioimaplib.SELECTED
        assert await searched(opened, peer, "ALL") == []


@relies_on(
    "IMAP4ClientProtocol.capabilities",
    "login() reads LOGINDISABLED there and ImapSession.capabilities is copied from it after "
    "the CAPABILITY asked for again after login: a set of the advertised words",
)
async def capabilities() -> None:
    async with session(CAPABILITIES + " X-EXTRA") as (opened, _):
        assert client(opened).protocol.capabilities == {*CAPABILITIES.split(), "X-EXTRA"}
        assert opened.capabilities == {*CAPABILITIES.upper().split(), "X-EXTRA"}


class Recording:
    """A transport that records what is written through it and passes everything on."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.written = inner, bytearray()

    def write(self, data: bytes) -> None:
        self.written += data
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@relies_on(
    "IMAP4ClientProtocol.transport",
    "STARTTLS replaces it with the TLS transport loop.start_tls returns (aioimaplib has no "
    "STARTTLS): every later command must be written through the attribute",
)
async def transport() -> None:
    async with session() as (opened, peer):
        protocol = client(opened).protocol
        recording = protocol.transport = Recording(protocol.transport)
        await searched(opened, peer, "ALL")
        assert recording.written.endswith(b" UID SEARCH ALL\r\n")


@relies_on(
    "IMAP4(conn_lost_cb=...)",
    "ImapSession learns of a dropped connection from it at once, also during IDLE "
    "(wait_server_push does not wake when the socket drops)",
)
async def conn_lost_cb() -> None:
    async with session() as (opened, peer):
        peer.writer.close()
        async with asyncio.timeout(WAIT_S):
            await opened.lost.wait()


@relies_on(
    "aioimaplib.AioImapException",
    "the base of aioimaplib's own errors (Abort, CommandTimeout, IncompleteRead): _run and "
    "logout turn it into ImapConnectionLost",
)
async def exceptions() -> None:
    for error in (aioimaplib.Abort, aioimaplib.CommandTimeout, aioimaplib.IncompleteRead):
        assert issubclass(error, aioimaplib.AioImapException), error


@relies_on(
    "aioimaplib's logger under 'aioimaplib'",
    "its DEBUG lines hold whole messages and credentials: imap_session pins the 'aioimaplib' "
    "logger to WARNING, which aioimaplib's own logger must inherit",
)
async def logger() -> None:
    assert aioimaplib.log.name.startswith("aioimaplib.")
    assert aioimaplib.log.getEffectiveLevel() >= logging.WARNING


# -- the canary ---------------------------------------------------------------------------------


@pytest.mark.parametrize("internal", INTERNALS, ids=lambda internal: internal.name)
async def test_aioimaplib_internal(internal: Internal) -> None:
    try:
        await internal.check()
    except Exception as exc:  # whatever the change broke: the message points at the adapter
        pytest.fail(
            f"aioimaplib {VERSION}: {internal.name} moved or changed ({type(exc).__name__}: "
            f"{exc}). {ADAPTER.relative_to(ROOT)} relies on it: {internal.use}. Port the "
            "adapter (written against aioimaplib 2.0.3), then this entry.",
            pytrace=False,
        )


def test_every_private_name_the_adapter_uses_is_named() -> None:
    """aioimaplib's private names that imap_session.py uses (overrides included) are exactly
    those the canary names."""
    theirs = inspect.getsource(aioimaplib)
    private = set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", theirs))
    private |= set(re.findall(r"def (_[a-z]\w*)", theirs)) | {"_client_task"}  # annotated
    ours = ADAPTER.read_text()
    used = set(re.findall(r"\.(_[a-z]\w*)", ours)) | set(re.findall(r"def (_[a-z]\w*)", ours))
    named = {name for item in INTERNALS for name in re.findall(r"\.(_[a-z]\w*)", item.name)}
    assert used & private == named


def test_a_missing_hook_fails_at_import_naming_the_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    assert imap_session.internals_missing() == []
    monkeypatch.delattr(aioimaplib.IMAP4ClientProtocol, "_untagged_response")
    monkeypatch.delattr(aioimaplib, "tagged_status_response_re")
    missing = imap_session.internals_missing()
    assert missing == ["IMAP4ClientProtocol._untagged_response", "tagged_status_response_re"]
    error = str(imap_session.internals_moved(", ".join(missing)))
    assert error.startswith(f"aioimaplib {VERSION} has no IMAP4ClientProtocol._untagged_response")
    assert "mailroom/sources/imap_session.py" in error


async def test_a_moved_idle_timer_is_an_error_not_a_silent_none() -> None:
    async with session() as (opened, _):
        del client(opened)._idle_waiter
        with pytest.raises(RuntimeError, match=r"has no IMAP4\._idle_waiter, which mailroom"):
            opened.abort()
        client(opened)._idle_waiter = None  # for the cleanup's abort
