"""A hostile IMAP server: enough IMAP to reach a place, then misbehaves there (issue 18).

A mode is ``what@where``: ``where`` is the place (``greeting``, ``login``, ``select``,
``search``, ``fetch`` (the body fetch), ``idle``), ``what`` the misbehaviour:

- ``line``: a line that never ends (no CRLF);
- ``literal``: a literal announced as 999,999,999 bytes, then its bytes;
- ``lie``: the message's RFC822.SIZE is 93, and its body a literal of 400,000,000 bytes;
- ``flood``: untagged ``* OK still here`` lines without end;
- ``parens``: a FETCH response whose parentheses never close, one line at a time;
- ``bignum``: a 5,000-digit number (a UID in SEARCH or FETCH, UIDVALIDITY, an EXISTS count);
- ``control``: a NO whose text has a bare LF and terminal escapes (a forged log line);
- ``inject@starttls``: STARTTLS offered, its OK followed in the same write by a response sent
  in clear text (a man in the middle's injection);
- ``healthy``: no misbehaviour: one message (UID 1) to deliver, then IDLE.

Except where they break the protocol for good, modes also serve the one message, so a test can
see that a bad item was skipped and the good one delivered. Every stream is bounded: at most
``--max-bytes`` per connection and ``--max-seconds`` per misbehaviour, then the connection is
closed. ``stream(mode)`` gives the same bytes to a test without a socket (the fuzz test).

Run as ``python -m tests.servers.hostile_imap --mode literal@fetch``: it prints ``PORT <n>``,
then serves on 127.0.0.1 until killed. ``HostileImap`` does that from a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import Iterator

from tests.servers.process import ServerProcess

WHATS = ("line", "literal", "lie", "flood", "parens", "bignum", "control", "inject")
WHERES = ("greeting", "starttls", "login", "select", "search", "fetch", "idle")
# The modes the tests run: each misbehaviour where the issue found it, and a few more.
MODES = (
    "healthy",
    "line@greeting",
    "line@idle",
    "literal@greeting",
    "literal@login",
    "literal@idle",
    "literal@fetch",
    "lie@fetch",
    "flood@select",
    "flood@search",
    "flood@idle",
    "parens@fetch",
    "bignum@select",
    "bignum@search",
    "bignum@fetch",
    "bignum@idle",
    "control@login",
    "inject@starttls",
)
MAX_BYTES = 512 * 1024 * 1024
MAX_SECONDS = 30.0
CHUNK = 64 * 1024
BIG = b"9" * 5000
USER, PASSWORD = "hostile", "secret-hostile"
MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: incoming+hostile@example.com\r\n"
    b"Subject: from a hostile server\r\nMessage-ID: <hostile-1@example.org>\r\n"
    b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n\r\nThe good message.\r\n"
)
_COMMAND = re.compile(rb"^(\S+) (?:UID )?([A-Za-z]+)")


def stream(mode: str) -> Iterator[bytes]:
    """The bytes of ``mode``'s misbehaviour, in chunks, without end where it has none."""
    what, _, where = mode.partition("@")
    if what == "line":
        yield b"* OK "
        yield from itertools.repeat(b"x" * CHUNK)
    elif what in ("literal", "lie"):
        size = 400_000_000 if what == "lie" else 999_999_999
        if where == "fetch":
            announced = 93 if what == "lie" else len(MESSAGE)
            yield b"* 1 FETCH (UID 1 RFC822.SIZE %d BODY[] {%d}\r\n" % (announced, size)
        else:
            yield b"* OK {%d}\r\n" % size
        yield from itertools.repeat(b"x" * CHUNK)
    elif what == "flood":
        yield from itertools.repeat(b"* OK still here\r\n" * (CHUNK // 17))
    elif what == "parens":
        yield b"* 1 FETCH (UID 1 RFC822.SIZE %d FLAGS (" % len(MESSAGE)
        yield from itertools.repeat(b"\r\n(" * (CHUNK // 3))
    elif what == "bignum":
        yield {
            "select": b"* OK [UIDVALIDITY " + BIG + b"] UIDs valid\r\n",
            "search": b"* SEARCH " + BIG + b" 1\r\n",
            "fetch": b"* 7 FETCH (UID " + BIG + b" RFC822.SIZE " + BIG + b")\r\n",
            "idle": b"* " + BIG + b" EXISTS\r\n",
        }.get(where, b"* OK " + BIG + b"\r\n")
    elif what == "control":
        yield b"NO [AUTHENTICATIONFAILED] no\n2026-01-01 ERROR mailroom: forged \x1b[2J\x1b[31m"
    elif what == "inject":  # after the tagged OK, in the same write: read as if it were TLS
        yield b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n"


def _endless(mode: str) -> bool:
    what = mode.partition("@")[0]
    return what in ("line", "literal", "lie", "flood", "parens")


class _Connection:
    def __init__(
        self,
        mode: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_bytes: int,
        max_seconds: float,
    ) -> None:
        self.what, _, self.where = mode.partition("@")
        self.mode = mode
        self.reader = reader
        self.writer = writer
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.sent = 0
        self.settled = False  # the message was stored \Seen (or moved)

    async def write(self, data: bytes) -> None:
        if self.sent + len(data) > self.max_bytes:
            raise ConnectionResetError("the byte bound of this connection is reached")
        self.sent += len(data)
        self.writer.write(data)
        await self.writer.drain()

    async def misbehave(self) -> bool:
        """Send the misbehaviour; True when the connection is to be closed after it."""
        deadline = time.monotonic() + self.max_seconds
        for chunk in stream(self.mode):
            await self.write(chunk)
            if time.monotonic() > deadline:
                return True
        return _endless(self.mode)

    @property
    def capabilities(self) -> bytes:
        return b"IMAP4rev1 IDLE UIDPLUS" + (b" STARTTLS" if self.here("starttls") else b"")

    def here(self, where: str) -> bool:
        return self.where == where and self.what != "healthy"

    async def run(self) -> None:
        if self.here("greeting") and await self.misbehave():
            return
        await self.write(b"* OK [CAPABILITY " + self.capabilities + b"] hostile ready\r\n")
        while True:
            line = await self.reader.readuntil(b"\r\n")  # StreamReader's limit bounds it
            match = _COMMAND.match(line)
            if match is None:
                continue
            tag, name = match.group(1), match.group(2).upper()
            if not await self.command(tag, name, line):
                return

    async def command(self, tag: bytes, name: bytes, line: bytes) -> bool:
        done = tag + b" OK done\r\n"
        if name == b"STARTTLS":
            injected = next(stream(self.mode))
            await self.write(tag + b" OK Begin TLS negotiation now\r\n" + injected)
            return True
        if name == b"CAPABILITY":
            await self.write(b"* CAPABILITY " + self.capabilities + b"\r\n" + done)
        elif name == b"LOGIN":
            if self.here("login"):
                if self.what == "control":
                    await self.write(tag + b" " + next(stream(self.mode)) + b"\r\n")
                    return True
                if await self.misbehave():
                    return False
            await self.write(done)
        elif name in (b"SELECT", b"EXAMINE"):
            if self.here("select") and await self.misbehave():
                return False
            uidvalidity = b"" if self.here("select") else b"* OK [UIDVALIDITY 7] ok\r\n"
            await self.write(b"* 1 EXISTS\r\n" + uidvalidity + tag + b" OK [READ-WRITE] done\r\n")
        elif name == b"SEARCH":
            if self.here("search"):
                if await self.misbehave():
                    return False
                await self.write(done)  # bignum: its SEARCH line named UID 1 as well
            else:
                found = b"" if self.settled else b" 1"
                await self.write(b"* SEARCH" + found + b"\r\n" + done)
        elif name == b"FETCH":
            return await self.fetch(line, done)
        elif name == b"STORE":
            self.settled = self.settled or b"\\Seen" in line or b"\\Deleted" in line
            await self.write(done)
        elif name == b"IDLE":
            await self.write(b"+ idling\r\n")
            if self.here("idle") and await self.misbehave():
                return False
            await self.reader.readuntil(b"\r\n")  # DONE
            await self.write(done)
        elif name == b"LOGOUT":
            await self.write(b"* BYE bye\r\n" + done)
            return False
        else:
            await self.write(done)
        return True

    async def fetch(self, line: bytes, done: bytes) -> bool:
        size = 93 if self.what == "lie" else len(MESSAGE)
        if b"BODY" not in line.upper():  # the sweep asks for sizes first
            if self.here("fetch") and self.what == "bignum":
                await self.write(next(stream(self.mode)))
            if not self.settled:
                await self.write(b"* 1 FETCH (UID 1 RFC822.SIZE %d)\r\n" % size)
            await self.write(done)
            return True
        if b"HEADER" in line.upper():  # too large for the body: its header block, honestly
            header = MESSAGE.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
            head = b"* 1 FETCH (UID 1 RFC822.SIZE %d BODY[HEADER]<0> {%d}\r\n" % (size, len(header))
            await self.write(head + header + b")\r\n" + done)
            return True
        if self.here("fetch") and self.what != "bignum" and await self.misbehave():
            return False
        head = b"* 1 FETCH (UID 1 RFC822.SIZE %d BODY[] {%d}\r\n" % (len(MESSAGE), len(MESSAGE))
        await self.write(head + MESSAGE + b")\r\n" + done)
        return True


async def serve(mode: str, port: int, *, max_bytes: int, max_seconds: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(mode, reader, writer, max_bytes=max_bytes, max_seconds=max_seconds)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await connection.run()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=64 * 1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


class HostileImap(ServerProcess):
    """``python -m tests.servers.hostile_imap`` as a process of its own, so that what it
    sends costs the process under test nothing but the receiving."""

    def __init__(self, mode: str, *, max_bytes: int = MAX_BYTES, max_seconds: float = 30.0):
        assert mode in MODES or mode.partition("@")[0] in WHATS, mode
        self.mode = mode
        args = ["--mode", mode, "--max-bytes", str(max_bytes), "--max-seconds", str(max_seconds)]
        super().__init__("tests.servers.hostile_imap", args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS)
    args = parser.parse_args()
    asyncio.run(serve(args.mode, args.port, max_bytes=args.max_bytes, max_seconds=args.max_seconds))


if __name__ == "__main__":
    main()
