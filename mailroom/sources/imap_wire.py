"""Pure IMAP wire details: what a server sends, split into lines and literals within bounds
(``Framer``, ``Limits``), sequence sets, mailbox names, FETCH responses (RFC 3501), folder
names against the server's hierarchy (``Hierarchy``: NAMESPACE, RFC 2342), LOGIN's arguments
(``login_segments``), and the keyword older versions kept a dead letter's webhook-id in
(``id_keyword``).

No I/O and no aioimaplib here; ``imap_session`` feeds the framer the bytes it receives and
these functions the lines aioimaplib produced. Every number a server sends is checked before it
is used (RFC 3501 §9: a UID is a non-zero 32-bit number; RFC 9051 §9: a size fits 63 bits).
"""

from __future__ import annotations

import base64
import datetime
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mailroom.errors import ImapLimitError
from mailroom.redact import printable

__all__ = [
    "ID_KEYWORD_PREFIX",
    "LINE_BYTES",
    "RESPONSE_BYTES",
    "SMALL_LITERAL_BYTES",
    "UID_MAX",
    "BodyLimits",
    "Event",
    "FetchedMessage",
    "Framer",
    "Hierarchy",
    "Limits",
    "capability_code",
    "fetch_flags",
    "id_keyword",
    "literal_slack",
    "login_segments",
    "mailbox_name",
    "number",
    "parse_fetch",
    "parse_list_delimiter",
    "parse_namespace",
    "response_text",
    "told_capabilities",
    "uid_set",
]

# Up to the next bracket either way: linear in the line, however many "[" it holds.
_CAPABILITY_CODE = re.compile(rb"\[CAPABILITY ([^\]\[]*)\]", re.IGNORECASE)
UID_MAX = 2**32 - 1  # RFC 3501 §9: nz-number, a 32-bit unsigned integer
SIZE_MAX = 2**63 - 1  # RFC 9051 §9: number64

# What a server may send (the Framer's Limits; imap_session sets larger ones per command):
LINE_BYTES = 1024 * 1024  # one response line; a SEARCH answer may be longer (imap_session)
RESPONSE_BYTES = 4 * 1024 * 1024  # one command's untagged lines and literals, besides bodies
SMALL_LITERAL_BYTES = 64 * 1024  # a literal where no message body is expected
LINE_COST = 64  # what a line costs in memory beyond its bytes (a bytes object, a list slot)

_FETCH_HEAD = re.compile(rb"^(\d+) FETCH \(")
_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_LITERAL_DIGITS = 20  # "{" + at most this many digits + "}" ends a line that announces a literal
_FLAGS = re.compile(rb"\bFLAGS \(")
# RFC 3501 §9 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz", the day may be space-padded.
_INTERNALDATE = re.compile(
    rb'\bINTERNALDATE "([ \d]\d)-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"'
)
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")

# A dead letter moved to failed_folder gets a new UID there, and another when it is moved back:
# its webhook-id (from the inbox's UIDVALIDITY and UID) could not be computed again. So the
# watcher stores it, before the move, as a keyword that travels with the message (RFC 3501
# §2.3.2 keywords; COPY and MOVE keep flags, RFC 3501 §6.4.7, RFC 6851 §3.3), and a message
# that carries one is posted under that id. 44 characters: within Dovecot's default
# mail_max_keyword_length of 50.
ID_KEYWORD_PREFIX = "$MailroomId_"
_ID_KEYWORD = re.compile(rb"^\$mailroomid_([0-9a-f]{32})$", re.IGNORECASE)


def id_keyword(webhook_id: str) -> str:
    """The keyword that carries ``webhook_id`` (``msg_`` + 32 hex digits)."""
    return ID_KEYWORD_PREFIX + webhook_id.removeprefix("msg_")


def number(text: bytes, maximum: int, *, minimum: int = 0) -> int | None:
    """``text`` (ASCII digits) as an int within ``minimum..maximum``, or None. Linear: a
    5,000-digit number is refused by its length, never converted."""
    if not text.isdigit() or len(text) > len(str(maximum)):
        return None
    value = int(text)
    return value if minimum <= value <= maximum else None


def literal_slack(size: int) -> int:
    """How much longer than announced a message may be: ``RFC822.SIZE`` is an estimate on
    some servers (Exchange, unless ``Set-ImapSettings -EnableExactRFC822Size``), or counts the
    LF line ends of a stored file that is sent with CRLF."""
    return 64 * 1024 + size // 8


