"""Pure LMTP: replies and their enhanced codes, what a delivery prepends, its webhook-id; and a
bounded hypothesis fuzz of the command stream against a real listener."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailroom.config import LmtpMailboxConfig
from mailroom.envelope import Outcome
from mailroom.kinds import KINDS
from mailroom.runtime import supervisor
from mailroom.sources import lmtp_wire as wire
from tests.lmtp import address, lmtp_config
from tests.servers.dovecot import free_port
from tests.servers.webhook import WebhookReceiver


@pytest.mark.parametrize(
    ("line", "enhanced"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ('500 Error: command "X" not recognized', '500 5.5.2 Error: command "X" not recognized'),
        ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
        ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
        ("552 Error: too big", "552 5.3.4 Error: too big"),
        ("553 5.1.3 Error: malformed address", "553 5.1.3 Error: malformed address"),
        ("421 4.7.0 MAIL sent too many times", "421 4.7.0 MAIL sent too many times"),
        ("599 odd", "599 5.0.0 odd"),
        ("220 mx.example.com mailroom LMTP", "220 mx.example.com mailroom LMTP"),  # greeting
        ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
        ("250-PIPELINING", "250-PIPELINING"),  # LHLO's lines
        ("", ""),
        ("25", "25"),
    ],
)
def test_enhance_adds_the_code_rfc_3463_gives(line: str, enhanced: str) -> None:
    assert wire.enhance(line) == enhanced


def test_outcome_replies() -> None:
    wid = "msg_" + "0" * 32
    assert wire.outcome_reply(Outcome.DELIVERED, "", wid) == f"250 2.0.0 {wid} delivered"
    assert wire.outcome_reply(Outcome.IGNORED, "precedence", wid) == (
        f"250 2.0.0 {wid} auto-generated (precedence); not posted"
    )
    assert wire.outcome_reply(Outcome.REJECTED, "no such\r\nproject \x00é", wid) == (
        "550 5.7.1 no such?project ?"
    )
    assert wire.outcome_reply(Outcome.DEAD_LETTERED, "", wid) == "554 5.3.0 refused for good"
    long = wire.outcome_reply(Outcome.REJECTED, "x" * 10_000, wid)
    assert len(long) <= 510 and long.endswith("...")


@given(st.text(max_size=5000))
def test_printable_is_one_bounded_line_of_printable_ascii(text: str) -> None:
    line = wire.printable(text)
    assert len(line) <= wire.REASON_MAX_CHARS
    assert all(0x20 <= ord(c) <= 0x7E for c in line)


def test_the_webhook_id_is_stable_per_message_and_recipient() -> None:
    def identity(template: str) -> str:
        (mailbox,) = lmtp_config(
            "http://127.0.0.1:1/", "127.0.0.1:2424", address=template
        ).mailboxes
        assert isinstance(mailbox, LmtpMailboxConfig)
        return mailbox.identity

    listener = identity("Incoming+%{key}@Example.com")
    assert listener == identity("incoming+%{key}@example.com")
    assert (
        listener
        == hashlib.sha256(b"mailroom-mailbox\0lmtp\0incoming+%{key}@example.com").hexdigest()
    )
    one = wire.webhook_id(listener, "ab" * 32, "incoming+a@example.com")
    assert one == wire.webhook_id(listener, "ab" * 32, "incoming+a@example.com")
    assert one.startswith("msg_") and len(one) == 36
    others = {
        wire.webhook_id(listener, "ab" * 32, "incoming+b@example.com"),
        wire.webhook_id(listener, "cd" * 32, "incoming+a@example.com"),
        wire.webhook_id(identity("other+%{key}@example.com"), "ab" * 32, "a"),
    }
    assert one not in others and len(others) == 3


def test_the_delivery_header_and_the_addresses_it_takes() -> None:
    assert wire.delivery_header("<>", "in+k@example.com") == (
        b"Return-Path: <>\r\nDelivered-To: in+k@example.com\r\n"
    )
    assert wire.delivery_header("s@example.org", "in+k\u00e9@example.com") == (
        "Return-Path: <s@example.org>\r\nDelivered-To: in+k\u00e9@example.com\r\n".encode()
    )
    assert wire.usable_address('"a b"@example.com')
    assert not wire.usable_address("a\rb@example.com")
    assert not wire.usable_address("a@" + "x" * 400)


# -- the fuzz: strangers' command streams against a real listener ----------------------------

COMMANDS = [
    b"LHLO fuzz.example.org",
    b"MAIL FROM:<s@example.org>",
    b"MAIL FROM:<> SIZE=100 BODY=8BITMIME SMTPUTF8",
    b"MAIL FROM:<s@example.org> SIZE=99999999999999999999",
    b"MAIL FROM:<s\r@example.org>",
    b"MAIL FROM:<<<<<<<<<<<<<<<<<<<<@>>>>",
    address("fuzz").join([b"RCPT TO:<".decode(), ">"]).encode(),
    b"RCPT TO:<stranger@example.com>",
    b"RCPT TO:<@a,@b:x@y> NOTIFY=NEVER",
    b"DATA",
    b".",
    b"..leading dot",
    b"RSET",
    b"NOOP",
    b"VRFY postmaster",
    b"HELP",
    b"STARTTLS",
    b"AUTH PLAIN AGFhAGI=",
    b"EHLO x",
    b"HELO x",
    b"QUIT",
]
LINES = st.one_of(
    st.sampled_from(COMMANDS),
    st.binary(max_size=200),
    st.builds(lambda n, c: c * n, st.integers(0, 70_000), st.sampled_from([b"A", b".", b"<"])),
)
# A whole transaction, its message made of fuzzed lines (dots, long lines, bare CR and LF).
TRANSACTIONS = st.builds(
    lambda rcpts, body: (
        b"MAIL FROM:<s@example.org>\r\n"
        + b"".join(f"RCPT TO:<{address(f'f{i}')}>\r\n".encode() for i in range(rcpts))
        + b"DATA\r\nSubject: fuzz\r\n\r\n"
        + b"\r\n".join(body)
        + b"\r\n.\r\n"
    ),
    st.integers(1, 4),
    st.lists(
        st.one_of(st.binary(max_size=100), st.sampled_from([b".", b"..", b". x"])), max_size=8
    ),
)
STREAMS = st.tuples(
    st.sampled_from([b"LHLO fuzz.example.org\r\n", b""]),
    st.lists(
        st.one_of(
            st.tuples(LINES, st.sampled_from([b"\r\n", b"\n", b"\r", b""])),
            st.tuples(TRANSACTIONS, st.just(b"")),
        ),
        min_size=1,
        max_size=30,
    ),
)


class Background:
    """mailroom (one listener) and a webhook receiver on an event loop in a thread of their own,
    so the fuzz's blocking sockets can talk to them; ERROR records are collected."""

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.stop: asyncio.Event | None = None
        self.errors: list[str] = []
        self.posted = 0  # messages the fuzz got through to the webhook
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.main(),))

    async def main(self) -> None:
        self.stop = asyncio.Event()
        async with WebhookReceiver() as webhook:
            config = lmtp_config(
                webhook.url,
                f"127.0.0.1:{self.port}",
                max_message_bytes=4096,
                max_recipients=3,
                idle_timeout=3,
                reply_within=2,
            )
            task = asyncio.create_task(supervisor.run(config, self.stop, kinds=KINDS))
            self.ready.set()
            await task
            self.posted = len(webhook.requests)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors.append(record.getMessage())


