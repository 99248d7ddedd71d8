"""Pure parsing: raw RFC 5322 bytes → ``ParsedMessage``. Never raises on bad mail.

Text fields come out as best-effort ``str`` whatever the charset damage (RFC 2047 words are
decoded, 8-bit header bytes are read as UTF-8 or else Windows-1252); ``raw`` stays the exact
bytes fetched. The stdlib parser runs with ``policy.compat32``: it is six times faster than
``policy.default`` and never raises on header syntax; the decoding is done here instead.
No I/O here.
"""

from __future__ import annotations

import binascii
import email.parser
import email.utils
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email import policy
from email.message import Message
from types import MappingProxyType

__all__ = [
    "Address",
    "Attachment",
    "ParsedMessage",
    "decode_bytes",
    "decode_words",
    "parse",
    "scan_addresses",
]

_PARSER = email.parser.BytesParser(policy=policy.compat32)
# The stdlib parser recurses once per multipart or message/rfc822 level and slows down
# quadratically with depth (900 levels: 0.3 s, 1000: RecursionError). Mail declaring more
# nested containers than this is read for its headers only; the walk below stops at MAX_DEPTH.
MAX_CONTAINERS = 256
MAX_DEPTH = 64
# email.utils.getaddresses costs ~2 µs a character; longer address lists are scanned instead.
ADDRESS_PARSE_LIMIT = 16 * 1024
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
# WHATWG-style relabelling of charsets that mail gets wrong or Python does not know.
_CHARSET_ALIASES: Mapping[str, str | None] = {
    "us-ascii": None,
    "ascii": None,
    "unknown-8bit": None,
    "x-unknown": None,
    "iso-8859-1": "cp1252",
    "latin1": "cp1252",
    "gb2312": "gbk",
    "iso-8859-8-i": "iso-8859-8",
    "ks_c_5601-1987": "cp949",
}


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


def decode_bytes(data: bytes, charset: str | None) -> str:
    """``data`` as text: the declared charset when Python knows it, else UTF-8, else cp1252."""
    if charset:
        label = charset.strip().strip("\"'").lower()
        codec = _CHARSET_ALIASES.get(label, label)
        if codec:
            try:
                return data.decode(codec, "replace")
            except (LookupError, UnicodeError, ValueError, TypeError):
                pass  # unknown charset, or a bytes-to-bytes codec such as "base64"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace")


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
    if not value.isascii():
        # BytesParser keeps 8-bit bytes as surrogate escapes; RFC 6532 says they are UTF-8.
        # Text the stdlib already decoded (an RFC 2231 parameter) goes back to UTF-8 as well.
        value = decode_bytes(value.encode("utf-8", "surrogateescape"), None)
    # Unfold (RFC 5322 §2.2.3): drop the CRLF of each fold, keep the whitespace after it.
    return value.replace("\r", "").replace("\n", "").strip()


def scan_addresses(text: str) -> list[str]:
    """Every addr-spec-like token in ``text``, in order; linear time on any input."""
    return _ADDR_TOKEN.findall(text)


def _addresses(values: Iterable[str]) -> tuple[Address, ...]:
    joined = ", ".join(values)
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
    return tuple(Address("", addr) for addr in scan_addresses(joined))


def _msg_ids(value: str | None) -> tuple[str, ...]:
    """Message ids in ``<...>``; RFC 5322 §3.6.4 separates them with CFWS, Exchange with commas."""
    if not value:
        return ()
    ids = _MSG_ID.findall(value)
    if ids:
        return tuple(ids)
    return tuple(t for t in (t.strip("<>") for t in value.replace(",", " ").split()) if t)


def _simple_params(value: str) -> tuple[str, dict[str, str]]:
    """``_params`` for a value without quotes, backslashes, ``*`` or ``<``: what
    ``Message.get_params`` returns for it (split on ``;`` and the first ``=``, stripped), without
    its quoting round trips (a third of the parse of a small message)."""
    first, *rest = value.split(";")
    params: dict[str, str] = {}
    for param in rest:
        name, _, param_value = param.partition("=")
        params[name.strip().lower()] = param_value.strip()
    return first.partition("=")[0].strip().lower(), params


def _params(part: Message, header: str) -> tuple[str, dict[str, str]]:
    """The value and parameters of a MIME header, RFC 2231 values collapsed; never raises."""
    try:
        value = part.get(header)
        if value is None:
            return "", {}
        if (
            isinstance(value, str)  # not a Header: 8-bit bytes take the stdlib's way
            and value.isascii()
            and '"' not in value
            and "\\" not in value
            and "*" not in value
            and "<" not in value
        ):
            return _simple_params(value)
        pairs = part.get_params(header=header) or []
        params = {
            str(k).lower(): email.utils.collapse_rfc2231_value(v) if isinstance(v, tuple) else v
            for k, v in pairs[1:]
        }
        return (str(pairs[0][0]).lower() if pairs else ""), params
    except Exception:
        return "", {}


