"""A tiny SMTP sink for the mailroom demo: accepts every message and prints it, the way the
sender of a rejected message would see mailroom's reject notice.

    python examples/smtp_sink.py --port 8026

Plain SMTP on 127.0.0.1, no TLS, no AUTH, nothing stored or relayed: point a config's
``reject_notices.smtp`` at it (``host: 127.0.0.1``, ``port: 8026``). Uses aiosmtpd, which
mailroom's test extras install (``make demo`` has it in the clone's .venv).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope

BODY_LINES = 12


def summary(envelope_from: str | None, recipients: list[str], data: bytes) -> str:
    """A few readable lines about one message: its envelope, subject and body."""
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    lines = [
        f"── mail to {', '.join(recipients)}  (MAIL FROM:<{(envelope_from or '').strip('<>')}>)",
        f"   from:    {message.get('From', '')}",
        f"   subject: {message.get('Subject', '')}",
    ]
    part = message.get_body(("plain",))
    text = part.get_content() if isinstance(part, EmailMessage) else ""
    body = text.strip().splitlines()
    lines += [f"   | {line}" for line in body[:BODY_LINES]]
    if len(body) > BODY_LINES:
        lines.append(f"   | … ({len(body) - BODY_LINES} more lines)")
    return "\n".join(lines)


class Printer:
    """The aiosmtpd handler: print each message, answer 250."""

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Envelope) -> str:
        data = envelope.original_content or envelope.content or b""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        print(summary(envelope.mail_from, list(envelope.rcpt_tos), data), flush=True)
        return "250 2.0.0 OK: printed, not delivered"


async def serve(host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(
        lambda: SMTP(Printer(), hostname="smtp-sink.demo.example", enable_SMTPUTF8=True),
        host,
        port,
    )
    print(f"SMTP sink listening on {host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="Print every message sent to it over SMTP.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8026)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