@pytest.fixture(scope="module")
def background() -> Iterator[Background]:
    server = Background()
    handler = logging.Handler()
    handler.emit = server.emit  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("mailroom", "mail.log", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    server.thread.start()
    server.ready.wait(30)
    try:
        _serves(server.port, timeout=30)
        yield server
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        if server.stop is not None:
            server.loop.call_soon_threadsafe(server.stop.set)
        server.thread.join(60)
        server.loop.close()
    assert server.posted > 0  # the fuzz reached deliveries, not only the command parser


def _serves(port: int, *, timeout: float) -> float:
    """A fresh session gets its greeting and LHLO's reply: how long that took (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                reader = sock.makefile("rb")
                greeting = reader.readline(1024)
                sock.sendall(b"LHLO probe\r\n")
                lines = [reader.readline(1024) for _ in range(6)]
                sock.sendall(b"QUIT\r\n")
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        assert greeting.startswith(b"220 ") and lines[-1] == b"250 SMTPUTF8\r\n"
        return time.monotonic() - started


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(stream=STREAMS)
def test_fuzzed_command_streams_crash_nothing_and_hang_nothing(
    background: Background, stream: tuple[bytes, list[tuple[bytes, bytes]]]
) -> None:
    greeting, lines = stream
    data = greeting + b"".join(line + end for line, end in lines)
    with socket.create_connection(("127.0.0.1", background.port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may close first (QUIT, 5 bad commands)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        received = 0
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):  # until it closes: bounded by idle_timeout
                received += len(chunk)
                assert received < 10 * 1024 * 1024
    assert _serves(background.port, timeout=10) < 10  # the loop answers others meanwhile
    assert background.errors == []
