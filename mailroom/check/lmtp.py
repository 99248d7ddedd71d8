"""``mailroom check`` of an LMTP listener: it answers LHLO, and takes the right recipients.

The listener is mailroom itself, so this checks a running mailroom (or finds the address free
for one to start on). A small client of its own speaks to it as an MTA would (RFC 2033),
reading bounded lines: the greeting and LHLO's extensions, STARTTLS where offered, then
``MAIL FROM:<>`` and a ``RCPT TO`` for an address of the template (250 expected, with the key
routing takes from it) and one for a stranger (550 expected, unless ``forward_all``), and
``RSET``: no message is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import socket
import ssl
import stat

from mailroom.check.net import close
from mailroom.check.report import SESSION_TIMEOUT_S, Failed, Finding, Report, Status, Target
from mailroom.config import LmtpMailboxConfig
from mailroom.mail import routing

__all__ = ["Client", "lmtp"]

LINE_MAX_BYTES = 4096
REPLY_MAX_LINES = 64
STRANGER = "mailroom-check@stranger.invalid"  # RFC 2606: .invalid is nobody's


class Client:
    """Just enough of an LMTP client for the check: replies as (code, lines)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, config: LmtpMailboxConfig) -> Client:
        listen = config.listen
        async with asyncio.timeout(SESSION_TIMEOUT_S):
            if listen.path is not None:
                reader, writer = await asyncio.open_unix_connection(
                    listen.path, limit=LINE_MAX_BYTES
                )
            else:
                reader, writer = await asyncio.open_connection(
                    listen.host, listen.port, limit=LINE_MAX_BYTES
                )
        return cls(reader, writer)

    async def reply(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        async with asyncio.timeout(SESSION_TIMEOUT_S):
            for _ in range(REPLY_MAX_LINES):
                raw = await self.reader.readline()
                if not raw.endswith(b"\n"):
                    raise Failed("the listener closed the connection")
                line = raw.decode("ascii", "replace").rstrip("\r\n")
                if len(line) < 3 or not line[:3].isdigit():
                    raise Failed(f"not an LMTP reply: {line[:60]!r}")
                lines.append(line[4:])
                if line[3:4] != "-":
                    return int(line[:3]), lines
        raise Failed(f"a reply of more than {REPLY_MAX_LINES} lines")

    async def command(self, line: str) -> tuple[int, list[str]]:
        self.writer.write(f"{line}\r\n".encode())
        return await self.reply()

    async def starttls(self) -> str:
        code, text = await self.command("STARTTLS")
        if code != 220:
            raise Failed(f"STARTTLS offered, but answered {code} {text[0]}")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the MTA's own policy decides what it trusts
        async with asyncio.timeout(SESSION_TIMEOUT_S):
            await self.writer.start_tls(context)
        layer = self.writer.get_extra_info("ssl_object")
        version = layer.version() if isinstance(layer, ssl.SSLObject) else None
        return version or "TLS"


async def lmtp(report: Report, config: LmtpMailboxConfig) -> None:
    target = Target(report, f"lmtp[{config.id}]")
    client: Client | None = None

    async def listening() -> Finding:
        nonlocal client
        try:
            client = await Client.connect(config)
        except (OSError, TimeoutError) as exc:
            free = _free(config)
            if free is None:
                return Status.WARN, (
                    f"nothing listens on {config.listen} yet (is mailroom running?); the "
                    "address is free for it"
                )
            raise Failed(f"cannot connect to {config.listen} ({_reason(exc)}), {free}") from exc
        code, text = await client.reply()
        if code != 220:
            raise Failed(f"{config.listen} greets with {code} {text[0]}, not 220")
        return Status.OK, f"{config.listen} greets: {text[0]}"

    async def lhlo() -> Finding:
        if client is None:
            return Status.SKIP, "nothing listens"
        code, lines = await client.command("LHLO mailroom-check")
        if code != 250:
            raise Failed(f"LHLO answered {code} {lines[0]}; is it an LMTP server?")
        extensions = [line.split(" ", 1)[0].upper() for line in lines[1:]]
        detail = f"LHLO: {', '.join(extensions)}"
        if "STARTTLS" in extensions:
            version = await client.starttls()
            code, lines = await client.command("LHLO mailroom-check")
            detail += f"; STARTTLS works ({version})"
        return Status.OK, detail

    async def recipients() -> Finding:
        if client is None:
            return Status.SKIP, "nothing listens"
        rules = config.routing
        key = secrets.token_hex(16)
        address = rules.address.format(key)
        code, text = await client.command("MAIL FROM:<>")
        if code != 250:
            raise Failed(f"MAIL FROM:<> answered {code} {text[0]}")
        code, text = await client.command(f"RCPT TO:<{address}>")
        if code != 250:
            raise Failed(f"RCPT TO:<{address}> answered {code} {text[0]}, not 250")
        found = routing.recipient_key(address, rules)
        routed = f"key {found.key} ({found.matched_header})" if found else "replies only"
        stranger_code, text = await client.command(f"RCPT TO:<{STRANGER}>")
        await client.command("RSET")
        forward_all = rules.mode is routing.RoutingMode.FORWARD_ALL
        expected = 250 if forward_all else 550
        if stranger_code != expected:
            raise Failed(f"RCPT TO:<{STRANGER}> answered {stranger_code} {text[0]}, not {expected}")
        others = "taken (forward_all)" if forward_all else "550 at RCPT"
        return Status.OK, f"<{address}> 250, routed to {routed}; other addresses {others}"

    try:
        await target.run("listen", listening)
        await target.run("lhlo", lhlo)
        await target.run("recipient", recipients)
    finally:
        if client is not None:
            with contextlib.suppress(OSError):
                client.writer.write(b"QUIT\r\n")
            await close(client.writer)


def _free(config: LmtpMailboxConfig) -> str | None:
    """None when a listener could start on the address now; else why not."""
    listen = config.listen
    if listen.path is not None:
        if os.path.lexists(listen.path) and not stat.S_ISSOCK(os.lstat(listen.path).st_mode):
            return f"and {listen.path} is in the way: it is not a socket"
        if not os.access(os.path.dirname(listen.path), os.W_OK | os.X_OK):
            return f"and mailroom could not create {listen.path} there (permissions)"
        return None
    try:
        family = socket.AF_INET6 if ":" in (listen.host or "") else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((listen.host or "", listen.port))
    except OSError as exc:
        in_use = exc.errno == errno.EADDRINUSE
        return "and something else holds the port" if in_use else f"and {_reason(exc)}"
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__
