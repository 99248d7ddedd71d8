"""Pure IMAP wire details: sequence sets, mailbox names, FETCH responses (RFC 3501).

No I/O and no aioimaplib here; ``imap_session`` feeds these the lines aioimaplib produced.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["FetchedMessage", "mailbox_name", "parse_fetch", "response_text", "uid_set"]

_FETCH_HEAD = re.compile(rb"^(\d+) FETCH \(")
_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")


@dataclass(frozen=True, slots=True)
class FetchedMessage:
    uid: int
    size: int
    body: bytes | None  # None when only the size was asked for


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
    return [
        FetchedMessage(uid=item["uid"], size=item["size"], body=item.get("body"))
        for item in items.values()
        if "uid" in item and "size" in item
    ]
