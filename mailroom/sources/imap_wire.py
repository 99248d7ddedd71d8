"""Pure IMAP wire details: sequence sets, mailbox names, FETCH responses (RFC 3501), and the
keyword that keeps a dead letter's webhook-id across a move (``id_keyword``).

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
    "fetch_flags",
    "id_keyword",
    "mailbox_name",
    "parse_fetch",
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
