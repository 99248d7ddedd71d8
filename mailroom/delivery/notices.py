"""Pure reject notices: who may get one, what it says, and how often.

A notice is an automatic reply in the sense of RFC 3834, so it must not cause backscatter: it is
never sent to a null sender, a mailer-daemon, our own addresses or auto-generated mail, at most
once per recipient and reason per window, and optionally only to senders whose domain the
receiving server authenticated (``authresults``). No I/O here: the dispatcher
sends the ``Notice`` (RFC 3834 §3.3 recommends an empty envelope sender, ``MAIL FROM:<>``).

A notice echoes text a stranger chose (the subject) and text an application chose (the reason),
so its bytes are written here, not by an ``email`` policy: a policy parses what it is given and
decodes RFC 2047 words in it, CR/LF included (issue 13: an encoded subject injected a Bcc and
a body). Echoed text is decoded once, cleaned of controls, its ``=?`` broken up, and encoded
again by ``_unstructured``; the result is checked (``_check``) before anything is sent.
"""

from __future__ import annotations

import base64
import binascii
import email.errors
import email.utils
import re
import textwrap
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from email import headerregistry, policy
from email.message import EmailMessage

from mailroom.config import RejectNoticesConfig
from mailroom.errors import NoticeError
from mailroom.mail import authresults, routing
from mailroom.mail.decision import TOO_LARGE
from mailroom.mail.message import ParsedMessage, scan_addresses

__all__ = [
    "UNKNOWN_INCOMING_EMAIL",
    "Notice",
    "NoticeRecipient",
    "RateLimiter",
    "build_notice",
    "configured_recipient",
    "explain",
    "notice_recipient",
]

UNKNOWN_INCOMING_EMAIL = routing.UNKNOWN_INCOMING_EMAIL
DAY_S = 86_400.0
MAX_SUBJECT_CHARS = 200
MAX_REASON_CHARS = 1_000
# C0 and C1 controls and the Unicode line and paragraph separators: never echoed.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def _clean(text: str, limit: int) -> str:
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def explain(reason: str, *, max_message_bytes: int | None = None) -> str:
    """The human-readable text for ``reason``: ours for built-in reasons, else the
    application's own (a webhook 422 ``{"reject": "<reason>"}``), cleaned of control characters."""
    if reason == UNKNOWN_INCOMING_EMAIL:
        return (
            "The address you sent it to is not known here. If you were replying to a "
            "notification, reply to that email itself; otherwise check the address."
        )
    if reason == TOO_LARGE:
        limit = f" of {_size(max_message_bytes)}" if max_message_bytes else ""
        return f"It is larger than the limit{limit}. Send it again with smaller attachments."
    if reason == routing.UNPARSABLE_MESSAGE:
        return "It could not be read as an email message."
    return _clean(reason, MAX_REASON_CHARS) or "It was refused by the application."


@dataclass(frozen=True, slots=True)
class NoticeRecipient:
    """Where a notice may go (``address``), or why none may be sent (``refused``)."""

    address: str | None
    refused: str | None = None


def notice_recipient(
    parsed: ParsedMessage,
    rules: routing.RoutingRules,
    *,
    require_authenticated_sender: bool = False,
    authserv_ids: frozenset[str] = frozenset(),
) -> NoticeRecipient:
    """The Return-Path (envelope sender) when present, else From — unless policy forbids it.

    Every auto-generated rule applies here, even one switched off for routing: a notice to a
    list or a robot is backscatter.
    """
    if parsed.unparsable:
        return NoticeRecipient(None, "unparsable message")
    if parsed.return_path == "":
        return NoticeRecipient(None, "null sender")  # RFC 5321 §4.5.5
    candidate = parsed.return_path or (parsed.from_.address if parsed.from_ else None)
    found = scan_addresses(candidate or "")
    if not found:
        return NoticeRecipient(None, "no sender address")
    address = found[0]
    if not _usable_address(address):
        return NoticeRecipient(None, "unusable sender address")
    if address.partition("@")[0].lower() in ("mailer-daemon", "postmaster"):
        return NoticeRecipient(None, "mailer-daemon sender")
    if rules.is_own(address):
        return NoticeRecipient(None, "our own address")
    every_rule = frozenset(routing.AUTO_GENERATED_RULES)
    if (rule := routing.auto_generated(parsed, rules, only=every_rule)) is not None:
        return NoticeRecipient(None, f"auto-generated ({rule})")
    if require_authenticated_sender and not authresults.authenticated_sender(
        parsed, authserv_ids=authserv_ids
    ):
        return NoticeRecipient(None, "sender not authenticated")
    return NoticeRecipient(address)


def configured_recipient(
    parsed: ParsedMessage, rules: routing.RoutingRules, settings: RejectNoticesConfig
) -> NoticeRecipient:
    """``notice_recipient`` under the policy of ``settings`` (``reject_notices``): the one
    reading of it, for the ``Notifier`` and for what the dry run, ``route`` and ``check`` show."""
    return notice_recipient(
        parsed,
        rules,
        require_authenticated_sender=settings.require_authenticated_sender,
        authserv_ids=settings.trusted_authserv_ids,
    )


