"""Issue 13: every example of the adversarial probe, and variants, from parse to the wire.

Pure tests first (parse, payload, notice bytes), then end to end through Dovecot and aiosmtpd:
no injected header on the wire, and no day of retries for a sender that needs SMTPUTF8.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from mailroom.delivery import dispatch
from mailroom.delivery.notices import Notice, NoticeRecipient, build_notice, notice_recipient
from mailroom.mail import mime
from mailroom.mail.message import Address, Attachment, parse
from mailroom.mail.routing import AddressTemplate, RoutingRules
from tests.helpers import logged, make_config, running
from tests.hostile import NOW, SENDER, assert_safe_notice, assert_strict_payload
from tests.servers.dovecot import Account, Dovecot
from tests.servers.smtp import SmtpServer
from tests.servers.webhook import WebhookReceiver
from tests.test_reject import notice_settings, settled

EML = Path(__file__).parent / "eml"
RULES = RoutingRules(address=AddressTemplate.parse("incoming+%{key}@incoming.example.com"))
_INJECTED = "Hi=0D=0ABcc:_v@evil.example=0D=0AAuto-Submitted:_no=0D=0A=0D=0AInjected"


def _b64_word(text: str) -> str:
    return f"=?utf-8?b?{base64.b64encode(text.encode()).decode()}?="


HOSTILE_SUBJECTS = {
    # The issue's example: whitespace inside the word, which policy.default decoded anyway.
    "issue": f"=?utf-8?q?{_INJECTED} ?=",
    # A word whose base64 decodes to another encoded-word.
    "double": _b64_word(f"=?utf-8?q?{_INJECTED}?="),
    "triple": _b64_word(_b64_word(f"=?utf-8?q?{_INJECTED}?=")),
    # It made serialisation raise, logged as "the SMTP server refused the notice for good".
    "serialisation": "=?utf-8?q?Gr=C3=BC=C\t3=9Fe?=",
    "well_formed": _b64_word("Hi\r\nBcc: v@evil.example\r\n\r\nInjected"),
    "bare_cr": "=?utf-8?q?Hi=0DBcc:_v@evil.example?=",
    "bare_lf": "=?utf-8?q?Hi=0ABcc:_v@evil.example?=",
    "nel": "=?utf-8?q?Hi=C2=85Bcc:_v@evil.example?=",
    "line_separator": "=?utf-8?q?Hi=E2=80=A8Bcc:_v@evil.example?=",
    "surrogate": "=?utf-7?q?+2D0-?=",
    "literal_words": "=?x?q?=?utf-8?q?a=0D=0Ab?==?=",
    "long": "=?utf-8?q?" + "=C3=A9" * 400 + "?= " + "x" * 3000,
}


def hostile_mail(subject: str, *, sender: str = "alice@example.org") -> bytes:
    return (
        f"Return-Path: <{sender}>\r\nFrom: Alice <{sender}>\r\nTo: nobody@example.net\r\n"
        f"Subject: {subject}\r\nMessage-ID: <m1@example.org>\r\n\r\nConfidential body.\r\n"
    ).encode()


@pytest.mark.parametrize("name", sorted(HOSTILE_SUBJECTS))
def test_a_hostile_subject_cannot_inject_into_the_notice(name: str) -> None:
    parsed = parse(hostile_mail(HOSTILE_SUBJECTS[name]))
    notice = build_notice(parsed, recipient="alice@example.org", reason="x", sender=SENDER, now=NOW)
    assert_safe_notice(notice)
    subject = str(notice.message()["Subject"])
    assert subject.startswith("[Rejected]")
    assert "=?" not in subject  # nothing a reader could decode a second time
    assert "\ud83d" not in subject


def test_the_issue_subject_is_read_as_written() -> None:
    subject = parse(hostile_mail(HOSTILE_SUBJECTS["issue"])).subject
    assert subject == HOSTILE_SUBJECTS["issue"]  # not a valid word: left as written
    notice = build_notice(
        parse(hostile_mail(HOSTILE_SUBJECTS["double"])),
        recipient="alice@example.org",
        reason="x",
        sender=SENDER,
        now=NOW,
    )
    assert str(notice.message()["Subject"]) == f"[Rejected] = ?utf-8?q?{_INJECTED}?="


@pytest.mark.parametrize(
    "sender",
    [
        "Jürgen Müller <noreply@example.com>",
        '"=?utf-8?q?a=0D=0AX:_y?=" <noreply@example.com>',
        "\U0001f600" * 300 + " <noreply@example.com>",
    ],
)
def test_the_configured_sender_name_is_encoded_too(sender: str) -> None:
    notice = build_notice(
        parse(hostile_mail("hello")),
        recipient="alice@example.org",
        reason="x",
        sender=sender,
        now=NOW,
    )
    assert_safe_notice(notice)
    assert notice.data.split(b"\r\n")[0].isascii()


MULTIPART = (
    b"From: a@example.org\r\nTo: incoming+k@example.com\r\nSubject: s\r\n"
    b'Content-Type: multipart/mixed; boundary="z"\r\n\r\n--z\r\n'
    b"Content-Type: text/plain\r\n\r\nhello\r\n--z\r\n"
)


@pytest.mark.parametrize(
    ("disposition", "filename"),
    [
        # Issue 13, point 3: parse() raised UnicodeEncodeError on these.
        ("attachment; filename*=utf-7''%2B2D0-.pdf", "\ufffd.pdf"),
        ("attachment; filename*=unicode-escape''%5Cud83d.pdf", "\\ud83d.pdf"),
        ("attachment; filename*=raw-unicode-escape''%5Cud83d%5CU0010ffff.pdf", None),
        ("attachment; filename*0*=utf-7''%2B2D; filename*1*=0-.pdf", "\ufffd.pdf"),
        ('attachment; filename="caf\xc3\xa9.pdf"', "café.pdf"),  # raw UTF-8 (RFC 6532)
        ('attachment; filename="=?utf-7?q?+2D0-?=.pdf"', "\ufffd.pdf"),
    ],
)
def test_rfc2231_filenames_never_raise_nor_leak_surrogates(
    disposition: str, filename: str | None
) -> None:
    raw = MULTIPART + (
        f"Content-Type: application/pdf\r\nContent-Disposition: {disposition}\r\n\r\n"
        "JVBERi0=\r\n--z--\r\n"
    ).encode("latin-1")
    parsed = parse(raw)
    assert len(parsed.attachments) == 1
    if filename is not None:
        assert parsed.attachments[0].filename == filename
    assert [d for d in parsed.defects if d.startswith("InternalError")] == []
    assert_strict_payload(parsed)


@pytest.mark.parametrize(
    ("raw", "field", "expected"),
    [
        # Issue 13, point 4: "subject": "\ud83d" in the webhook JSON.
        (b"From: a@example.org\r\nSubject: =?utf-7?q?+2D0-?=\r\n\r\n", "subject", "\ufffd"),
        (
            b"From: a@example.org\r\nContent-Type: text/plain; charset=utf-7\r\n\r\n+2D0-+2D3eAA-",
            "text",
            "\ufffd\U0001f600",
        ),
        (  # not a mail charset: read as UTF-8
            b"From: a@example.org\r\nContent-Type: text/html; charset=unicode-escape\r\n"
            b"\r\n\\ud83d",
            "html",
            "\\ud83d",
        ),
        (
            b'From: a@example.org\r\nTo: "=?utf-7?q?+3gA-?=" <b@example.org>\r\n\r\n',
            "to",
            [{"name": "\ufffd", "address": "b@example.org"}],
        ),
        (
            MULTIPART.replace(b"text/plain", b"text/plain; charset=utf-7").replace(
                b"hello", b"+2D0-"
            )
            + b"--z--\r\n",
            "text",
            "\ufffd",
        ),
    ],
)
def test_no_lone_surrogate_reaches_the_webhook(raw: bytes, field: str, expected: object) -> None:
    assert assert_strict_payload(parse(raw))[field] == expected


def test_overlong_ids_and_addresses_are_not_echoed() -> None:
    long_id = "a" * 1000 + "@example.org"
    raw = hostile_mail("s").replace(b"<m1@example.org>", f"<{long_id}>".encode())
    notice = build_notice(parse(raw), recipient="a@example.org", reason="x", sender=SENDER, now=NOW)
    assert_safe_notice(notice)
    assert b"In-Reply-To" not in notice.data
    raw = hostile_mail("s", sender="a" * 300 + "@example.org")
    assert notice_recipient(parse(raw), RULES) == NoticeRecipient(None, "unusable sender address")


def test_the_utf7_fixture() -> None:
    parsed = parse((EML / "hostile_utf7_surrogates.eml").read_bytes())
    assert parsed.subject == "\ufffd"
    assert parsed.from_ == Address("\ufffd", "alice@example.org")
    assert parsed.text == "\ufffd and \U0001f600"  # the CRLF before a boundary belongs to it
    assert parsed.attachments == (
        Attachment("\ufffd.pdf", "application/pdf", 5),
        Attachment("\\ud83d.txt", "text/plain", 1),
    )
    assert_strict_payload(parsed)


@pytest.mark.parametrize("name", ["hostile_subject_injection.eml", "hostile_subject_double.eml"])
def test_the_subject_fixtures(name: str) -> None:
    parsed = parse((EML / name).read_bytes())
    notice = build_notice(parsed, recipient="alice@example.org", reason="x", sender=SENDER, now=NOW)
    assert_safe_notice(notice)
    assert b"\r\nBcc" not in notice.data


async def test_large_messages_are_parsed_off_the_event_loop() -> None:
    here = threading.get_ident()
    assert await dispatch._off_loop(dispatch.OFF_LOOP_BYTES, threading.get_ident) == here
    assert await dispatch._off_loop(dispatch.OFF_LOOP_BYTES + 1, threading.get_ident) != here


# The shapes of issue 13 at their worst sizes: what comes out is checked here, the time (the
# quadratic parse took 50 to 470 µs a byte, now about 0.1) in bench/parse_worst.py. Were it
# quadratic again, the 950,000 bytes would take minutes: past the suite's per-test timeout.


@pytest.mark.parametrize("n", [100_000, 200_000, 950_000])
@pytest.mark.parametrize("header", ["Content-Type: text/plain", "Content-Disposition: inline"])
def test_quadratic_parameters(n: int, header: str) -> None:
    # Issue 13, point 2: 4.8 s, 22 s and 444 s in the stdlib's get_params.
    raw = b"From: a@example.org\r\n" + header.encode() + b'; a="x' + b";" * n + b"\r\n\r\nbody\r\n"
    parsed = parse(raw)
    assert parsed.truncated == ("parameters",)
    assert parsed.text == "body\n"


def test_quadratic_boundary() -> None:
    # get_boundary walked the same path, called by the feed parser itself.
    raw = MULTIPART.replace(b'boundary="z"', b'boundary="z' + b";" * 950_000) + b"--z--\r\n"
    parsed = parse(raw)
    assert parsed.truncated == ("parameters",)


def test_190000_empty_parts() -> None:
    # Issue 13, point 5: 1 MB, 1.6 s and +92 MB of RSS.
    raw = MULTIPART.split(b"--z\r\n")[0] + b"--z\n\n" * 190_000 + b"--z--\n"
    parsed = parse(raw)
    assert parsed.truncated == ("parts",)
    assert mime.MAX_PARTS <= len(parsed.attachments) < mime.MAX_PARTS + 2000
    assert assert_strict_payload(parsed)["truncated"] == ["parts"]


def test_100000_cc_lines() -> None:
    # Issue 13, point 5: 0.7 MB peaked at 36 MB.
    raw = b"From: a@example.org\r\nSubject: s\r\n" + b"Cc: b@example.org\r\n" * 100_000 + b"\r\n"
    parsed = parse(raw)
    assert parsed.truncated == ("addresses", "header_fields")
    assert len(parsed.headers) == mime.MAX_HEADER_FIELDS
    assert len(parsed.cc) == 1000
    assert parsed.subject == "s"


# -- end to end: Dovecot → mailroom → aiosmtpd ----------------------------------------------


async def test_no_injected_header_on_the_wire(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, smtp: SmtpServer
) -> None:
    names = ["issue", "double", "serialisation", "well_formed", "nel"]
    # One sender each: the rate limit allows one notice per sender and reason a day.
    raws = [hostile_mail(HOSTILE_SUBJECTS[n], sender=f"{n}@example.org") for n in names]
    await dovecot.aappend_many(account, raws)
    config = make_config(dovecot, account, webhook.url, reject_notices=notice_settings(smtp))
    async with running(config):
        received = await smtp.wait_for(len(names))
        await settled(dovecot, account, [{"\\Seen"}] * len(names))
    assert webhook.requests == []
    assert sorted(m.rcpt_tos for m in received) == sorted((f"{n}@example.org",) for n in names)
    for mail in received:
        assert b"\r\nBcc" not in mail.data and b"\r\n\r\nInjected" not in mail.data
        assert mail.data.count(b"Auto-Submitted: auto-replied\r\n") == 1
        assert_safe_notice(Notice(mail.rcpt_tos[0], "", mail.data))


async def test_a_non_ascii_sender_without_smtputf8_is_refused_once(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Issue 13, point 6: retried for 24 h as "misconfigured", holding an in-flight slot.
    caplog.set_level(logging.INFO, logger="mailroom")
    await dovecot.aappend(account, hostile_mail("hello", sender="alice@bücher.example"))
    config = make_config(dovecot, account, webhook.url, reject_notices=notice_settings(smtp))
    async with running(config):
        await settled(dovecot, account, [{"\\Seen"}])
    assert smtp.messages == [] and smtp.attempts == []
    refusals = logged(caplog, "no reject notice to")
    assert len(refusals) == 1
    assert refusals[0].endswith(
        ": no reject notice to alice@bücher.example: its address is not ASCII and the SMTP "
        "server does not offer SMTPUTF8 (RFC 6531)"
    )
    assert logged(caplog, "attempt") == []


async def test_a_non_ascii_sender_gets_a_notice_over_smtputf8(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp_factory: Callable[..., SmtpServer],
) -> None:
    smtp = smtp_factory(smtputf8=True)
    await dovecot.aappend(account, hostile_mail("grüße", sender="alice@bücher.example"))
    config = make_config(dovecot, account, webhook.url, reject_notices=notice_settings(smtp))
    async with running(config):
        (mail,) = await smtp.wait_for(1)
        await settled(dovecot, account, [{"\\Seen"}])
    assert mail.rcpt_tos == ("alice@bücher.example",)
    assert "SMTPUTF8" in mail.mail_options
    assert b"\r\nTo: alice@b\xc3\xbccher.example\r\n" in mail.data  # RFC 6532 UTF-8 header
    assert mail.message()["Subject"] == "[Rejected] grüße"


def test_a_multipart_without_boundary_and_a_broken_charset() -> None:
    # Found by the fuzz test: get_payload() of the unsplit body decoded it with "utf-7 \x00".
    raw = b'Content-Type: multipart/mixed; boundary="z" text/plain; charset=utf-7 \x00\r\n\r\n\x80'
    parsed = parse(raw)
    assert parsed.defects == ("StartBoundaryNotFoundDefect", "MultipartInvariantViolationDefect")
    assert parsed.text == "€"  # no such charset: not UTF-8 either, so Windows-1252
