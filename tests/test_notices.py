"""notices: who may get a reject notice, what it says, and the rate limit."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailroom.delivery.notices import (
    Notice,
    NoticeRecipient,
    RateLimiter,
    build_notice,
    notice_recipient,
)
from mailroom.mail.authresults import AuthResult, authenticated_sender, parse_authentication_results
from mailroom.mail.message import ParsedMessage, parse
from mailroom.mail.routing import AddressTemplate, Ignore, RoutingRules, decide

EML = Path(__file__).parent / "eml"
RULES = RoutingRules(
    address=AddressTemplate.parse("incoming+%{key}@incoming.example.com"),
    own_addresses=frozenset({"noreply@example.com"}),
)
NOW = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
SENDER = "Example <noreply@example.com>"


def load(name: str, *, drop: bytes | None = None) -> ParsedMessage:
    raw = (EML / name).read_bytes()
    if drop is not None:
        raw = b"".join(line for line in raw.splitlines(True) if not line.startswith(drop))
    return parse(raw)


@pytest.mark.parametrize(
    ("parsed", "expected"),
    [
        (load("no_key.eml"), NoticeRecipient("alice@example.org")),
        (load("no_key.eml", drop=b"Return-Path:"), NoticeRecipient("alice@example.org")),
        (load("dsn.eml"), NoticeRecipient(None, "auto-generated (dsn)")),
        (load("null_sender.eml"), NoticeRecipient(None, "null sender")),
        (load("mailer_daemon.eml"), NoticeRecipient(None, "mailer-daemon sender")),
        (load("postmaster.eml"), NoticeRecipient(None, "mailer-daemon sender")),
        (load("auto_submitted.eml"), NoticeRecipient(None, "auto-generated (auto_submitted)")),
        (load("x_loop.eml"), NoticeRecipient(None, "auto-generated (x_loop)")),
        (load("no_from.eml"), NoticeRecipient(None, "no sender address")),
        (load("empty.eml"), NoticeRecipient(None, "unparsable message")),
        (
            parse(b"Return-Path: <Incoming+x@incoming.example.com>\nSubject: s\n\n"),
            NoticeRecipient(None, "our own address"),
        ),
        (
            parse(b"From: NoReply@Example.com\nSubject: s\n\n"),
            NoticeRecipient(None, "our own address"),
        ),
        (
            parse(b"Return-Path: <bounce@lists.example.org>\nFrom: alice@example.org\n\n"),
            NoticeRecipient("bounce@lists.example.org"),
        ),
    ],
)
def test_notice_recipient(parsed: ParsedMessage, expected: NoticeRecipient) -> None:
    assert notice_recipient(parsed, RULES) == expected


def test_auto_generated_rules_apply_even_when_switched_off_for_routing() -> None:
    rules = replace(RULES, ignore_auto_generated=frozenset())
    parsed = load("precedence_bulk.eml")
    assert notice_recipient(parsed, rules) == NoticeRecipient(None, "auto-generated (precedence)")


@pytest.mark.parametrize(
    ("name", "authserv_ids", "expected"),
    [
        ("auth_dmarc_pass.eml", frozenset(), True),
        ("auth_spf_aligned.eml", frozenset(), True),  # mail.example.org under example.org
        ("auth_spf_unaligned.eml", frozenset(), False),
        ("auth_forged_below.eml", frozenset(), False),  # only the topmost header is trusted
        ("auth_dmarc_pass.eml", frozenset({"MX.incoming.example.com"}), True),
        ("auth_dmarc_pass.eml", frozenset({"mx.other.example"}), False),
        ("no_key.eml", frozenset(), False),  # no Authentication-Results at all
    ],
)
def test_authenticated_sender(name: str, authserv_ids: frozenset[str], expected: bool) -> None:
    parsed = load(name)
    assert authenticated_sender(parsed, authserv_ids=authserv_ids) is expected
    recipient = notice_recipient(
        parsed, RULES, require_authenticated_sender=True, authserv_ids=authserv_ids
    )
    assert recipient == (
        NoticeRecipient("alice@example.org")
        if expected
        else NoticeRecipient(None, "sender not authenticated")
    )


def test_parse_authentication_results() -> None:
    value = (
        "mx.example.com 1; spf/1=pass (comment; with (nested) semicolon) "
        'smtp.mailfrom="a@b.example"; dkim=pass header.d=b.example reason="good; sig"; '
        "dmarc=FAIL header.from=b.example"
    )
    assert parse_authentication_results(value) == (
        "mx.example.com",
        (
            AuthResult("spf", "pass", (("smtp.mailfrom", "a@b.example"),)),
            AuthResult("dkim", "pass", (("header.d", "b.example"),)),
            AuthResult("dmarc", "fail", (("header.from", "b.example"),)),
        ),
    )
    assert parse_authentication_results("mx.example.com; none") == ("mx.example.com", ())


def test_parse_authentication_results_hostile_input() -> None:
    # Their time (linear): bench/parse_worst.py, auth_results.
    found = [
        parse_authentication_results(value)
        for value in ("(" * 100_000, '"' * 100_000, "a=" * 100_000, ";" * 100_000)
    ]
    assert found == [("", ()), ("", ()), ("a", ()), ("", ())]  # nothing read into them


def test_build_notice() -> None:
    original = load("no_key.eml")
    notice = build_notice(
        original,
        recipient="alice@example.org",
        reason="unknown incoming email",
        sender=SENDER,
        now=NOW,
        footer="Example Inc. — https://example.com/help",
        message_id="<notice-1@example.com>",
    )
    assert (notice.recipient, notice.message_id, notice.smtputf8) == (
        "alice@example.org",
        "<notice-1@example.com>",
        False,
    )
    head, _, body = notice.data.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"From: Example <noreply@example.com>",
        b"To: alice@example.org",
        b"Subject: [Rejected]",
        b" =?utf-8?b?R3LDvMOfZQ==?=",
        b"Date: Tue, 02 Jan 2024 03:04:05 +0000",
        b"Message-ID: <notice-1@example.com>",
        b"In-Reply-To: <m1@example.org>",
        b"References: <m1@example.org>",
        b"Auto-Submitted: auto-replied",
        b"X-Auto-Response-Suppress: All",
        b"MIME-Version: 1.0",
        b'Content-Type: text/plain; charset="utf-8"',
        b"Content-Transfer-Encoding: quoted-printable",
    ]
    assert body.startswith(
        b"Your email could not be delivered.\r\n\r\n  Subject: Gr=C3=BC=C3=9Fe\r\n"
    )
    msg = notice.message()
    assert msg["Subject"] == "[Rejected] Grüße"
    assert content(notice) == (
        "Your email could not be delivered.\n"
        "\n"
        "  Subject: Grüße\n"
        "  Date: 2024-01-01T10:00:00+00:00\n"
        "\n"
        "The address you sent it to is not known here. If you were replying to a\n"
        "notification, reply to that email itself; otherwise check the address.\n"
        "\n"
        "This is an automatic reply; answers to it are not read.\n"
        "\n"
        "-- \n"
        "Example Inc. — https://example.com/help\n"
    )
    assert b"Hello." not in notice.data  # never the original body


def content(notice: Notice) -> str:
    text = notice.message().get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def test_an_ascii_notice_is_7bit() -> None:
    original = parse(b"From: alice@example.org\nSubject: hello\n\nbody\n")
    notice = build_notice(
        original, recipient="alice@example.org", reason="x", sender=SENDER, now=NOW
    )
    assert b"\r\nSubject: [Rejected] hello\r\n" in notice.data
    assert b"\r\nContent-Transfer-Encoding: 7bit\r\n\r\nYour email" in notice.data


def test_a_notice_is_itself_ignored_as_auto_generated() -> None:
    notice = build_notice(
        load("no_key.eml"), recipient="alice@example.org", reason="x", sender=SENDER, now=NOW
    )
    assert decide(parse(notice.data), RULES) == Ignore("auto_submitted")


def test_fresh_message_id_on_the_sender_domain() -> None:
    notice = build_notice(
        load("no_key.eml"), recipient="alice@example.org", reason="x", sender=SENDER, now=NOW
    )
    other = build_notice(
        load("no_key.eml"), recipient="alice@example.org", reason="x", sender=SENDER, now=NOW
    )
    assert notice.message_id.endswith("@example.com>")
    assert notice.message_id != other.message_id
    assert notice.message()["Message-ID"] == notice.message_id


def test_too_large_notice_from_the_header_block() -> None:
    notice = build_notice(
        load("headers_only_large.eml"),
        recipient="alice@example.org",
        reason="too large",
        sender=SENDER,
        now=NOW,
        max_message_bytes=26_214_400,
    )
    assert notice.message()["Subject"] == "[Rejected] Big scans"
    assert (
        "\nIt is larger than the limit of 25.0 MB. Send it again with smaller\nattachments.\n"
        in content(notice)
    )


def test_application_reason_is_cleaned() -> None:
    original = parse(b"From: alice@example.org\nSubject: \n\nbody\n")
    notice = build_notice(
        original,
        recipient="alice@example.org",
        reason="Project\r\nBcc: x@evil.example\x00 is archived\u2028X-Injected: yes",
        sender=SENDER,
        now=NOW,
    )
    msg = notice.message()
    assert msg["Subject"] == "[Rejected]"
    assert "In-Reply-To" not in msg
    text = content(notice)
    assert "\nProject Bcc: x@evil.example is archived X-Injected: yes\n" in text
    assert "  Subject: (no subject)\n" in text


def test_rate_limiter() -> None:
    limiter = RateLimiter()
    assert limiter.allow("Alice@Example.org", "unknown incoming email", now=100.0)
    assert not limiter.allow("alice@example.org", "unknown incoming email", now=100.0 + 86_399)
    assert limiter.allow("alice@example.org", "too large", now=200.0)
    assert limiter.allow("bob@example.org", "unknown incoming email", now=300.0)
    assert limiter.allow("alice@example.org", "unknown incoming email", now=100.0 + 86_400)
    assert len(limiter) == 3  # the first entry expired on the way
    limiter.expire(now=300.0 + 86_400)
    assert len(limiter) == 1
    limiter.expire(now=1e9)
    assert len(limiter) == 0


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(window_s=10.0, max_entries=2)
    assert limiter.allow("a@example.org", "r", now=0.0)
    assert limiter.allow("b@example.org", "r", now=1.0)
    assert not limiter.allow("c@example.org", "r", now=2.0)  # full: refuse, never evict early
    assert limiter.allow("c@example.org", "r", now=10.0)  # a's entry expired
    assert len(limiter) == 2


INJECTING_MESSAGE_ID = (
    b"From: victim@example.org\r\n"
    b"To: nobody-here@example.com\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <=?utf-8?q?x=0D=0ABcc:_other@example.net=0D=0AX-Injected:_yes=0D=0A=0D=0A"
    b"Injected_body_http://evil.example/?=@x>\r\n"
    b"\r\n"
    b"body\r\n"
)


def test_an_encoded_message_id_cannot_inject_headers_into_the_notice() -> None:
    parsed = parse(INJECTING_MESSAGE_ID)
    recipient = notice_recipient(parsed, RULES)
    assert recipient.address == "victim@example.org"
    notice = build_notice(
        parsed,
        recipient=recipient.address,
        reason="unknown incoming email",
        sender="Example <noreply@example.com>",
        now=NOW,
    )
    assert b"X-Injected" not in notice.data
    assert b"Bcc" not in notice.data
    assert b"In-Reply-To" not in notice.data and b"References" not in notice.data


@pytest.mark.parametrize(
    "return_path",
    ["<=?utf-8?q?a=0D=0A?=@example.org>", "<=?x?q??=@\xe9>"],
)
def test_a_hostile_return_path_gets_no_notice_and_no_exception(return_path: str) -> None:
    raw = (
        f"Return-Path: {return_path}\r\nFrom: a@example.org\r\nTo: x@example.com\r\n"
        "Subject: s\r\n\r\nbody\r\n"
    ).encode("utf-8", "surrogateescape")
    recipient = notice_recipient(parse(raw), RULES)
    assert recipient.address is None
    assert recipient.refused in ("unusable sender address", "no sender address")
