"""Pure IMAP wire details: sequence sets, mailbox names, FETCH responses (RFC 3501), folder
names against the server's hierarchy (``Hierarchy``: NAMESPACE, RFC 2342), and the keyword
that keeps a dead letter's webhook-id across a move (``id_keyword``).

No I/O and no aioimaplib here; ``imap_session`` feeds these the lines aioimaplib produced.
"""

from __future__ import annotations

import base64
import datetime
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ID_KEYWORD_PREFIX",
    "FetchedMessage",
    "Hierarchy",
    "fetch_flags",
    "id_keyword",
    "login_segments",
    "mailbox_name",
    "parse_fetch",
    "parse_list_delimiter",
    "parse_namespace",
    "response_text",
    "uid_set",
]

_FETCH_HEAD = re.compile(rb"^(\d+) FETCH \(")
_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
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
    lines = [line for line in response.lines if isinstance(line, bytes)]
    return lines[-1].decode("utf-8", "replace") if lines else "(no text)"


def parse_fetch(lines: list[Any]) -> list[FetchedMessage]:
    """Read aioimaplib's FETCH lines: a ``bytes`` head, a ``bytearray`` literal, ``b')'``...

    Responses for the same message are merged (RFC 3501 §7.4.2 lets a server split the data
    items over several). Only messages with UID and RFC822.SIZE count: mailroom asks for both
    every time, so anything else is an unsolicited update (another client changed flags).
    """
    items: dict[int, dict[str, Any]] = {}
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
        item = items.setdefault(int(head.group(1)), {})
        if uid := _UID.search(meta):
            item["uid"] = int(uid.group(1))
        if size := _SIZE.search(meta):
            item["size"] = int(size.group(1))
        if body is not None:
            item["body"] = body
        if (flags := _flags(meta)) is not None:
            item["webhook_id"] = _kept_id(flags)
        if date := _INTERNALDATE.search(meta):
            item["internal_date"] = _internal_date(date.groups())
    return [
        FetchedMessage(
            uid=item["uid"],
            size=item["size"],
            body=item.get("body"),
            webhook_id=item.get("webhook_id"),
            internal_date=item.get("internal_date"),
        )
        for item in items.values()
        if "uid" in item and "size" in item
    ]


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
