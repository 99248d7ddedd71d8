"""Pure parsing: raw RFC 5322 bytes → ``ParsedMessage``. Never raises on bad mail.

Text fields come out as best-effort ``str`` whatever the charset damage; ``raw`` stays the exact
bytes fetched. No I/O here.
"""

from __future__ import annotations

import email.parser
import email.utils
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage, Message

__all__ = ["Address", "Attachment", "ParsedMessage", "parse"]

_PARSER = email.parser.BytesParser(policy=policy.default)


@dataclass(frozen=True, slots=True)
class Address:
    name: str
    address: str


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str | None
    content_type: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedMessage:
    """What routing and the webhook payload need to know of a message."""

    raw: bytes = field(repr=False)
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    message_id: str | None
    in_reply_to: str | None
    references: tuple[str, ...]
    from_: Address | None
    reply_to: tuple[Address, ...]
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    subject: str
    date: str | None
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    authentication_results: tuple[str, ...]
    defects: tuple[str, ...] = ()

    def header(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order of appearance."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def first(self, name: str) -> str | None:
        values = self.header(name)
        return values[0] if values else None


def _headers(msg: Message) -> tuple[tuple[str, str], ...]:
    result = []
    for key, value in msg.raw_items():
        try:
            text = str(msg.policy.header_fetch_parse(key, value))
        except Exception:
            text = str(value)
        result.append((key, " ".join(text.split())))
    return tuple(result)


def _addresses(values: list[str]) -> tuple[Address, ...]:
    try:
        pairs = email.utils.getaddresses(values)
    except Exception:
        return ()
    return tuple(Address(name, addr) for name, addr in pairs if addr and "@" in addr)


def _msg_ids(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    # Exchange writes References as one comma-joined string; RFC 5322 §3.6.4 uses spaces.
    ids = []
    for token in value.replace(",", " ").split():
        if stripped := token.strip("<>"):
            ids.append(stripped)
    return tuple(ids)


def _content(part: Message) -> str | None:
    try:
        content = part.get_content()  # type: ignore[attr-defined]
    except Exception:
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            return None
        return payload.decode("utf-8", errors="replace")
    return content if isinstance(content, str) else None


def _bodies(msg: EmailMessage) -> tuple[str | None, str | None, tuple[Attachment, ...]]:
    text = html = None
    try:
        text_part = msg.get_body(preferencelist=("plain",))
        html_part = msg.get_body(preferencelist=("html",))
    except Exception:
        text_part = html_part = None
    if text_part is not None:
        text = _content(text_part)
    if html_part is not None:
        html = _content(html_part)
    attachments = []
    try:
        for part in msg.iter_attachments():
            payload = part.get_payload(decode=True)
            size = len(payload) if isinstance(payload, bytes) else 0
            attachments.append(Attachment(part.get_filename(), part.get_content_type(), size))
    except Exception:
        pass
    return text, html, tuple(attachments)


def parse(raw: bytes) -> ParsedMessage:
    """Parse ``raw``; damaged mail yields what could be read and a note in ``defects``."""
    defects: list[str] = []
    try:
        msg = _PARSER.parsebytes(raw)
        assert isinstance(msg, EmailMessage)
    except Exception as exc:  # the stdlib parser is lenient; this is a last resort
        return _unparsable(raw, f"unparsable: {type(exc).__name__}")
    try:
        headers = _headers(msg)
    except Exception as exc:
        return _unparsable(raw, f"unreadable headers: {type(exc).__name__}")
    defects.extend(type(d).__name__ for d in msg.defects)

    def first(name: str) -> str | None:
        wanted = name.lower()
        return next((v for k, v in headers if k.lower() == wanted), None)

    def every(name: str) -> list[str]:
        wanted = name.lower()
        return [v for k, v in headers if k.lower() == wanted]

    froms = _addresses(every("From"))
    date = None
    if (date_header := first("Date")) is not None:
        try:
            date = email.utils.parsedate_to_datetime(date_header).isoformat()
        except (TypeError, ValueError, IndexError):
            defects.append("InvalidDate")
    text, html, attachments = _bodies(msg)
    in_reply_to = _msg_ids(first("In-Reply-To"))
    return ParsedMessage(
        raw=raw,
        headers=headers,
        message_id=next(iter(_msg_ids(first("Message-ID"))), None),
        in_reply_to=in_reply_to[0] if in_reply_to else None,
        references=_msg_ids(" ".join(every("References"))),
        from_=froms[0] if froms else None,
        reply_to=_addresses(every("Reply-To")),
        to=_addresses(every("To")),
        cc=_addresses(every("Cc")),
        subject=first("Subject") or "",
        date=date,
        text=text,
        html=html,
        attachments=attachments,
        authentication_results=tuple(every("Authentication-Results")),
        defects=tuple(defects),
    )


def _unparsable(raw: bytes, defect: str) -> ParsedMessage:
    return ParsedMessage(
        raw=raw,
        headers=(),
        message_id=None,
        in_reply_to=None,
        references=(),
        from_=None,
        reply_to=(),
        to=(),
        cc=(),
        subject="",
        date=None,
        text=None,
        html=None,
        attachments=(),
        authentication_results=(),
        defects=(defect,),
    )
