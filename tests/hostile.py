"""Checks shared by the hostile-mail tests and the fuzz test (issue 13)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email import policy
from email.parser import BytesParser

from mailroom.delivery import webhook
from mailroom.delivery.notices import Notice
from mailroom.envelope import Envelope, Outcome
from mailroom.mail import routing
from mailroom.mail.message import ParsedMessage

NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
SENDER = "Example <noreply@example.com>"
_FIRST = ["From", "To", "Subject", "Date", "Message-ID"]
_REPLY = ["In-Reply-To", "References"]  # only when the original's Message-ID can be echoed
_LAST = [
    "Auto-Submitted",
    "X-Auto-Response-Suppress",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
]


def assert_safe_notice(notice: Notice) -> None:
    """CRLF only, exactly the fields ``build_notice`` sets, and nothing a reader would see
    as another header: no CR or LF in any value even after the reader decoded it."""
    stray = notice.data.replace(b"\r\n", b"")
    assert b"\r" not in stray and b"\n" not in stray
    head, _, _ = notice.data.partition(b"\r\n\r\n")
    names = [line.split(b":")[0].decode() for line in head.split(b"\r\n") if line[:1] not in b" \t"]
    assert names in ([*_FIRST, *_LAST], [*_FIRST, *_REPLY, *_LAST])
    msg = BytesParser(policy=policy.default).parsebytes(notice.data)
    assert msg.keys() == names
    for name in names:
        assert "\r" not in str(msg[name]) and "\n" not in str(msg[name])
    assert msg["Auto-Submitted"] == "auto-replied"
    assert not msg.defects


def envelope(raw: bytes) -> Envelope:
    async def settle(outcome: Outcome, why: str) -> None:
        del outcome, why

    return Envelope(
        mailbox="m",
        ref="1",
        idempotency_key="msg_" + "0" * 32,
        raw=raw,
        size=len(raw),
        _settle=settle,
    )


def assert_strict_payload(parsed: ParsedMessage) -> dict[str, object]:
    """The webhook body is strict JSON: no lone surrogate, as text or as a "\\ud83d" escape
    (strict parsers, orjson among them, refuse both; a pair of escapes is one character)."""
    decision = routing.Deliver(key="k", matched_header="To")
    body = webhook.payload_body(envelope(parsed.raw), parsed, decision)
    document: dict[str, object] = json.loads(body)
    json.dumps(document, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return document
