"""Reject notices end to end: Dovecot → mailroom → webhook / aiosmtpd, and what is settled when."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any

import pytest

from tests.helpers import logged, make_config, message, running, wait_until
from tests.servers import tls
from tests.servers.dovecot import Account, Dovecot
from tests.servers.smtp import ReceivedMail, SmtpServer
from tests.servers.webhook import WebhookReceiver

FROM = "Mailroom <noreply@example.com>"
FOOTER = "Example Inc. · https://example.com/help"
FAST_RETRY = {"initial": 0.05, "max": 0.2}
FAILED = {"$MailroomFailed", "\\Seen"}


def mail(
    n: int,
    *,
    to: str = "someone-else@example.net",
    sender: str = "alice@example.org",
    headers: tuple[str, ...] = (),
    size: int = 0,
) -> bytes:
    """A message with a unique Message-ID and a body that a notice must never echo."""
    body = f"Confidential body {n}.\r\n"
    if size > len(body):
        body += ("y" * 76 + "\r\n") * ((size - len(body)) // 78)
    lines = [
        *headers,
        f"From: Alice <{sender}>",
        f"To: {to}",
        f"Subject: question {n}",
        f"Message-ID: <q{n}.{secrets.token_hex(4)}@example.org>",
        "Date: Sun, 22 Nov 2026 10:00:00 +0000",
        "Content-Type: text/plain; charset=utf-8",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def message_id(raw: bytes) -> str:
    line = next(x for x in raw.split(b"\r\n") if x.startswith(b"Message-ID: "))
    return line.removeprefix(b"Message-ID: ").decode()


def notice_settings(smtp: SmtpServer, **overrides: Any) -> dict[str, Any]:
    """A reject_notices block for ``smtp``."""
    server: dict[str, Any] = {"host": smtp.host, "port": smtp.port, "timeout": 5}
    if smtp.mode != "plain":
        server.update(ca_file=str(tls.ca_file()), **{smtp.mode: True})
    if smtp.user is not None:
        server.update(user=smtp.user, password=smtp.password)
    settings: dict[str, Any] = {
        "from": FROM,
        "smtp": server,
        "footer": FOOTER,
        "retry": FAST_RETRY,
    }
    settings.update(overrides)
    return settings


async def flags_of(dovecot: Dovecot, account: Account, mailbox: str = "INBOX") -> list[set[str]]:
    return [set(m.flags) for m in await dovecot.amessages(account, mailbox)]


async def settled(dovecot: Dovecot, account: Account, expected: list[set[str]]) -> None:
    async def check() -> bool:
        return await flags_of(dovecot, account) == expected

    await wait_until(check, what=f"flags {expected}")


def body_of(notice: ReceivedMail) -> str:
    content = notice.message().get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")  # as it came over SMTP: CRLF


async def count_in(dovecot: Dovecot, account: Account, mailbox: str, count: int) -> bool:
    if mailbox not in await asyncio.to_thread(dovecot.mailboxes, account):
        return False
    return len(await dovecot.amessages(account, mailbox)) == count


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")


async def test_unknown_address_gets_a_notice_then_is_settled(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, smtp: SmtpServer
) -> None:
    raw = mail(1, headers=("Return-Path: <alice+bounces@example.org>",))
    await dovecot.aappend(account, raw)
    config = make_config(dovecot, account, webhook.url, reject_notices=notice_settings(smtp))
    async with running(config):
        (notice,) = await smtp.wait_for(1)
        await settled(dovecot, account, [{"\\Seen"}])
    assert webhook.requests == []
    assert (notice.mail_from, notice.rcpt_tos) == ("", ("alice+bounces@example.org",))
    msg = notice.message()
    headers = {k: str(msg[k]) for k in ("From", "To", "Subject", "In-Reply-To", "References")}
    assert headers == {
        "From": FROM,
        "To": "alice+bounces@example.org",
        "Subject": "[Rejected] question 1",
        "In-Reply-To": message_id(raw),
        "References": message_id(raw),
    }
    assert (msg["Auto-Submitted"], msg["X-Auto-Response-Suppress"]) == ("auto-replied", "All")
    assert msg["Message-ID"].endswith("@example.com>")
    assert body_of(notice) == (
        "Your email could not be delivered.\n"
        "\n"
        "  Subject: question 1\n"
        "  Date: 2026-11-22T10:00:00+00:00\n"
        "\n"
        "The address you sent it to is not known here. If you were replying to a\n"
        "notification, reply to that email itself; otherwise check the address.\n"
        "\n"
        "This is an automatic reply; answers to it are not read.\n"
        "\n"
        "-- \n"
        f"{FOOTER}\n"
    )
    assert b"Confidential" not in notice.data


async def test_one_notice_per_sender_and_reason_a_day(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await dovecot.aappend_many(
        account, [mail(1), mail(2), mail(3, sender="bob@example.org"), mail(4)]
    )
    config = make_config(dovecot, account, webhook.url, reject_notices=notice_settings(smtp))
    async with running(config):
        await smtp.wait_for(2)
        await settled(dovecot, account, [{"\\Seen"}] * 4)
    assert sorted(n.rcpt_tos for n in smtp.messages) == [
        ("alice@example.org",),
        ("bob@example.org",),
    ]
    refusals = logged(caplog, "no reject notice: one went to alice@example.org")
    assert len(refusals) == 2
    assert refusals[0].endswith("for 'unknown incoming email' within the last 24 hours")


async def test_application_reject_reason_goes_back_and_counts_as_delivered(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, smtp: SmtpServer
) -> None:
    reason = "Issue #12 is closed.\nOpen a new one at https://example.com/issues/new"
    webhook.respond(422, json.dumps({"reject": reason}).encode())
    await dovecot.aappend(account, mail(1, to="incoming+abc@example.com"))
    config = make_config(
        dovecot,
        account,
        webhook.url,
        delete_after_delivery=True,
        reject_notices=notice_settings(smtp),
    )
    async with running(config):
        (request,) = await webhook.wait_for(1)
        (notice,) = await smtp.wait_for(1)
        await settled(dovecot, account, [{"\\Seen", "\\Deleted"}])  # as delivered
    assert request.json()["key"] == "abc"
    assert notice.rcpt_tos == ("alice@example.org",)
    assert "Issue #12 is closed. Open a new one at https://example.com/issues/new\n" in (
        body_of(notice)
    )


async def test_too_large_gets_a_notice_and_is_dead_lettered_without_fetching_the_body(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = mail(1, to="incoming+abc@example.com", size=5000)
    await dovecot.aappend(account, raw)
    config = make_config(
        dovecot,
        account,
        webhook.url,
        max_message_bytes=2048,
        reject_notices=notice_settings(smtp),
    )
    async with running(config):
        (notice,) = await smtp.wait_for(1)
        await settled(dovecot, account, [FAILED])
    assert webhook.requests == []
    assert notice.message()["Subject"] == "[Rejected] question 1"
    assert notice.message()["In-Reply-To"] == message_id(raw)
    assert "It is larger than the limit of 2.0 KB. Send it again with smaller\nattachments." in (
        body_of(notice)
    )
    assert logged(caplog, "uid 1: 5") == [
        f"{account.user}: uid 1: {len(raw)} bytes is over max_message_bytes (2048); dead-lettering"
    ]


BACKSCATTER = {
    "null sender": ("Return-Path: <>",),
    "mailer-daemon sender": ("Return-Path: <MAILER-DAEMON@mx.example.org>",),
    "auto-generated (auto_submitted)": ("Auto-Submitted: auto-replied",),
    "auto-generated (precedence)": ("Precedence: bulk",),
}


async def test_auto_generated_mail_is_ignored_without_a_notice(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    raws = [mail(n, headers=h) for n, h in enumerate(BACKSCATTER.values())]
    await dovecot.aappend_many(account, raws)
    config = make_config(dovecot, account, webhook.url, reject_notices=notice_settings(smtp))
    async with running(config):
        await settled(dovecot, account, [{"\\Seen"}] * len(raws))
    # Settled only after the decision: had a notice been sent, it would be here by now.
    assert (smtp.messages, smtp.attempts, webhook.requests) == ([], [], [])
    rules = sorted(m.split("(")[1].split(")")[0] for m in logged(caplog, "auto-generated ("))
    assert rules == ["auto_submitted", "mailer_daemon", "null_sender", "precedence"]


async def test_backscatter_refusals_hold_even_when_routing_lets_robots_through(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    raws = [mail(n, headers=h) for n, h in enumerate(BACKSCATTER.values())]
    raws.append(mail(10, sender="noreply@example.com"))  # reject_notices.from
    raws.append(mail(11, sender="helpdesk@example.com"))  # own_addresses
    await dovecot.aappend_many(account, raws)
    off = dict.fromkeys(("auto_submitted", "precedence", "null_sender", "mailer_daemon"), False)
    config = make_config(
        dovecot,
        account,
        webhook.url,
        ignore_auto_generated=off,
        own_addresses=["helpdesk@example.com"],
        reject_notices=notice_settings(smtp),
    )
    async with running(config):
        await settled(dovecot, account, [{"\\Seen"}] * len(raws))
    assert (smtp.messages, smtp.attempts, webhook.requests) == ([], [], [])
    reasons = sorted(m.split("no reject notice: ")[1] for m in logged(caplog, "no reject notice"))
    assert reasons == sorted([*BACKSCATTER, "our own address", "our own address"])
    assert len(logged(caplog, ": rejected: unknown incoming email")) == len(raws)


async def test_require_authenticated_sender_trusts_only_the_named_authserv_id(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    passed = "Authentication-Results: mx.example.com; dmarc=pass header.from=example.org"
    forged = "Authentication-Results: evil.example; dmarc=pass header.from=example.org"
    spf = "Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=bounce.example.org"
    await dovecot.aappend_many(
        account,
        [
            mail(1, headers=(passed,)),
            mail(2, sender="bob@example.org", headers=(forged,)),
            mail(3, sender="carol@example.org"),
            mail(4, sender="dave@example.org", headers=(spf,)),
        ],
    )
    settings = notice_settings(
        smtp, require_authenticated_sender=True, trusted_authserv_ids=["MX.example.com"]
    )
    config = make_config(dovecot, account, webhook.url, reject_notices=settings)
    async with running(config):
        await settled(dovecot, account, [{"\\Seen"}] * 4)
    assert sorted(n.rcpt_tos for n in smtp.messages) == [
        ("alice@example.org",),
        ("dave@example.org",),
    ]
    assert len(logged(caplog, "no reject notice: sender not authenticated")) == 2


@pytest.mark.parametrize("code", [451, 421])
async def test_smtp_failing_keeps_the_message_unsettled_until_the_notice_is_sent(
    code: int,
    *,
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp.fail_next(1000, code)  # until recover()
    await dovecot.aappend(account, mail(1))
    config = make_config(dovecot, account, webhook.url, reject_notices=notice_settings(smtp))
    async with running(config):
        await smtp.wait_for_attempts(3)
        assert await flags_of(dovecot, account) == [set()]  # still failing: nothing settled
        smtp.recover()
        (notice,) = await smtp.wait_for(1)
        await settled(dovecot, account, [{"\\Seen"}])
    assert notice.rcpt_tos == ("alice@example.org",)
    assert [a.code for a in smtp.attempts][-1] == 250
    assert {a.code for a in smtp.attempts[:-1]} == {code}
    failures = logged(caplog, "reject notice attempt ")
    assert len(failures) == len(smtp.attempts) - 1
    assert (
        f"reject notice attempt 1 failed: SMTPDataError: {code} 4.3.0 Try again later"
        in (failures[0])
    )


async def test_smtp_down_past_give_up_after_dead_letters(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp.stop()
    await dovecot.aappend(account, mail(1))
    settings = notice_settings(smtp, retry={**FAST_RETRY, "give_up_after": 1})
    config = make_config(
        dovecot, account, webhook.url, failed_folder="Failed", reject_notices=settings
    )
    started = time.monotonic()
    async with running(config):
        await wait_until(lambda: count_in(dovecot, account, "Failed", 1), what="dead-lettered")
        elapsed = time.monotonic() - started
    assert await dovecot.amessages(account) == []
    (gave_up,) = logged(caplog, "giving up (reject_notices.retry.give_up_after)")
    assert "reject notice to alice@example.org failed for 1s" in gave_up
    assert "SMTPConnectError" in gave_up
    assert elapsed > 0.8  # it retried for give_up_after (1 s) before it gave up


async def test_smtp_refusing_the_notice_for_good_dead_letters_at_once(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp.fail_next(1, 550, "5.1.1 No such user", stage="RCPT")
    await dovecot.aappend(account, mail(1))
    config = make_config(dovecot, account, webhook.url, reject_notices=notice_settings(smtp))
    async with running(config):
        await settled(dovecot, account, [FAILED])
    assert [(a.stage, a.code) for a in smtp.attempts] == [("RCPT", 550)]
    (refused,) = logged(caplog, "refused the reject notice to alice@example.org for good")
    assert refused.endswith("SMTPRecipientRefused: 550 5.1.1 No such user; dead-lettering")


async def test_a_server_refusing_the_null_sender_gets_the_from_address(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp: SmtpServer = smtp_factory(refuse_null_sender=True)
    await dovecot.aappend(account, mail(1))
    config = make_config(dovecot, account, webhook.url, reject_notices=notice_settings(smtp))
    async with running(config):
        await smtp.wait_for(1)
        await dovecot.aappend(account, mail(2, sender="bob@example.org"))
        await smtp.wait_for(2)
        await settled(dovecot, account, [{"\\Seen"}] * 2)
    assert {n.mail_from for n in smtp.messages} == {"noreply@example.com"}
    assert [(a.stage, a.code) for a in smtp.attempts if a.code != 250] == [("MAIL", 553)]
    (warning,) = logged(caplog, "refused the null envelope sender")
    assert warning.endswith(
        "553 5.1.7 The null sender is not accepted; using noreply@example.com from now on"
    )


@pytest.mark.parametrize("mode", ["start_tls", "ssl"])
async def test_starttls_and_implicit_tls_with_auth(
    mode: str,
    *,
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = "smtp-pa55-" + secrets.token_hex(4)
    smtp: SmtpServer = smtp_factory(mode, user="mailroom", password=password)
    await dovecot.aappend(account, mail(1))
    config = make_config(dovecot, account, webhook.url, reject_notices=notice_settings(smtp))
    assert password not in repr(config)
    async with running(config):
        (notice,) = await smtp.wait_for(1)
        await settled(dovecot, account, [{"\\Seen"}])
    assert (notice.login, notice.tls, notice.rcpt_tos) == ("mailroom", True, ("alice@example.org",))
    assert password not in caplog.text


async def test_wrong_smtp_password_is_retried_said_loudly_then_given_up(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp_factory: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    smtp: SmtpServer = smtp_factory("start_tls", user="mailroom", password="right")
    await dovecot.aappend(account, mail(1))
    settings = notice_settings(smtp, retry={**FAST_RETRY, "give_up_after": 1})
    settings["smtp"]["password"] = "wrong-pa55word"
    config = make_config(dovecot, account, webhook.url, reject_notices=settings)
    async with running(config):
        await smtp.wait_for_attempts(2)
        assert await flags_of(dovecot, account) == [set()]  # a config fix may still cure it
        await settled(dovecot, account, [FAILED])
    assert smtp.messages == []
    assert {(a.stage, a.code) for a in smtp.attempts} == {("AUTH", 535)}
    (first, *_) = [r for r in caplog.records if "reject notice attempt 1" in r.getMessage()]
    assert first.levelno == logging.ERROR
    assert "SMTPAuthenticationError: 535" in first.getMessage()
    assert "check reject_notices.smtp.user, its password" in first.getMessage()
    assert "wrong-pa55word" not in caplog.text


async def test_notices_off_still_settles_rejected_mail(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    await dovecot.aappend(account, mail(1))
    async with running(make_config(dovecot, account, webhook.url)):
        await settled(dovecot, account, [{"\\Seen"}])
    assert logged(caplog, "no reject notice") == [
        f"{account.user}: uid 1: no reject notice (reject_notices is not configured)"
    ]


async def test_unparsable_mail_is_dead_lettered_without_a_notice(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await dovecot.aappend(account, b"\x00\x01 this is not an email\r\n\xff\xfe\r\n")
    await dovecot.aappend(account, message(2))
    config = make_config(dovecot, account, webhook.url, reject_notices=notice_settings(smtp))
    async with running(config):
        (request,) = await webhook.wait_for(1)
        await settled(dovecot, account, [FAILED, {"\\Seen"}])
    assert request.json()["subject"] == "test 2"
    assert (smtp.messages, smtp.attempts) == ([], [])
    (line,) = logged(caplog, "unparsable")
    assert line.startswith(f"{account.user}: uid 1: unparsable (")