class Limits:
    """What the server may send until the next tagged response: lines of at most
    ``line_bytes``, ``response_bytes`` in all, literals of at most ``SMALL_LITERAL_BYTES``."""

    def __init__(self, *, line_bytes: int = LINE_BYTES, response_bytes: int = RESPONSE_BYTES):
        self.line_bytes = line_bytes
        self.response_bytes = response_bytes

    def check_literal(self, line: bytes, size: int) -> None:
        """Refuse (``ImapLimitError``) a literal of ``size`` bytes announced by ``line``."""
        if size > SMALL_LITERAL_BYTES:
            raise ImapLimitError(
                f"the server announced a literal of {size} bytes where at most "
                f"{SMALL_LITERAL_BYTES} are expected ({_shown(line)})"
            )


class BodyLimits(Limits):
    """A FETCH of message bodies: each literal at most the message's announced size (from
    ``RFC822.SIZE`` in the same response, else ``sizes`` by UID) or ``cap``, whichever is
    smaller, plus ``literal_slack``; all of them, plus the usual, in ``response_bytes``."""

    def __init__(self, cap: int, sizes: Mapping[int, int] | None = None, *, count: int = 1):
        self.cap = cap
        self.sizes = sizes or {}
        expected = sum(min(cap, s) + literal_slack(min(cap, s)) for s in self.sizes.values())
        expected = max(expected, count * (cap + literal_slack(cap)))
        super().__init__(response_bytes=RESPONSE_BYTES + expected)
        self._uid: int | None = None  # of the FETCH response being read
        self._size: int | None = None

    def check_literal(self, line: bytes, size: int) -> None:
        if _FETCH_HEAD.match(line.removeprefix(b"* ")):
            uid = _UID.search(line)
            announced = _SIZE.search(line)
            self._uid = number(uid.group(1), UID_MAX, minimum=1) if uid else None
            sizes = [self.sizes.get(self._uid)] if self._uid is not None else []
            if announced:
                sizes.append(number(announced.group(1), SIZE_MAX))
            known = [size for size in sizes if size is not None]
            self._size = max(known) if known else None  # a size learned before may be larger
        base = self.cap if self._size is None else min(self.cap, self._size)
        limit = base + literal_slack(base)
        if size > limit:
            which = f"uid {self._uid}" if self._uid is not None else "a message"
            said = f"announced as {self._size} bytes" if self._size is not None else "expected"
            raise ImapLimitError(
                f"the server sent {which} as a literal of {size} bytes, {said} (at most "
                f"{limit} taken)",
                uid=self._uid,
                size=size,
            )


Event = tuple[bytes, int | None] | bytearray


class Framer:
    """Splits what the server sends into lines (without CRLF) and literals, in time linear in
    the bytes received and memory bounded by ``limits``: a line too long, a literal larger than
    its place allows, or more untagged data than one command may receive raise
    ``ImapLimitError`` before the bytes are kept.

    ``feed`` yields ``(line, literal size or None)`` for each line and the ``bytearray`` of
    each literal once it is complete (RFC 3501 §4.3: a line ending in ``{n}`` is followed by
    n bytes, then the rest of the line). ``settled()`` starts the next command's count (at a
    tagged response)."""

    def __init__(self) -> None:
        self.limits = Limits()
        self.spent = 0  # bytes received since the last tagged response
        self._partial = bytearray()  # a line not yet ended by CRLF
        self._literal: bytearray | None = None
        self._left = 0  # bytes of the literal still to come

    @property
    def in_literal(self) -> bool:
        return self._literal is not None

    @property
    def quiet(self) -> bool:
        """Nothing received since ``settled()``: no line, no part of one."""
        return self.spent == 0 and not self._partial and self._literal is None

    def settled(self) -> None:
        self.spent = 0

    def feed(self, data: bytes) -> Iterator[Event]:
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._literal is not None:
                take = min(self._left, end - pos)
                self._literal += view[pos : pos + take]
                pos += take
                self._left -= take
                if not self._left:
                    literal, self._literal = self._literal, None
                    yield literal
                continue
            if self._partial.endswith(b"\r") and data[pos] == 0x0A:  # CR | LF across two reads
                line = bytes(memoryview(self._partial)[:-1])
                self._partial.clear()
                pos += 1
            else:
                found = data.find(b"\r\n", pos)
                if found < 0:
                    self._check_line(len(self._partial) + end - pos, data[pos : pos + 40])
                    self._partial += view[pos:]
                    return
                self._check_line(len(self._partial) + found - pos, data[pos : pos + 40])
                if self._partial:
                    self._partial += view[pos:found]
                    line = bytes(self._partial)
                    self._partial.clear()
                else:
                    line = data[pos:found]
                pos = found + 2
            self._charge(len(line) + LINE_COST)
            size = _announced_literal(line)
            if size is not None:
                self.limits.check_literal(line, size)
                self._charge(size)
                self._literal = bytearray()
                self._left = size
            yield line, size
            if size == 0:
                self._literal = None
                yield bytearray()

    def _check_line(self, length: int, start: bytes) -> None:
        if length > self.limits.line_bytes:
            head = bytes(self._partial[:40]) or start
            raise ImapLimitError(
                f"the server sent a line of more than {self.limits.line_bytes} bytes "
                f"({_shown(head)}...)"
            )

    def _charge(self, size: int) -> None:
        self.spent += size
        if self.spent > self.limits.response_bytes:
            raise ImapLimitError(
                f"the server sent more than {self.limits.response_bytes} bytes of responses "
                "to one command"
            )


