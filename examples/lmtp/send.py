"""Hand one message to an LMTP listener as an MTA would, and print every reply.

    python examples/lmtp/send.py 127.0.0.1:2424 message.eml --to incoming+abc@example.com
    python examples/lmtp/send.py unix:/run/mailroom/lmtp.sock - --to a@x --to b@y < message.eml

LMTP answers once per recipient after DATA (RFC 2033 §4.2), in RCPT order. The standard
library's ``smtplib.LMTP`` speaks LHLO, but its ``sendmail`` and ``data`` read only the first
of those replies: with two recipients the second one's reply is left unread, and turns up as
the answer to the next command (an ``SMTPResponseException`` at QUIT). This script reads them
all. Exit status: 0 when every recipient got 250, 1 when one was refused (5xx), 75 when one
should be sent again later (4xx), as an MTA keeps it in its queue.
"""

from __future__ import annotations

import argparse
import email.parser
import email.utils
import smtplib
import sys
from pathlib import Path

TIMEOUT_S = 120.0  # above the listener's reply_within (60 s by default)
EX_TEMPFAIL = 75


def connect(listen: str) -> smtplib.LMTP:
    """``host:port``, ``[::1]:port`` or ``unix:/path``, as the listener's ``listen``."""
    if listen.startswith("unix:"):
        return smtplib.LMTP(listen.removeprefix("unix:"), timeout=TIMEOUT_S)
    host, _, port = listen.rpartition(":")
    return smtplib.LMTP(host.strip("[]"), int(port), timeout=TIMEOUT_S)


def send(
    client: smtplib.LMTP, sender: str, recipients: list[str], message: bytes
) -> list[tuple[str, str, int, str]]:
    """One transaction: (stage, recipient, code, text) for each reply to a recipient."""
    replies: list[tuple[str, str, int, str]] = []
    code, text = client.ehlo("send.py")  # smtplib's LMTP says LHLO
    if code != 250:
        raise SystemExit(f"LHLO answered {code} {text.decode(errors='replace')}")
    code, text = client.mail(sender)
    if code != 250:
        raise SystemExit(f"MAIL FROM answered {code} {text.decode(errors='replace')}")
    accepted = []
    for rcpt in recipients:
        code, text = client.rcpt(rcpt)
        replies.append(("RCPT", rcpt, code, text.decode(errors="replace")))
        if code == 250:
            accepted.append(rcpt)
    if not accepted:
        client.rset()
        return replies
    # smtplib.data() sends the message (dot-stuffed, CRLF) and reads the first reply only.
    code, text = client.data(message)
    after = [(code, text)] + [client.getreply() for _ in accepted[1:]]
    for rcpt, (code, text) in zip(accepted, after, strict=True):
        replies.append(("DATA", rcpt, code, text.decode(errors="replace")))
    return replies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("listen", help="host:port, [::1]:port or unix:/path")
    parser.add_argument("message", help="the message as a file (.eml), or - for stdin")
    parser.add_argument("--to", action="append", required=True, help="a recipient; repeat")
    parser.add_argument(
        "--from",
        dest="sender",
        help="the envelope sender (default: the message's From address; <> is a bounce, "
        "which mailroom drops as auto-generated)",
    )
    args = parser.parse_args()
    stdin = args.message == "-"
    message = sys.stdin.buffer.read() if stdin else Path(args.message).read_bytes()
    sender = args.sender
    if sender is None:
        head = email.parser.BytesHeaderParser().parsebytes(message)
        sender = email.utils.parseaddr(str(head.get("From", "")))[1]
    try:
        client = connect(args.listen)
    except (OSError, ValueError, smtplib.SMTPException) as exc:
        raise SystemExit(
            f"cannot connect to {args.listen}: {exc}; is mailroom running there?"
        ) from None
    try:
        replies = send(client, sender, args.to, message)
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()
    for stage, rcpt, code, text in replies:
        print(f"{stage:4} <{rcpt}>: {code} {text}")
    codes = [code for stage, _, code, _ in replies if stage == "DATA" or code != 250]
    if any(code >= 500 for code in codes):
        return 1
    if any(400 <= code < 500 for code in codes):
        return EX_TEMPFAIL
    return 0


if __name__ == "__main__":
    sys.exit(main())
