"""Pure parsing: raw RFC 5322 bytes → ``ParsedMessage``. Never raises on bad mail.

Text fields come out as best-effort ``str`` whatever the charset damage (RFC 2047 words are
decoded, 8-bit header bytes are read as UTF-8 or else Windows-1252), never with a lone
surrogate; ``raw`` stays the exact bytes fetched. The stdlib parser runs with
``policy.compat32`` (six times faster than ``policy.default``, and it never raises on header
syntax), made linear and bounded by ``mime``; the decoding is done here. Hostile mail is read
within limits (``mime.MAX_PARTS``, ``MAX_HEADER_FIELDS``, ``MAX_DEPTH``, ``MAX_LINES``, and
``MAX_ADDRESSES`` here); what a limit cut is named in ``ParsedMessage.truncated``. No I/O here.
"""

from __future__ import annotations

import binascii
import email.utils
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from types import MappingProxyType

from mailroom.mail import mime
from mailroom.mail.mime import decode_bytes

__all__ = [
    "Address",
    "Attachment",
    "ParsedMessage",
    "decode_bytes",
    "decode_words",
    "parse",
    "scan_addresses",
]

# email.utils.getaddresses costs ~2 µs a character; longer address lists are scanned instead.
ADDRESS_PARSE_LIMIT = 16 * 1024
# Addresses kept per list (To, Cc, Reply-To); a longer list is cut (truncated: "addresses").
MAX_ADDRESSES = 1_000
# RFC 2047 §2 encoded-word; an optional RFC 2231 §5 language suffix after "*".
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
# An addr-spec-like token that starts right after a delimiter (the lookbehind keeps the scan
# linear: a long run without "@" is tried once, not once per character).
_ADDR_TOKEN = re.compile(r"(?<![^\s<>,;:\"'()\[\]])[^\s<>,;:\"'()\[\]@]+@[^\s<>,;:\"'()\[\]@]+")
_MIME_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_ADDR = r"[^<>\s\"(),;:@\\\[\]]+@[^<>\s\"(),;:@\\\[\]]+"
_SIMPLE_ADDRESS = re.compile(
    rf"\s*(?:(?:\"([^\"\\]*)\"|([^<>\"(),;:@\\\[\]]*))\s*<({_ADDR})>|({_ADDR}))\s*"
)
_MSG_ID = re.compile(r"<([^<>\s]+)>")


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox of an address header: display name (decoded) and addr-spec."""

    name: str
    address: str


@dataclass(frozen=True, slots=True)
class Attachment:
    """A non-body MIME part; ``size`` is the decoded payload length in bytes."""

    filename: str | None
    content_type: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedMessage:
    """What routing, notices and the webhook payload need to know of a message.

    ``unparsable`` is true when not a single header field could be read (empty input, binary
    garbage): routing rejects such mail instead of guessing. ``return_path`` is ``""`` for a
    null reverse-path (``Return-Path: <>``, RFC 5321 §4.5.5) and ``None`` when absent.
    ``headers`` values are unfolded and 8-bit-decoded but keep their RFC 2047 words (an address
    header must be split before its words are decoded, RFC 2047 §5); use ``decode_words``.
    ``truncated`` names the limits this message went over ("addresses", "header_fields",
    "lines", "nesting", "parameters", "parts"): what they cut is missing here (``raw`` is whole).
    """

    raw: bytes = field(repr=False)
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    message_id: str | None = None
    in_reply_to: str | None = None
    references: tuple[str, ...] = ()
    from_: Address | None = None
    reply_to: tuple[Address, ...] = ()
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    subject: str = ""
    date: str | None = None
    text: str | None = None
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    authentication_results: tuple[str, ...] = ()
    defects: tuple[str, ...] = ()
    truncated: tuple[str, ...] = ()
    return_path: str | None = None
    content_type: str = "text/plain"
    content_params: tuple[tuple[str, str], ...] = ()
    unparsable: bool = False
    _by_name: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index: dict[str, list[str]] = {}
        for key, value in self.headers:
            index.setdefault(key.lower(), []).append(value)
        frozen = {key: tuple(values) for key, values in index.items()}
        object.__setattr__(self, "_by_name", MappingProxyType(frozen))

    def header(self, name: str) -> tuple[str, ...]:
        """Every value of header ``name`` (case-insensitive), in order of appearance."""
        return self._by_name.get(name.lower(), ())

    def first(self, name: str) -> str | None:
        """The topmost value of header ``name``, or None."""
        values = self._by_name.get(name.lower())
        return values[0] if values else None

    def param(self, name: str) -> str | None:
        """A parameter of the top-level Content-Type (lower-case name), or None."""
        return next((v for k, v in self.content_params if k == name), None)


def _decode_word(charset: str, encoding: str, text: str) -> bytes | None:
    if not text.isascii():
        return None
    data = text.encode("ascii")
    if encoding in "qQ":
        return binascii.a2b_qp(data, header=True)
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4), strict_mode=True)
    except binascii.Error:
        return None


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded-words; broken ones stay as written.

    Adjacent words are joined before decoding, so a multibyte character split across two words
    survives; whitespace between encoded-words is dropped (RFC 2047 §6.2).
    """
    if "=?" not in value:
        return value
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    pos = 0
    after_word = False
    for match in _ENCODED_WORD.finditer(value):
        gap = value[pos : match.start()]
        charset, encoding, text = match.groups()
        data = _decode_word(charset, encoding, text)
        pos = match.end()
        if data is None:
            if pending:
                out.append(decode_bytes(bytes(pending), pending_charset))
                pending.clear()
            out.extend((gap, match.group(0)))
            after_word = False
            continue
        if after_word and (not gap or gap.isspace()) and charset.lower() == pending_charset:
            pending += data
            continue
        if pending:
            out.append(decode_bytes(bytes(pending), pending_charset))
            pending.clear()
        if not (after_word and (not gap or gap.isspace())):
            out.append(gap)
        pending += data
        pending_charset = charset.lower()
        after_word = True
    if pending:
        out.append(decode_bytes(bytes(pending), pending_charset))
    out.append(value[pos:])
    return "".join(out)