def _content_type(part: Message) -> tuple[str, dict[str, str]]:
    """The part's type; syntactically invalid or missing means text/plain (RFC 2045 §5.2).

    Kept on the part: parsing the parameters is the costliest step of a small message, and
    the body walk and the summary both ask.
    """
    cached: tuple[str, dict[str, str]] | None = getattr(part, "_mailroom_content_type", None)
    if cached is None:
        value, params = _params(part, "content-type")
        cached = (value if _MIME_TYPE.fullmatch(value) else "text/plain"), params
        part._mailroom_content_type = cached  # type: ignore[attr-defined]
    return cached


def _payload(part: Message) -> bytes:
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # broken base64/quoted-printable/uuencode
        payload = None
    if isinstance(payload, bytes):
        return payload
    raw = part.get_payload()
    return raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""


def _size(part: Message) -> int:
    if not part.is_multipart():
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
    msg: Message, defects: list[str]
) -> tuple[str | None, str | None, tuple[Attachment, ...]]:
    """First inline text/plain and text/html; every other leaf is an attachment."""
    text = html = None
    attachments: list[Attachment] = []
    stack: list[tuple[Message, int]] = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        content_type, params = _content_type(part)
        if content_type.startswith("multipart/"):
            children = part.get_payload()
            if not isinstance(children, list):  # no boundary found (RFC 2046 §5.1.1)
                content_type = "text/plain"
            elif depth >= MAX_DEPTH:
                defects.append("NestingTooDeep")
                continue
            else:
                stack.extend((c, depth + 1) for c in reversed(children) if isinstance(c, Message))
                continue
        disposition, disposition_params = _params(part, "content-disposition")
        filename = disposition_params.get("filename") or params.get("name")
        # NUL is legal in a str but refused by most databases (PostgreSQL text): replace it.
        if disposition != "attachment" and filename is None:
            if content_type == "text/plain" and text is None:
                text = decode_bytes(_payload(part), params.get("charset"))
                text = _as_str_text(text)
                continue
            if content_type == "text/html" and html is None:
                html = decode_bytes(_payload(part), params.get("charset"))
                html = _as_str_text(html)
                continue
        if filename is not None:  # Outlook writes RFC 2047 words here
            filename = decode_words(_header_text(filename))
        attachments.append(Attachment(filename, content_type, _size(part)))
    return text, html, tuple(attachments)


# What opens a container: a boundary parameter in any case and spelling (RFC 2045 §5.1,
# RFC 2231 continuations) or an enclosed message/rfc822. Counted, not parsed: linear time.
_CONTAINER_MARKER = re.compile(rb"boundary\s*(?:\*\d*\*?)?\s*=|rfc822", re.IGNORECASE)


def _nesting_markers(raw: bytes) -> int:
    """An upper bound on the container markers, exact when it is over ``MAX_CONTAINERS``."""
    # Cheapest first (one-byte counts are several times faster than multi-byte ones): every
    # boundary marker ends in its own "=", every rfc822 holds its own "8".
    upper_bound = raw.count(b"=") + raw.count(b"8")
    if upper_bound <= MAX_CONTAINERS:
        return upper_bound
    lowered = raw.lower()
    upper_bound = lowered.count(b"boundary") + lowered.count(b"rfc822")
    if upper_bound <= MAX_CONTAINERS:  # the common case, at C speed
        return upper_bound
    return sum(1 for _ in _CONTAINER_MARKER.finditer(raw))


# The end of the header block, r"\r?\n\r?\n", found by its first LF: a pattern that starts
# with a literal is searched for six times faster. The CR before that LF, if any, is
# added back in ``_parse_single_part``.
_HEADER_END = re.compile(rb"\n\r?\n")
# One header field as the compat32 feed parser reads it (headerRE, _parse_headers,
# header_source_parse), minus the unix-from line and the empty name: its name, and its value
# after the colon and any spaces and tabs, with its continuation lines (their line ends kept).
# Linear: no part of it can match what another part does.
_FIELD = re.compile(r"([\041-\071\073-\176]+):[ \t]*([^\n]*(?:\n[ \t][^\n]*)*)(?:\n|\Z)")