# An addr-spec we can put in To: and RCPT TO: as it is: no whitespace, controls, brackets,
# quotes or RFC 2047 words (which a header policy would decode into CR/LF: header injection).
_PLAIN_ADDRESS = re.compile(
    r"[^\s<>()\[\]\\,;:@\"\x00-\x1f\x7f]+@[^\s<>()\[\]\\,;:@\"\x00-\x1f\x7f]+"
)
# A msg-id we may echo in In-Reply-To/References: printable ASCII, no angle brackets.
_ECHOABLE_MSG_ID = re.compile(r"[!-;=?-~]{1,200}@[!-;=?-~]{1,200}")


def _usable_address(address: str) -> bool:
    # RFC 5321 §4.5.3.1.3: a path is at most 256 octets, the angle brackets included.
    if len(address) > 254 or "=?" in address or not _PLAIN_ADDRESS.fullmatch(address):
        return False
    try:
        headerregistry.Address(addr_spec=address)
    except (ValueError, IndexError, email.errors.HeaderParseError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class Notice:
    """A reject notice as it goes on the wire: ``data`` has CRLF line ends and exactly the
    header fields ``build_notice`` set. ``smtputf8``: the header block is not ASCII (a
    non-ASCII recipient, RFC 6532), so it may only go to a server that offers SMTPUTF8."""

    recipient: str
    message_id: str
    data: bytes = field(repr=False)
    smtputf8: bool = False

    def message(self) -> EmailMessage:
        """``data`` parsed with the modern policy: the notice as a reader sees it."""
        parsed = email.message_from_bytes(self.data, policy=policy.default)
        if not isinstance(parsed, EmailMessage):  # policy.default's factory makes one
            raise TypeError(f"policy.default parsed a {type(parsed).__name__}")
        return parsed


# RFC 5322 §2.1.1: lines SHOULD be at most 78 characters, MUST be at most 998.
_LINE = 78
_MAX_LINE = 998
# RFC 2047 §2: an encoded-word is at most 75 characters; 45 octets make 60 of base64, plus 12.
_WORD_OCTETS = 45
_MSG_ID = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>")
_DOT_ATOM_DOMAIN = re.compile(r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


def _echo(text: str, limit: int) -> str:
    """Stranger's text for a header: cleaned, and with no ``=?`` left that any reader could
    take for an encoded-word and decode again (a double-encoded subject, issue 13)."""
    return _clean(text, limit).replace("=?", "= ?")


def _encoded_words(text: str) -> list[str]:
    """``text`` as RFC 2047 base64 words of UTF-8, never splitting a character."""
    words: list[str] = []
    chunk = bytearray()
    for char in text:
        octets = char.encode("utf-8", "replace")
        if len(chunk) + len(octets) > _WORD_OCTETS:
            words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode('ascii')}?=")
            chunk.clear()
        chunk += octets
    if chunk:
        words.append(f"=?utf-8?b?{base64.b64encode(chunk).decode('ascii')}?=")
    return words


def _unstructured(name: str, prefix: str, text: str) -> str:
    """The value of unstructured header ``name``: ``prefix``, a space and ``text``, folded at
    spaces (RFC 5322 §2.2.3); ``text`` in encoded-words when it is not ASCII. ``text`` comes
    from ``_echo``: one space between words, no controls, no ``=?``."""
    if not text:
        return prefix
    if not text.isascii():
        return prefix + "".join(f"\r\n {word}" for word in _encoded_words(text))
    lines = [prefix]
    width = _LINE - len(name) - 2
    for word in text.split(" "):
        if len(lines[-1]) + 1 + len(word) > width:
            lines.append(word)
            width = _LINE - 1
        else:
            lines[-1] += " " + word
    return "\r\n ".join(lines)


def _mailbox(sender: str) -> tuple[str, str]:
    """``sender`` (``Name <addr>``) as a From value, and its addr-spec."""
    name, address = email.utils.parseaddr(sender)
    if not address.isascii() or not _usable_address(address):
        raise NoticeError(f"reject_notices.from: {address!r} cannot be sent as it is")
    name = _echo(name, MAX_SUBJECT_CHARS)
    if not name:
        return address, address
    if name.isascii():
        return email.utils.formataddr((name, address)), address
    return "\r\n ".join([*_encoded_words(name), f"<{address}>"]), address


def _body(lines: list[str]) -> tuple[str, bytes]:
    """The Content-Transfer-Encoding and the body: 7bit when it can, else quoted-printable
    (which needs no 8BITMIME from the relay, RFC 6152)."""
    text = "\n".join(lines) + "\n"
    if text.isascii() and all(len(line) <= _MAX_LINE for line in text.split("\n")):
        data = text.encode("ascii")
        return "7bit", data.replace(b"\n", b"\r\n")
    data = binascii.b2a_qp(text.encode("utf-8", "replace"), istext=True)
    return "quoted-printable", data.replace(b"\n", b"\r\n")


def _check(data: bytes, names: list[str]) -> None:
    """What goes on the wire: CRLF only, lines within RFC 5322 §2.1.1, exactly ``names``."""
    head, blank, _ = data.partition(b"\r\n\r\n")
    if not blank:
        raise NoticeError("no end of the header block")
    stray = data.replace(b"\r\n", b"")
    if b"\r" in stray or b"\n" in stray:
        raise NoticeError("a bare CR or LF")
    if any(len(line) > _MAX_LINE for line in data.split(b"\r\n")):
        raise NoticeError("a line over 998 octets")
    lines = head.split(b"\r\n")
    fields = [line.partition(b":")[0] for line in lines if not line.startswith((b" ", b"\t"))]
    if fields != [name.encode("ascii") for name in names]:
        raise NoticeError(f"header fields {fields!r} instead of {names!r}")


def build_notice(
    original: ParsedMessage,
    *,
    recipient: str,
    reason: str,
    sender: str,
    now: datetime,
    footer: str = "",
    max_message_bytes: int | None = None,
    message_id: str | None = None,
) -> Notice:
    """The reject notice for ``original``: never its body, only its subject, date and id.

    ``sender`` is the notice's From (``Example <noreply@example.com>``); ``now`` must be
    timezone-aware; ``message_id`` defaults to a fresh one on the sender's domain (given, so
    ``make_msgid`` does not look up this host's name). Raises ``NoticeError`` when no safe
    notice can be written (an unusable recipient or sender, or a check of the bytes failed).
    """
    if not _usable_address(recipient):
        raise NoticeError(f"the recipient {recipient!r} cannot be sent to as it is")
    from_, address = _mailbox(sender)
    domain = address.rpartition("@")[2].lower()
    if not _DOT_ATOM_DOMAIN.fullmatch(domain):
        domain = "localhost"
    message_id = message_id or email.utils.make_msgid("mailroom", domain=domain)
    if not _MSG_ID.fullmatch(message_id):
        raise NoticeError(f"the message id {message_id!r} is not <id@domain>")
    subject = _echo(original.subject, MAX_SUBJECT_CHARS)
    headers = [
        ("From", from_),
        ("To", recipient),
        ("Subject", _unstructured("Subject", "[Rejected]", subject)),
        ("Date", email.utils.format_datetime(now)),
        ("Message-ID", message_id),
    ]
    original_id = original.message_id
    if original_id and "=?" not in original_id and _ECHOABLE_MSG_ID.fullmatch(original_id):
        headers += [("In-Reply-To", f"<{original_id}>"), ("References", f"<{original_id}>")]
    lines = ["Your email could not be delivered.", ""]
    lines.append(f"  Subject: {subject or '(no subject)'}")
    if original.date:
        lines.append(f"  Date: {original.date}")
    explanation = explain(reason, max_message_bytes=max_message_bytes)
    lines += ["", textwrap.fill(explanation, 72, break_long_words=False), ""]
    lines.append("This is an automatic reply; answers to it are not read.")
    if footer.strip():  # RFC 3676 §4.3 signature separator
        lines += ["", "-- ", *(_clean(line, _MAX_LINE) for line in footer.strip().splitlines())]
    transfer_encoding, body = _body(lines)
    headers += [
        ("Auto-Submitted", "auto-replied"),  # RFC 3834 §5.2
        ("X-Auto-Response-Suppress", "All"),  # Exchange: no out-of-office replies to this
        ("MIME-Version", "1.0"),
        ("Content-Type", 'text/plain; charset="utf-8"'),
        ("Content-Transfer-Encoding", transfer_encoding),
    ]
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    data = head.encode("utf-8", "replace") + b"\r\n" + body
    _check(data, [name for name, _ in headers])
    return Notice(recipient, message_id, data, smtputf8=not head.isascii())


class RateLimiter:
    """At most one notice per (recipient, reason) per ``window_s``, in memory.

    Memory is bounded: entries older than the window are expired on every call, and when
    ``max_entries`` are live a new recipient is refused (no notice beats backscatter).
    ``now`` is a monotonic clock reading in seconds, e.g. ``time.monotonic()``.
    """

    def __init__(self, *, window_s: float = DAY_S, max_entries: int = 100_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._sent: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sent)

    def expire(self, now: float) -> None:
        """Forget entries older than the window (oldest first: insertion order is time order)."""
        while self._sent:
            key, sent_at = next(iter(self._sent.items()))
            if now - sent_at < self.window_s:
                break
            del self._sent[key]

    def allow(self, recipient: str, reason: str, now: float) -> bool:
        """True (and recorded) if a notice may go now; False if one went within the window."""
        self.expire(now)
        key = (recipient.strip().lower(), reason)
        if key in self._sent or len(self._sent) >= self.max_entries:
            return False
        self._sent[key] = now
        return True