def _header_text(value: str) -> str:
    """A raw header value (compat32, surrogate-escaped 8-bit bytes) as readable, unfolded text."""
    value = mime.text_of(value)
    # Unfold (RFC 5322 §2.2.3): drop the CRLF of each fold, keep the whitespace after it.
    return value.replace("\r", "").replace("\n", "").strip()


def scan_addresses(text: str, limit: int | None = None) -> list[str]:
    """The addr-spec-like tokens in ``text`` (the first ``limit``), in order; linear time."""
    return [m.group() for m in itertools.islice(_ADDR_TOKEN.finditer(text), limit)]


def _addresses(values: Iterable[str], truncated: set[str]) -> tuple[Address, ...]:
    """The addresses of an address header, at most ``MAX_ADDRESSES`` (noted in ``truncated``)."""
    found = _all_addresses(", ".join(values))
    if len(found) > MAX_ADDRESSES:
        truncated.add("addresses")
        return found[:MAX_ADDRESSES]
    return found


def _all_addresses(joined: str) -> tuple[Address, ...]:
    if not joined:
        return ()
    if len(joined) < 1000 and (simple := _SIMPLE_ADDRESS.fullmatch(joined)):
        # The common `Name <addr>` or bare `addr`: getaddresses costs 10 µs each.
        quoted, name, addr, bare = simple.groups()
        name = quoted if quoted is not None else name
        return (
            (Address(decode_words(name.strip()), addr),) if bare is None else (Address("", bare),)
        )
    if len(joined) <= ADDRESS_PARSE_LIMIT:
        try:
            pairs = email.utils.getaddresses([joined])
        except Exception:  # RecursionError on "((((...", IndexError on odd quoting
            pass
        else:
            result: list[Address] = []
            for name, addr in pairs:
                if " " in addr or not addr.isprintable():  # `Name a@b` without brackets
                    result.extend(Address("", a) for a in scan_addresses(addr))
                elif "@" in addr:
                    result.append(Address(decode_words(name), addr))
            return tuple(result)
    return tuple(Address("", a) for a in scan_addresses(joined, MAX_ADDRESSES + 1))


def _msg_ids(value: str | None) -> tuple[str, ...]:
    """Message ids in ``<...>``; RFC 5322 §3.6.4 separates them with CFWS, Exchange with commas."""
    if not value:
        return ()
    ids = _MSG_ID.findall(value)
    if ids:
        return tuple(ids)
    return tuple(t for t in (t.strip("<>") for t in value.replace(",", " ").split()) if t)


