"""Pure LMTP: the replies, their enhanced status codes, what a delivery prepends, its webhook-id.

An LMTP server (RFC 2033) answers the end of DATA once per accepted recipient, in RCPT order;
what the MTA does with each reply is what mailroom means by it:

- ``250``: delivered (the webhook took it: 2xx or 409), or auto-generated and dropped. The MTA
  removes the recipient from its queue.
- ``4xx``: not now (the webhook is down or slow, its circuit is open, mailroom has too much in
  flight, or is stopping). The MTA keeps the message queued and tries again later: its queue is
  mailroom's retry.
- ``5xx``: refused for good (the application refused it, or the webhook answered a permanent
  4xx). The MTA bounces it to its sender: the bounce is the reject notice.

Enhanced status codes (RFC 3463, offered as ENHANCEDSTATUSCODES, RFC 2034) are in every reply
but the greeting and LHLO's; ``enhance`` adds one to aiosmtpd's own replies, which have none.
Text from strangers (a 422's reason) is made one printable ASCII line of bounded length.
"""

from __future__ import annotations

import re

from mailroom import identity
from mailroom.envelope import Outcome

__all__ = [
    "BAD_ADDRESS",
    "BUSY",
    "RECIPIENT_OK",
    "RETRY",
    "SENDER_OK",
    "SHUTTING_DOWN",
    "TOO_MANY_CONNECTIONS",
    "TOO_MANY_RECIPIENTS",
    "TOO_MUCH_AT_ONCE",
    "code",
    "delivery_header",
    "enhance",
    "late",
    "outcome_reply",
    "printable",
    "too_large",
    "unknown_recipient",
    "usable_address",
    "webhook_id",
]

SENDER_OK = "250 2.1.0 sender ok"
RECIPIENT_OK = "250 2.1.5 recipient ok"
# 4xx: the MTA keeps the message and tries again later.
RETRY = "451 4.3.0 not delivered now; try again later"
BUSY = "452 4.3.1 mailroom has too much mail in flight (limits); try again later"
TOO_MUCH_AT_ONCE = "452 4.3.1 too many copies of a message this large at once; try again later"
SHUTTING_DOWN = "421 4.3.2 mailroom is shutting down; try again later"
TOO_MANY_CONNECTIONS = "421 4.3.2 too many connections (max_connections); try again later"
# RFC 5321 §4.5.3.1.10: the client sends the recipients refused so in another transaction.
TOO_MANY_RECIPIENTS = "452 4.5.3 too many recipients (max_recipients); send the rest again"
BAD_ADDRESS = "553 5.1.3 malformed address"

# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
REASON_MAX_CHARS = 300
ADDRESS_MAX_CHARS = 320  # RFC 5321 §4.5.3.1.1 and .2: 64 for the local part, 255 the domain

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
# aiosmtpd's own replies, with the enhanced code RFC 3463 gives their meaning.
_ENHANCED_BY_CODE = {
    221: "2.0.0",
    250: "2.0.0",
    252: "2.5.0",
    421: "4.3.2",
    454: "4.7.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    552: "5.3.4",
    554: "5.7.0",
    555: "5.5.4",
}
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]+")


def printable(text: str, limit: int = REASON_MAX_CHARS) -> str:
    """``text`` as one line of printable ASCII (what a reply may carry), at most ``limit``
    characters: runs of anything else become one ``?``."""
    line = _NOT_PRINTABLE.sub("?", text[: limit * 4]).strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def code(reply: str) -> int:
    """The reply code of a reply line."""
    return int(reply[:3])


def enhance(reply: str) -> str:
    """``reply`` with an enhanced status code after its code, where it has none (aiosmtpd's
    own replies). The greeting (220), intermediate replies (3xx) and continuation lines
    (LHLO's ``250-``) are left alone, as RFC 2034 §3 says."""
    if len(reply) < 4 or not reply[:3].isdigit() or reply[3] != " " or reply[0] not in "245":
        return reply
    number, text = int(reply[:3]), reply[4:]
    if number == 220 or _ENHANCED.match(text):
        return reply
    return f"{reply[:3]} {_ENHANCED_BY_CODE.get(number, reply[0] + '.0.0')} {text}"


def outcome_reply(outcome: Outcome, why: str, webhook_id: str) -> str:
    """The reply to one recipient once the dispatcher settled its delivery as ``outcome``."""
    reason = printable(why)
    if outcome is Outcome.DELIVERED:
        return f"250 2.0.0 {webhook_id} delivered"
    if outcome is Outcome.IGNORED:
        return f"250 2.0.0 {webhook_id} auto-generated ({reason}); not posted"
    if outcome is Outcome.REJECTED:
        return f"550 5.7.1 {reason or 'refused by the application'}"
    return f"554 5.3.0 {reason or 'refused for good'}"


def late(reply_within_s: float) -> str:
    """The reply when no outcome came within ``reply_within``: the MTA tries again later."""
    return f"451 4.3.0 no answer from the webhook within {reply_within_s:g}s; try again later"


def too_large(limit: int) -> str:
    return f"552 5.3.4 message larger than max_message_bytes ({limit} bytes)"


def unknown_recipient(address: str) -> str:
    return f"550 5.1.1 <{printable(address, ADDRESS_MAX_CHARS)}>: no such recipient here"


def usable_address(address: str) -> bool:
    """An address from MAIL or RCPT that may go into a header line: no control character (a
    bare CR gets through the command parser), not absurdly long."""
    return len(address) <= ADDRESS_MAX_CHARS and not any(
        ord(c) < 0x20 or ord(c) == 0x7F for c in address
    )


def delivery_header(sender: str, recipient: str) -> bytes:
    """The lines a final delivery prepends, as Dovecot's LMTP and Postfix's local(8) do:
    ``Return-Path`` (the envelope sender; ``<>`` for a bounce, which routing ignores as
    auto-generated) and ``Delivered-To`` (this delivery's recipient)."""
    sender = "" if sender == "<>" else sender
    lines = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n"
    return lines.encode("utf-8", "surrogateescape")


def webhook_id(listener: str, digest: str, recipient: str) -> str:
    """The webhook-id of one delivery: the listener's identity (``LmtpMailboxConfig.identity``),
    the SHA-256 of the message as the MTA sent it, and the recipient (``mailroom.identity``)."""
    return identity.webhook_id(listener, identity.lmtp_delivery(digest, recipient))
