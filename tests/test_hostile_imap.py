"""Issue 18: a hostile IMAP server costs its own mailbox, never the process.

Each mode of ``tests/servers/hostile_imap.py`` runs beside a healthy Dovecot mailbox in the same
mailroom: the healthy one keeps delivering, the hostile one's connection is dropped (or its bad
item skipped), and the process's peak RSS (VmHWM, reset first) stays bounded.
"""

from __future__ import annotations

import logging
import time

import pytest

from mailroom.config import parse_config
from mailroom.logs import TextFormatter
from tests.helpers import config_dict, logged, mailbox_dict, message, running, wait_until
from tests.servers.dovecot import Account, Dovecot
from tests.servers.hostile_imap import MODES, PASSWORD, USER, HostileImap
from tests.servers.webhook import WebhookReceiver

PEAK_RSS_MIB = 150  # what a hostile server may add to the process's peak RSS, at most
HEALTHY_MESSAGES = 3


def _status_kib(name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {name} in /proc/self/status")


def reset_peak_rss() -> int:
    """Set VmHWM back to the current RSS (proc(5), clear_refs "5"); the RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return _status_kib("VmRSS")


def hostile_mailbox(server: HostileImap) -> dict[str, object]:
    starttls = {"start_tls": True} if server.mode == "inject@starttls" else {}
    return {
        **starttls,
        "id": "hostile",
        "address": "incoming+%{key}@example.com",
        "host": server.host,
        "port": server.port,
        "user": USER,
        "password": PASSWORD,
        "idle_timeout": 60,
        "delete_after_delivery": False,
    }


# What shows that the hostile mailbox met its mode.
_DROPPED = "dropping the connection"
SIGNS = {
    "healthy": None,
    "bignum@select": "UIDVALIDITY out of range",
    "bignum@search": "UIDs out of range in a SEARCH answer",
    "bignum@fetch": "a UID or RFC822.SIZE out of range",
    "bignum@idle": None,  # a count no server can have: not new mail, nothing else
    "control@login": "login as hostile refused",
    "inject@starttls": "sent more after its STARTTLS answer, before TLS began; refused",
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
async def test_a_hostile_server_costs_its_own_mailbox_only(
    mode: str,
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    with HostileImap(mode, max_seconds=20) as server:
        config = parse_config(
            config_dict(
                [mailbox_dict(dovecot, account), hostile_mailbox(server)],
                webhook.url,
            ),
            env={},
        )
        before_kib = reset_peak_rss()
        latencies = []
        async with running(config):
            sign = SIGNS.get(mode, _DROPPED)
            if sign is not None:
                await wait_until(lambda: bool(logged(caplog, sign)), timeout=30, what=sign)
            for n in range(HEALTHY_MESSAGES):
                appended = time.monotonic()
                dovecot.append(account, message(n))
                await wait_until(
                    lambda n=n: _posts(webhook, account.user) == n + 1,  # type: ignore[misc]
                    timeout=30,
                    what=f"healthy message {n}",
                )
                latencies.append(time.monotonic() - appended)
            if mode == "lie@fetch":
                # Its true size learned from the literal it announced, the message is taken as
                # too large next time: dead-lettered, not posted, and the mailbox moves on.
                said = "400000000 bytes is over max_message_bytes"
                await wait_until(lambda: bool(logged(caplog, said)), what="the size learned")
            if mode in ("healthy", "bignum@search", "bignum@fetch", "bignum@idle"):
                # The bad item was skipped, the good message delivered, the source not restarted.
                await wait_until(lambda: _posts(webhook, "hostile") == 1, what="the good message")
        peak_mib = (_status_kib("VmHWM") - before_kib) / 1024
    assert _posts(webhook, account.user) == HEALTHY_MESSAGES
    assert peak_mib < PEAK_RSS_MIB, f"{mode}: peak RSS grew by {peak_mib:.0f} MiB"
    assert not logged(caplog, "restarting"), "a hostile server is no bug of mailroom's"
    print(f"{mode}: peak RSS +{peak_mib:.1f} MiB; healthy latency {max(latencies):.3f}s at most")


def _posts(webhook: WebhookReceiver, mailbox: str) -> int:
    posts = [r for r in webhook.requests if r.headers["X-Mailroom-Mailbox"] == mailbox]
    if mailbox == "hostile":
        assert all(r.json()["subject"] == "from a hostile server" for r in posts)
    return len(posts)


@pytest.mark.slow
async def test_a_server_cannot_forge_a_text_log_line(
    webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 10: a NO whose text has a bare LF and terminal escapes: in the text log it stays
    one line, the LF and ESC escaped."""
    caplog.set_level(logging.INFO, logger="mailroom")
    with HostileImap("control@login") as server:
        config = parse_config(config_dict([hostile_mailbox(server)], webhook.url), env={})
        async with running(config):
            await wait_until(lambda: bool(logged(caplog, "refused")), what="the refused login")
    records = [r for r in caplog.records if "login as hostile refused" in r.getMessage()]
    text = TextFormatter().format(records[0])  # the server's text replaced at the edge
    assert "\n" not in text and "\x1b" not in text
    assert "no?2026-01-01 ERROR mailroom: forged ?[2J?[31m" in text


def test_the_text_log_escapes_control_characters() -> None:
    """Whatever reaches a text log line, wherever from, stays on it (escaped)."""
    record = logging.LogRecord(
        "mailroom.imap", logging.ERROR, __file__, 1, "%s: %s", ("box", "a\nb\x1b[2J\u2028c"), None
    )
    text = TextFormatter().format(record)
    assert text.endswith("ERROR mailroom.imap box: a\\nb\\x1b[2J\\u2028c")
    assert record.getMessage() == "box: a\nb\x1b[2J\u2028c"  # other handlers see it as it was