def _params(part: mime.Part, header: str) -> tuple[str, dict[str, str]]:
    """The value and parameters of a MIME header as text (a repeated parameter: the last)."""
    split = part.split(header)
    if split is None:
        return "", {}
    value, params = split
    return value, {name: _header_text(text) for name, text in params}


def _content_type(part: mime.Part) -> tuple[str, dict[str, str]]:
    """The part's type; syntactically invalid or missing means text/plain (RFC 2045 §5.2)."""
    value, params = _params(part, "content-type")
    return (value if _MIME_TYPE.fullmatch(value) else "text/plain"), params


def _payload(part: mime.Part) -> bytes:
    try:
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            return payload
        raw = part.get_payload()  # what decoding refused, as it came
        return raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""
    except Exception:  # broken base64/quoted-printable/uuencode
        return b""


# A base64 body as a writer that follows RFC 2045 §6.8 sends it: lines of the alphabet, the
# padding at the end. Possessive: linear, whatever the input.
_BASE64_LINES = re.compile(r"(?:[A-Za-z0-9+/]*+\r?\n)*+")
_BASE64_END = re.compile(r"[A-Za-z0-9+/]*+(={0,2})(?:\r?\n)*+")
# The lines are matched this many characters at a time: a match holds the GIL, and a large
# message is parsed in a worker thread beside the event loop (25 MB in one match: 67 ms).
_MATCH_CHARS = 1024 * 1024


def _base64_size(payload: str, step: int = _MATCH_CHARS) -> int | None:
    """What ``get_payload(decode=True)`` of a well-formed base64 body would measure, counted
    instead of decoded (decoding a 25 MB attachment to measure it costs 1.7 times its size more
    at the peak: the stdlib joins its lines twice); None for anything else (or for a line
    longer than ``step``), which is decoded as before."""
    pos = 0
    while (lines := _BASE64_LINES.match(payload, pos, pos + step)) and lines.end() > pos:
        pos = lines.end()
    match = _BASE64_END.fullmatch(payload, pos)
    if match is None:
        return None
    padding = len(match.group(1))
    chars = len(payload) - payload.count("\n") - payload.count("\r") - padding
    if (chars + padding) % 4 or (padding and chars % 4 != 4 - padding):
        return None  # decode_b pads or repairs it: let it
    return chars // 4 * 3 + chars % 4 * 3 // 4


def _size(part: mime.Part) -> int:
    if not part.is_multipart():
        # As Message.get_payload(decode=True) reads the transfer encoding.
        if str(part.get("content-transfer-encoding", "")).lower() == "base64":
            payload = part.get_payload()
            if isinstance(payload, str) and (size := _base64_size(payload)) is not None:
                return size
        return len(_payload(part))
    try:  # message/rfc822: the enclosed message, re-serialised
        return len(part.as_bytes(policy=policy.compat32))
    except Exception:
        return 0


def _as_str_text(text: str) -> str:
    """Text as Python and JSON consumers expect it: LF line ends (RFC 5322 wire form is
    CRLF), and no NUL."""
    return text.replace("\r\n", "\n").replace("\x00", "\ufffd")


def _bodies(
    msg: mime.Part, msg_type: tuple[str, dict[str, str]]
) -> tuple[str | None, str | None, tuple[Attachment, ...]]:
    """First inline text/plain and text/html; every other leaf is an attachment.

    ``msg_type`` is ``_content_type(msg)``, known already. A container nested too deep
    (``mime.MAX_DEPTH``) was not read: it is left out.
    """
    text = html = None
    attachments: list[Attachment] = []
    stack = [msg]
    while stack:
        part = stack.pop()
        if part.opaque:
            continue
        content_type, params = msg_type if part is msg else _content_type(part)
        if content_type.startswith("multipart/"):
            # Only a multipart's get_payload() is its list: any other decodes, and may raise.
            children = part.get_payload() if part.is_multipart() else None
            if isinstance(children, list):
                stack.extend(c for c in reversed(children) if isinstance(c, mime.Part))
                continue
            content_type = "text/plain"  # no boundary found (RFC 2046 §5.1.1)
        disposition, disposition_params = _params(part, "content-disposition")
        filename = disposition_params.get("filename") or params.get("name")
        # NUL is legal in a str but refused by most databases (PostgreSQL text): replace it.
        if disposition != "attachment" and filename is None:
            if content_type == "text/plain" and text is None:
                text = _as_str_text(decode_bytes(_payload(part), params.get("charset")))
                continue
            if content_type == "text/html" and html is None:
                html = _as_str_text(decode_bytes(_payload(part), params.get("charset")))
                continue
        if filename is not None:  # Outlook writes RFC 2047 words here
            filename = decode_words(filename)
        attachments.append(Attachment(filename, content_type, _size(part)))
    return text, html, tuple(attachments)