def _announced_literal(line: bytes) -> int | None:
    """The size of the literal ``line`` announces (``... {123}``), or None. A size of more
    digits than any bound needs is refused as too large."""
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    digits = line[start + 1 : -1]
    if start < 0 or not digits.isdigit():
        return None
    if len(digits) > _LITERAL_DIGITS:
        raise ImapLimitError(f"the server announced a literal of {len(digits)} digits")
    return int(digits)


def _shown(line: bytes) -> str:
    return printable(line[:60].decode("latin-1"), 60)


@dataclass(frozen=True, slots=True)
class FetchedMessage:
    uid: int
    size: int
    body: bytes | None  # None when only the size was asked for
    webhook_id: str | None = None  # from an id keyword in FLAGS (``id_keyword``)
    internal_date: datetime.datetime | None = None  # INTERNALDATE, when asked for


def uid_set(uids: Iterable[int]) -> str:
    """Compress UIDs into an IMAP sequence set: ``1:3,7,9:10`` (RFC 3501 §9, sequence-set)."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("empty UID set")
    parts: list[str] = []
    start = prev = ordered[0]
    for uid in [*ordered[1:], None]:
        if uid is not None and uid == prev + 1:
            prev = uid
            continue
        parts.append(str(start) if start == prev else f"{start}:{prev}")
        if uid is not None:
            start = prev = uid
    return ",".join(parts)


def mailbox_name(name: str) -> str:
    """Quote a mailbox name, in modified UTF-7 when it is not ASCII (RFC 3501 §5.1.3)."""
    if name.upper() == "INBOX":
        return "INBOX"
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    encoded = "".join(out).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{encoded}"'


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """How a server names folders: its hierarchy delimiter (None: a flat server) and the
    prefixes of its namespaces (RFC 2342): ``personal`` is ``""`` on Dovecot, Exchange and
    Gmail, ``"INBOX."`` on Cyrus and Courier, whose folders all live under INBOX."""

    delimiter: str | None
    personal: str = ""
    others: tuple[str, ...] = ()  # other users' and shared namespaces' prefixes

    def resolve(self, name: str) -> str:
        """The server's name for the folder a user configured as ``name``.

        ``/`` always separates levels (the config's own syntax, as in ``Failed/Mailroom``), so
        does the server's delimiter, and so does ``.`` after a leading ``INBOX`` (the habit of
        Cyrus and Courier users): ``Failed``, ``INBOX/Failed`` and ``INBOX.Failed`` mean a
        folder Failed at the top of the user's folders, or under INBOX, on every server. A name
        at the top gets the personal namespace's prefix (``Failed`` is ``INBOX.Failed`` on
        Cyrus); a name in another namespace (``user.bob.Failed``, ``#shared.x``) is taken as
        written. Levels are joined with the server's delimiter.
        """
        if name.upper() == "INBOX" or self.delimiter is None:
            return name
        if any(prefix and name.startswith(prefix) for prefix in self.others):
            return name
        levels = [level for level in re.split(f"[/{re.escape(self.delimiter)}]", name) if level]
        if levels and levels[0].upper().startswith("INBOX."):
            levels[:1] = [level for level in levels[0].split(".") if level]
        if not levels:
            return name
        if levels[0].upper() == "INBOX":
            return self.delimiter.join(["INBOX", *levels[1:]])
        personal = self.personal
        if personal.upper().removesuffix(self.delimiter) == "INBOX":
            personal = "INBOX" + self.delimiter  # however the server spells it
        return personal + self.delimiter.join(levels)


_NAMESPACE_TOKEN = re.compile(rb'\s*(?:(\()|(\))|(NIL)|"((?:[^"\\]|\\.)*)")', re.IGNORECASE)
_QUOTED_PAIR = re.compile(rb"\\(.)")


def parse_namespace(text: bytes) -> Hierarchy | None:
    """The NAMESPACE response's data (RFC 2342 §5: three lists, personal, other users',
    shared, each NIL or descriptions ``(prefix delimiter extensions...)``), or None when it is
    not one (a literal, say) or names no personal namespace. Only the first personal namespace
    counts; linear in ``text``."""
    groups: list[list[tuple[str, str | None]]] = [[], [], []]
    group = depth = 0
    atoms: list[str | None] = []  # the current description's prefix and delimiter
    position = 0
    text = text.strip()
    while position < len(text):
        match = _NAMESPACE_TOKEN.match(text, position)
        if match is None or group > 2:
            return None
        position = match.end()
        opening, closing, nil, quoted = match.groups()
        if opening:
            depth += 1
            if depth == 2:
                atoms = []
        elif closing:
            if depth == 2 and len(atoms) >= 2 and atoms[0] is not None:
                groups[group].append((atoms[0], atoms[1]))
            depth -= 1
            if depth < 0:
                return None
            if depth == 0:
                group += 1
        else:
            atom = None if nil else _QUOTED_PAIR.sub(rb"\1", quoted).decode("utf-8", "replace")
            if depth == 0:
                group += 1  # NIL: no namespace of this kind
            elif depth == 2:
                atoms.append(atom)
    if group != 3 or depth != 0 or not groups[0]:
        return None
    (prefix, delimiter), others = groups[0][0], groups[1] + groups[2]
    return Hierarchy(delimiter=delimiter, personal=prefix, others=tuple(p for p, _ in others))


_LIST_DELIMITER = re.compile(rb'^\([^)]*\) (?:"((?:[^"\\]|\\.)*)"|NIL) ', re.IGNORECASE)


def parse_list_delimiter(line: bytes) -> tuple[bool, str | None]:
    """``(\\Noselect) "/" ""``, the answer to ``LIST "" ""`` (RFC 3501 §6.3.8): whether
    ``line`` is one, and the hierarchy delimiter (None: NIL, a flat server)."""
    match = _LIST_DELIMITER.match(line)
    if match is None:
        return False, None
    if match.group(1) is None:
        return True, None
    return True, _QUOTED_PAIR.sub(rb"\1", match.group(1)).decode("utf-8", "replace")


def login_segments(user: str, password: str, *, literal_plus: bool) -> list[str]:
    """``LOGIN user password`` (after the tag) in the pieces a client sends, each followed by
    CRLF: the command line up to its first synchronising literal, then what follows each
    continuation request (RFC 3501 §7.5).

    An argument of printable ASCII is a quoted string; anything else (8-bit, control
    characters) a literal, never a quoted string (RFC 3501 §4.3, §9: ``QUOTED-CHAR`` is 7-bit).
    With LITERAL+ (RFC 7888) a literal needs no continuation: one piece.
    """
    segments = ["LOGIN"]
    for value in (user, password):
        if all(" " <= char <= "~" for char in value):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            segments[-1] += f' "{escaped}"'
        elif literal_plus:
            segments[-1] += f" {{{len(value.encode())}+}}\r\n{value}"
        else:
            segments[-1] += f" {{{len(value.encode())}}}"
            segments.append(value)
    return segments


def response_text(response: Any) -> str:
    """The server's text of a response (its last line), fit for a log line: one line of at
    most 300 characters, control characters replaced."""
    lines = [line for line in response.lines if isinstance(line, bytes)]
    return printable(lines[-1][:400].decode("utf-8", "replace"), 300) if lines else "(no text)"


def parse_fetch(
    lines: list[Any], *, malformed: Callable[[str], None] | None = None
) -> list[FetchedMessage]:
    """Read aioimaplib's FETCH lines: a ``bytes`` head, a ``bytearray`` literal, ``b')'``...

    Responses for the same message are merged (RFC 3501 §7.4.2 lets a server split the data
    items over several). Only messages with UID and RFC822.SIZE count: mailroom asks for both
    every time, so anything else is an unsolicited update (another client changed flags). A
    message whose UID or size is out of range (a 5,000-digit UID, a size of 2^64) is skipped
    and told to ``malformed``: the others are read all the same.
    """
    items: dict[int, dict[str, Any]] = {}
    bad: set[int] = set()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        head = _FETCH_HEAD.match(line) if type(line) is bytes else None
        if head is None:
            continue
        meta, body = bytes(line), None
        if line.endswith(b"}") and index < len(lines) and isinstance(lines[index], bytearray):
            body = bytes(lines[index])
            index += 1
            tail = lines[index] if index < len(lines) else None
            if type(tail) is bytes and not _FETCH_HEAD.match(tail):
                meta += b" " + tail  # items after the literal, e.g. " UID 7)"
                index += 1
        sequence = number(head.group(1), UID_MAX, minimum=1)
        if sequence is None:
            if malformed is not None:
                malformed(f"a FETCH response for message number {_shown(head.group(1))}")
            continue
        item = items.setdefault(sequence, {})
        if uid := _UID.search(meta):
            item["uid"] = number(uid.group(1), UID_MAX, minimum=1)
            if item["uid"] is None:
                bad.add(sequence)
        if size := _SIZE.search(meta):
            item["size"] = number(size.group(1), SIZE_MAX)
            if item["size"] is None:
                bad.add(sequence)
        if body is not None:
            item["body"] = body
        if (flags := _flags(meta)) is not None:
            item["webhook_id"] = _kept_id(flags)
        if date := _INTERNALDATE.search(meta):
            item["internal_date"] = _internal_date(date.groups())
    if bad and malformed is not None:
        for sequence in sorted(bad):
            malformed(f"message number {sequence}: a UID or RFC822.SIZE out of range")
    return [
        FetchedMessage(
            uid=item["uid"],
            size=item["size"],
            body=item.get("body"),
            webhook_id=item.get("webhook_id"),
            internal_date=item.get("internal_date"),
        )
        for sequence, item in items.items()
        if "uid" in item and "size" in item and sequence not in bad
    ]


def told_capabilities(lines: list[Any]) -> set[str] | None:
    """The capabilities an answer's ``lines`` (aioimaplib's) told, in a ``[CAPABILITY ...]``
    code of its tagged line or an untagged ``CAPABILITY`` line (RFC 3501 §7.1, §7.2.1), when
    they name IMAP4rev1; else None: then they are asked for."""
    told = None
    for line in lines:
        if isinstance(line, bytes):
            told = capability_code(line, untagged=True) or told
    return told


def capability_code(line: bytes, *, untagged: bool = False) -> set[str] | None:
    """The capabilities of a ``[CAPABILITY ...]`` code in ``line`` (a greeting, a tagged OK), or
    of the line itself, an untagged ``CAPABILITY`` response without its ``* `` (``untagged``),
    when they name IMAP4rev1; else None."""
    if untagged and line[:11].upper() == b"CAPABILITY ":
        words = line[11:].split()
    elif match := _CAPABILITY_CODE.search(line, 0, LINE_BYTES):
        words = match.group(1).split()
    else:
        return None
    told = {word.decode("ascii", "replace") for word in words}
    return told if "IMAP4REV1" in {word.upper() for word in told} else None


def fetch_flags(line: bytes) -> frozenset[bytes] | None:
    """The flags (lower-cased) of an untagged ``* n FETCH (... FLAGS (...))``, or None when
    ``line`` is no such response (RFC 3501 §7.4.2: a flag change another client made)."""
    if not _FETCH_HEAD.match(line.removeprefix(b"* ")):
        return None
    flags = _flags(line)
    return None if flags is None else frozenset(flags.lower().split())


def _flags(meta: bytes) -> bytes | None:
    """What the first ``FLAGS (...)`` holds (found in linear time: no regex backtracking)."""
    if (found := _FLAGS.search(meta)) and (end := meta.find(b")", found.end())) >= 0:
        return meta[found.end() : end]
    return None


def _kept_id(flags: bytes) -> str | None:
    """The webhook-id an id keyword among ``flags`` carries; of several, the first in order
    (deterministic, whatever order the server lists them in)."""
    found = sorted(m.group(1).lower() for f in flags.split() if (m := _ID_KEYWORD.match(f)))
    return f"msg_{found[0].decode()}" if found else None


def _internal_date(parts: tuple[bytes, ...]) -> datetime.datetime | None:
    """An INTERNALDATE's parts as an aware datetime, or None when they name no real time."""
    day, month, year, hour, minute, second, sign, tz_hours, tz_minutes = parts
    name = month.decode().lower()
    if name not in _MONTHS:
        return None
    offset = datetime.timedelta(hours=int(tz_hours), minutes=int(tz_minutes))
    try:
        return datetime.datetime(
            int(year),
            _MONTHS.index(name) + 1,
            int(day),
            int(hour),
            int(minute),
            int(second),
            tzinfo=datetime.timezone(-offset if sign == b"-" else offset),
        )
    except ValueError:  # 31-Feb, 25:00, an offset of a day or more
        return None
