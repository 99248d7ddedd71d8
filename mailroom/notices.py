"""Pure reject notices: who may get one, what it says, and how often.

A notice is an automatic reply in the sense of RFC 3834, so it must not cause backscatter: it is
never sent to a null sender, a mailer-daemon, our own addresses or auto-generated mail, at most
once per recipient and reason per window, and optionally only to senders whose domain the
receiving server authenticated (RFC 8601 Authentication-Results). No I/O here: the dispatcher
sends the ``EmailMessage`` (RFC 3834 §3.3 recommends an empty envelope sender, ``MAIL FROM:<>``).
"""

from __future__ import annotations

import email.errors
import email.utils
import re
import textwrap
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from email import headerregistry, policy
from email.message import EmailMessage

from mailroom import routing
from mailroom.message import ParsedMessage, scan_addresses

__all__ = [
    "TOO_LARGE",
    "UNKNOWN_INCOMING_EMAIL",
    "AuthResult",
    "NoticeRecipient",
    "RateLimiter",
    "authenticated_sender",
    "build_notice",
    "explain",
    "notice_recipient",
    "parse_authentication_results",
]

UNKNOWN_INCOMING_EMAIL = routing.UNKNOWN_INCOMING_EMAIL
TOO_LARGE = "too large"
DAY_S = 86_400.0
MAX_SUBJECT_CHARS = 200
MAX_REASON_CHARS = 1_000
MAX_AUTH_RESULTS_CHARS = 8_192
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# RFC 8601 §2.2 lexemes: comments nest, quoted strings may escape; each alternative starts with a
# distinct character, so the scan is linear.
_AR_TOKEN = re.compile(r'[()]|"(?:[^"\\]|\\.)*"?|[;=]|[^\s()";=]+')


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


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One ``method=result`` of an Authentication-Results header with its properties."""

    method: str
    result: str
    properties: tuple[tuple[str, str], ...] = ()

    def prop(self, name: str) -> str | None:
        return next((v for k, v in self.properties if k == name), None)


def parse_authentication_results(value: str) -> tuple[str, tuple[AuthResult, ...]]:
    """The authserv-id and results of one Authentication-Results value (RFC 8601 §2.2).

    Comments are dropped and quoted strings unquoted; whatever cannot be read is skipped.
    """
    clauses: list[list[str]] = [[]]
    depth = 0
    for token in _AR_TOKEN.findall(value[:MAX_AUTH_RESULTS_CHARS]):
        if token in "()":  # RFC 5322 §3.2.2 comments nest
            depth = max(depth + (1 if token == "(" else -1), 0)
        elif depth:
            continue
        elif token == ";":
            clauses.append([])
        else:
            clauses[-1].append(token[1:].removesuffix('"') if token[0] == '"' else token)
    authserv_id = clauses[0][0].lower() if clauses[0] else ""
    results = []
    for clause in clauses[1:]:
        pairs = [
            (clause[i - 1].lower(), clause[i + 1])
            for i in range(1, len(clause) - 1)
            if clause[i] == "=" and clause[i - 1] != "="
        ]
        if not pairs or "." in pairs[0][0]:
            continue
        method = pairs[0][0].split("/", 1)[0]  # RFC 8601 §2.2: method may carry "/version"
        props = tuple((k, v) for k, v in pairs[1:] if "." in k)
        results.append(AuthResult(method, pairs[0][1].lower(), props))
    return authserv_id, tuple(results)


def _domain(address: str | None) -> str:
    return (address or "").rpartition("@")[2].strip().strip(">").lower()


def _aligned(a: str, b: str) -> bool:
    # RFC 7489 §3.1.1 relaxed alignment compares organisational domains; "the same domain or a
    # subdomain of the other" approximates it without a public-suffix list.
    if "." not in a or "." not in b:
        return False
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def authenticated_sender(
    parsed: ParsedMessage, *, authserv_ids: frozenset[str] = frozenset()
) -> bool:
    """True when a trusted Authentication-Results shows dmarc=pass, or spf=pass with an
    smtp.mailfrom domain aligned with the From domain.

    Trusted: the headers whose authserv-id is in ``authserv_ids``; when that is empty, only the
    topmost one (added last, by the receiving server; RFC 8601 §5: the ones below may be forged).
    """
    from_domain = _domain(parsed.from_.address if parsed.from_ else None)
    if not from_domain:
        return False
    values = parsed.authentication_results
    ids = {i.lower() for i in authserv_ids}
    for value in values if ids else values[:1]:
        authserv_id, results = parse_authentication_results(value)
        if ids and authserv_id not in ids:
            continue
        for result in results:
            if result.result != "pass":
                continue
            if result.method == "dmarc":
                header_from = (result.prop("header.from") or from_domain).lower()
                if header_from == from_domain:
                    return True
            if result.method == "spf" and _aligned(
                _domain(result.prop("smtp.mailfrom")), from_domain
            ):
                return True
    return False


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
    if require_authenticated_sender and not authenticated_sender(parsed, authserv_ids=authserv_ids):
        return NoticeRecipient(None, "sender not authenticated")
    return NoticeRecipient(address)


# An addr-spec we can put in To: and RCPT TO: as it is: no whitespace, controls, brackets,
# quotes or RFC 2047 words (which a header policy would decode into CR/LF: header injection).
_PLAIN_ADDRESS = re.compile(
    r"[^\s<>()\[\]\\,;:@\"\x00-\x1f\x7f]+@[^\s<>()\[\]\\,;:@\"\x00-\x1f\x7f]+"
)
# A msg-id we may echo in In-Reply-To/References: printable ASCII, no angle brackets.
_ECHOABLE_MSG_ID = re.compile(r"[!-;=?-~]+@[!-;=?-~]+")


def _usable_address(address: str) -> bool:
    if "=?" in address or not _PLAIN_ADDRESS.fullmatch(address):
        return False
    try:
        headerregistry.Address(addr_spec=address)
    except (ValueError, IndexError, email.errors.HeaderParseError):
        return False
    return True


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
) -> EmailMessage:
    """The reject notice for ``original``: never its body, only its subject, date and id.

    ``sender`` is the notice's From (``Example <noreply@example.com>``); ``now`` must be
    timezone-aware; ``message_id`` defaults to a fresh one on the sender's domain (given, so
    ``make_msgid`` does not look up this host's name).
    """
    subject = _clean(original.subject, MAX_SUBJECT_CHARS)
    msg = EmailMessage(policy=policy.default)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = f"[Rejected] {subject}".rstrip()
    msg["Date"] = email.utils.format_datetime(now)
    domain = _domain(email.utils.parseaddr(sender)[1]) or "localhost"
    msg["Message-ID"] = message_id or email.utils.make_msgid("mailroom", domain=domain)
    original_id = original.message_id
    if original_id and "=?" not in original_id and _ECHOABLE_MSG_ID.fullmatch(original_id):
        msg["In-Reply-To"] = f"<{original_id}>"
        msg["References"] = f"<{original_id}>"
    msg["Auto-Submitted"] = "auto-replied"  # RFC 3834 §5.2
    msg["X-Auto-Response-Suppress"] = "All"  # Exchange: no out-of-office replies to this
    lines = ["Your email could not be delivered.", ""]
    lines.append(f"  Subject: {subject or '(no subject)'}")
    if original.date:
        lines.append(f"  Date: {original.date}")
    explanation = explain(reason, max_message_bytes=max_message_bytes)
    lines += ["", textwrap.fill(explanation, 72, break_long_words=False), ""]
    lines.append("This is an automatic reply; answers to it are not read.")
    if footer.strip():
        lines += ["", "-- ", footer.strip()]  # RFC 3676 §4.3 signature separator
    msg.set_content("\n".join(lines) + "\n")
    return msg


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