def parse(raw: bytes) -> ParsedMessage:
    """Parse ``raw``; damaged mail yields what could be read and a note in ``defects``."""
    try:
        return _parse(raw)
    except Exception as exc:  # a bug, not the mail's fault; the fuzz tests look for this defect
        return _unparsable(raw, [f"InternalError:{type(exc).__name__}"])


def _parse(raw: bytes) -> ParsedMessage:
    msg, budget = mime.read(raw)
    defects: list[str] = []
    truncated = budget.truncated
    headers = tuple((str(k), _header_text(str(v))) for k, v in msg.raw_items())
    if not headers:
        defects.append("NoHeaders")
        return _unparsable(raw, defects)
    defects.extend(type(d).__name__ for d in msg.defects)
    index: dict[str, list[str]] = {}
    for key, value in headers:
        index.setdefault(key.lower(), []).append(value)

    def header(name: str) -> list[str]:
        return index.get(name, [])

    def first(name: str) -> str | None:
        values = index.get(name)
        return values[0] if values else None

    date = None
    if (date_header := first("date")) is not None:
        try:
            date = _iso_date(date_header)
        except (TypeError, ValueError, IndexError, OverflowError):
            defects.append("InvalidDate")
    content_type, params = _content_type(msg)
    text, html, attachments = _bodies(msg, (content_type, params))
    return_path = first("return-path")
    if return_path is not None:  # "<>" is the null reverse-path (RFC 5321 §4.5.5)
        scanned = scan_addresses(return_path, 1)
        return_path = scanned[0] if scanned else return_path.strip("<> \t")
    froms = _addresses(header("from"), truncated)
    in_reply_to = _msg_ids(first("in-reply-to"))
    return ParsedMessage(
        raw=raw,
        headers=headers,
        message_id=next(iter(_msg_ids(first("message-id"))), None),
        in_reply_to=in_reply_to[0] if in_reply_to else None,
        references=_msg_ids(" ".join(header("references"))),
        from_=froms[0] if froms else None,
        reply_to=_addresses(header("reply-to"), truncated),
        to=_addresses(header("to"), truncated),
        cc=_addresses(header("cc"), truncated),
        subject=decode_words(first("subject") or ""),
        date=date,
        text=text,
        html=html,
        attachments=attachments,
        authentication_results=tuple(header("authentication-results")),
        defects=tuple(defects),
        truncated=tuple(sorted(truncated)),
        return_path=return_path,
        content_type=content_type,
        content_params=tuple(params.items()),
    )


# The RFC 5322 §3.3 date as nearly every client writes it ("Sun, 22 Nov 2026 10:00:00 +0000",
# an optional comment after it), read without the stdlib's general parse.
_DATE = re.compile(
    r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?([0-9]{1,2}) "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ([1-9][0-9]{3}) "
    r"([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})(?: \([^()]*\))?"
)
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}


def _iso_date(value: str) -> str:
    """The date as ISO 8601, always with an offset: ``-0000`` ("UTC, the local zone unknown",
    RFC 5322 §3.3) and an obsolete or missing zone (§4.3: read as ``-0000``) become ``+00:00``,
    where the stdlib gives a naive time. Raises what ``email.utils.parsedate_to_datetime``
    raises."""
    match = _DATE.fullmatch(value)
    if match is None:
        parsed = email.utils.parsedate_to_datetime(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.isoformat()
    day, month, year, hour, minute, second, sign, zone_hours, zone_minutes = match.groups()
    fields = (int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second))
    offset = int(zone_hours) * 3600 + int(zone_minutes) * 60
    if sign == "-":
        offset = -offset
    return datetime(*fields, tzinfo=timezone(timedelta(seconds=offset))).isoformat()


def _unparsable(raw: bytes, defects: list[str]) -> ParsedMessage:
    return ParsedMessage(raw=raw, headers=(), defects=tuple(defects), unparsable=True)
