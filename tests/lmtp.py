"""LMTP clients and configs for the tests and benchmarks of the listener.

``send`` is the standard library's ``smtplib.LMTP`` reading every per-recipient reply after
DATA (smtplib's ``data()`` reads only the first); it blocks, so tests call it in a thread while
mailroom runs in their event loop. ``Raw`` is an asyncio client that writes exactly the bytes it
is given (pipelining, a stall mid-DATA, idle connections, the fuzz) and reads bounded replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mailroom.config import Config, parse_config
from tests.helpers import config_dict, running, wait_until

ADDRESS = "incoming+%{key}@example.com"
REPLY_TIMEOUT_S = 30.0


def lmtp_box(listen: str, **overrides: Any) -> dict[str, Any]:
    """One LMTP mailbox (a listener) as users write it."""
    box: dict[str, Any] = {
        "id": "mx",
        "inbox_method": "lmtp",
        "listen": listen,
        "address": ADDRESS,
        "hostname": "mx.example.com",
    }
    box.update(overrides)
    return box


def lmtp_config(
    webhook_url: str, listen: str, *, health_port: int | None = None, **box: Any
) -> Config:
    data = config_dict([lmtp_box(listen, **box)], webhook_url)
    if health_port is not None:
        data["health"] = {"listen": f"127.0.0.1:{health_port}"}
    return parse_config(data, env={})


def address(key: str) -> str:
    return ADDRESS.replace("%{key}", key)


@dataclass(frozen=True)
class Sent:
    """One transaction as the client saw it: the RCPT replies, then a reply per accepted
    recipient after DATA (empty when none was accepted)."""

    rcpt: list[tuple[int, str]]
    data: list[tuple[int, str]]


def _text(reply: tuple[int, bytes]) -> tuple[int, str]:
    return reply[0], reply[1].decode("ascii", "replace")


def transaction(
    client: smtplib.LMTP,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    options: Sequence[str] = (),
) -> Sent:
    """One transaction on an open ``smtplib.LMTP`` (after LHLO): every reply, in order."""
    code, text = client.mail(sender, list(options))
    if code != 250:
        raise AssertionError(f"MAIL answered {code} {text!r}")
    rcpt = [_text(client.rcpt(r)) for r in recipients]
    accepted = sum(1 for c, _ in rcpt if c == 250)
    if not accepted:
        client.rset()
        return Sent(rcpt, [])
    data = [_text(client.data(message))]
    data += [_text(client.getreply()) for _ in range(accepted - 1)]
    return Sent(rcpt, data)


def send(
    port: int | str,
    recipients: Sequence[str],
    message: bytes,
    *,
    sender: str = "sender@example.org",
    options: Sequence[str] = (),
) -> Sent:
    """Connect (TCP port on 127.0.0.1, or a unix socket path), LHLO, one transaction, QUIT."""
    client = connect(port)
    try:
        return transaction(client, sender, recipients, message, options)
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()


def connect(port: int | str) -> smtplib.LMTP:
    if isinstance(port, str):  # smtplib.LMTP takes a path starting with / as a unix socket
        client = smtplib.LMTP(port, timeout=REPLY_TIMEOUT_S)
    else:
        client = smtplib.LMTP("127.0.0.1", port, timeout=REPLY_TIMEOUT_S)
    code, _ = client.ehlo("client.example.org")  # smtplib's LMTP says LHLO
    if code != 250:
        raise AssertionError(f"LHLO answered {code}")
    return client


class Raw:
    """An LMTP connection that writes what it is told and reads reply lines, bounded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, greet: bool = True) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        raw = cls(reader, writer)
        if greet:
            lines = await raw.replies(1)
            if not lines[0].startswith("220 "):
                raise AssertionError(f"greeting {lines[0]!r}")
        return raw

    async def line(self, timeout: float = REPLY_TIMEOUT_S) -> str:
        """One reply line; "" when the server closed the connection."""
        async with asyncio.timeout(timeout):
            raw = await self.reader.readline()
        return raw.decode("utf-8", "replace").rstrip("\r\n")

    async def replies(self, count: int, timeout: float = REPLY_TIMEOUT_S) -> list[str]:
        """The next ``count`` replies (a multi-line reply is one, its last line)."""
        found: list[str] = []
        for _ in range(count * 64):
            if len(found) == count:
                break
            line = await self.line(timeout)
            if not line:
                raise AssertionError(f"connection closed after {found}")
            if line[3:4] != "-":
                found.append(line)
        return found

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed(self, timeout: float = REPLY_TIMEOUT_S) -> list[str]:
        """Read until the server closes the connection; the lines it sent meanwhile."""
        lines = []
        async with asyncio.timeout(timeout):
            while raw := await self.reader.readline():
                lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
        return lines

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def listening(config: Config, where: int | Path) -> AsyncIterator[asyncio.Event]:
    """Run mailroom in this event loop until its listener (a port on 127.0.0.1, or a unix
    socket) greets."""
    async with running(config) as stop:
        await wait_until(lambda: greets(where), what=f"the listener on {where}")
        yield stop


async def greets(where: int | Path) -> bool:
    """Whether a listener greets with 220 on ``where`` now."""
    try:
        async with asyncio.timeout(2):
            if isinstance(where, Path):
                reader, writer = await asyncio.open_unix_connection(str(where))
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", where)
            try:
                greeting = await reader.readline()
                writer.write(b"QUIT\r\n")
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return greeting.startswith(b"220 ")


def dotted(message: bytes) -> bytes:
    """``message`` as DATA sends it: leading dots doubled, CRLF at the end, the lone dot."""
    lines = message.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    body = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return body + b".\r\n"


def elapsed_since(started: float) -> float:
    return time.monotonic() - started