def _header_fields(block: str) -> list[tuple[str, str]] | None:
    """The fields of a header block (without its final line end) exactly as the compat32 feed
    parser stores them, for a block it reads without a defect; None for anything else (a lone
    CR, a unix-from line, a line that is neither a field nor a continuation), which the stdlib
    parser then reads."""
    if "\r" in block and block.count("\r") != block.count("\r\n"):
        return None
    fields: list[tuple[str, str]] = []
    pos, size = 0, len(block)
    while pos < size:
        match = _FIELD.match(block, pos)
        if match is None:
            return None
        fields.append((match[1], match[2].rstrip("\r\n")))
        pos = match.end()
    return fields


def _parse_single_part(raw: bytes) -> Message | None:
    """The common case fast: a message that is not multipart has its header block parsed
    and its body set whole, skipping the feed parser's line-by-line walk (about 3 times
    faster for 2 KB). Anything multipart, message/*, or oddly framed takes the full parser.
    """
    end = _HEADER_END.search(raw)
    if end is None:
        return None
    start = end.start()
    if start and raw[start - 1] == 0x0D:  # CR
        start -= 1
    # As BytesParser does: ASCII with surrogate escapes for 8-bit bytes.
    fields = _header_fields(raw[:start].decode("ascii", "surrogateescape"))
    if fields is not None:
        msg = Message(policy=policy.compat32)
        for name, value in fields:
            msg.set_raw(name, value)
    else:
        msg = _PARSER.parsebytes(raw[:start] + b"\r\n", headersonly=True)
    if msg.defects or msg.get_content_maintype() in ("multipart", "message"):
        return None
    # As BytesParser does: the body as ASCII with surrogate escapes, decoded on demand.
    msg.set_payload(raw[end.end() :].decode("ascii", "surrogateescape"))
    return msg


def parse(raw: bytes) -> ParsedMessage:
    """Parse ``raw``; damaged mail yields what could be read and a note in ``defects``."""
    defects: list[str] = []
    headers_only = _nesting_markers(raw) > MAX_CONTAINERS
    if headers_only:
        defects.append("TooManyContainers")
    try:
        msg = _parse_single_part(raw) if not headers_only else None
        if msg is None:
            msg = _PARSER.parsebytes(raw, headersonly=headers_only)
    except Exception as exc:  # RecursionError or worse: a last resort
        defects.append(f"Unparsable:{type(exc).__name__}")
        try:
            msg = _PARSER.parsebytes(raw, headersonly=True)
        except Exception:
            return _unparsable(raw, defects)
        headers_only = True
    try:
        headers = tuple((str(k), _header_text(str(v))) for k, v in msg.raw_items())
    except Exception as exc:
        defects.append(f"UnreadableHeaders:{type(exc).__name__}")
        return _unparsable(raw, defects)
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
    text = html = None
    attachments: tuple[Attachment, ...] = ()
    if not headers_only:
        text, html, attachments = _bodies(msg, defects)
    content_type, params = _content_type(msg)
    return_path = first("return-path")
    if return_path is not None:  # "<>" is the null reverse-path (RFC 5321 §4.5.5)
        scanned = scan_addresses(return_path)
        return_path = scanned[0] if scanned else return_path.strip("<> \t")
    froms = _addresses(header("from"))
    in_reply_to = _msg_ids(first("in-reply-to"))
    return ParsedMessage(
        raw=raw,
        headers=headers,
        message_id=next(iter(_msg_ids(first("message-id"))), None),
        in_reply_to=in_reply_to[0] if in_reply_to else None,
        references=_msg_ids(" ".join(header("references"))),
        from_=froms[0] if froms else None,
        reply_to=_addresses(header("reply-to")),
        to=_addresses(header("to")),
        cc=_addresses(header("cc")),
        subject=decode_words(first("subject") or ""),
        date=date,
        text=text,
        html=html,
        attachments=attachments,
        authentication_results=tuple(header("authentication-results")),
        defects=tuple(defects),
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
    """``email.utils.parsedate_to_datetime(value).isoformat()``, and its exceptions."""
    match = _DATE.fullmatch(value)
    if match is None:
        return email.utils.parsedate_to_datetime(value).isoformat()
    day, month, year, hour, minute, second, sign, zone_hours, zone_minutes = match.groups()
    fields = (int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second))
    offset = int(zone_hours) * 3600 + int(zone_minutes) * 60
    if sign == "-":
        if offset == 0:  # -0000: UTC, the local zone unknown (RFC 5322 §3.3); naive, as stdlib
            return datetime(*fields).isoformat()
        offset = -offset
    return datetime(*fields, tzinfo=timezone(timedelta(seconds=offset))).isoformat()


def _unparsable(raw: bytes, defects: list[str]) -> ParsedMessage:
    return ParsedMessage(raw=raw, headers=(), defects=tuple(defects), unparsable=True)
