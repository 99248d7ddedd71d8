"""``mailroom run --dry-run`` against a real inbox: every decision logged, nothing touched."""

from __future__ import annotations

import asyncio
import logging

import pytest

from mailroom import cli
from mailroom.config import parse_config
from mailroom.kinds import KINDS
from mailroom.runtime import supervisor
from tests.helpers import config_dict, logged, mailbox_dict, message, wait_until
from tests.servers.dovecot import Account, Dovecot
from tests.servers.smtp import SmtpServer
from tests.servers.webhook import WebhookReceiver


@pytest.mark.slow
async def test_a_dry_run_logs_each_decision_and_settles_nothing(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp: SmtpServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    caplog.set_level(logging.DEBUG, logger="mailroom.imap")
    for_the_app = message(1, to="incoming+ticket-7@example.com")
    for_a_person = message(2, to="alice@example.com")
    auto_reply = message(3, to="alice@example.com").replace(
        b"Subject:", b"Auto-Submitted: auto-replied\r\nSubject:", 1
    )
    await dovecot.aappend_many(account, [for_the_app, for_a_person, auto_reply])
    before = await dovecot.amessages(account)
    notices = {"from": "noreply@example.com", "smtp": {"host": smtp.host, "port": smtp.port}}
    box = mailbox_dict(dovecot, account, delete_after_delivery=True, idle_timeout=1)
    config = parse_config(config_dict([box], webhook.url, reject_notices=notices), env={})
    stop = asyncio.Event()
    task = asyncio.create_task(supervisor.run(config, stop, kinds=KINDS, dry_run=True))
    try:
        await wait_until(
            lambda: _count(caplog, "dry run:", 3), what="three dry-run decisions", timeout=30
        )
        # Periodic sweeps (idle_timeout: 1) find the three again and leave them alone.
        swept = len(logged(caplog, "sweeping the whole mailbox"))
        await wait_until(
            lambda: _count(caplog, "sweeping the whole mailbox", swept + 2),
            what="two more sweeps",
            timeout=30,
        )
        await dovecot.aappend(account, message(4, to="incoming+later@example.com"))
        await wait_until(lambda: _count(caplog, "dry run:", 4), what="the fourth", timeout=30)
    finally:
        stop.set()
        async with asyncio.timeout(30):
            assert await task == 0
    lines = logged(caplog, "dry run:")
    assert len(lines) == 4, lines  # each message once, though sweeps came between
    assert any("uid 1: dry run: would POST to" in line and "key ticket-7" in line for line in lines)
    assert any(
        "uid 2: dry run: would reject it (unknown incoming email); notice: a reject notice to "
        "sender2@example.org" in line
        for line in lines
    )
    assert any("uid 3: dry run: would ignore it as auto-generated (auto_submitted)" in line
               for line in lines)  # fmt: skip
    assert logged(caplog, "DRY RUN: nothing is posted, sent or settled")
    assert webhook.requests == [] and smtp.messages == []
    after = await dovecot.amessages(account)
    assert [(m.uid, m.flags) for m in after] == [(m.uid, m.flags) for m in before] + [
        (4, frozenset())
    ]  # untouched: not \Seen, not \Deleted (delete_after_delivery: true), not flagged


async def _count(caplog: pytest.LogCaptureFixture, text: str, count: int) -> bool:
    return len(logged(caplog, text)) >= count


def test_the_cli_takes_dry_run() -> None:
    args = cli._parser().parse_args(["run", "--dry-run", "-c", "x.yml"])
    assert args.dry_run is True
    assert cli._parser().parse_args(["--dry-run", "-c", "x.yml"]).dry_run is True
