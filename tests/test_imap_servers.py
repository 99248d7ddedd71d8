"""The spine's core scenarios on every IMAP server the suite has: Dovecot, Cyrus and Courier
(``imap_server`` runs each test once per server; issue 21).

Push, a backlog, a restart of either side, a permanent 4xx to the flag and to ``failed_folder``
(``Failed``: at the top on Dovecot, ``INBOX.Failed`` on Cyrus and Courier), redrive keeping the
webhook-ids, and SIGKILL in the middle of a backlog.
"""

from __future__ import annotations

import base64
import json
import signal
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailroom.config import parse_config
from tests.helpers import (
    Process,
    config_dict,
    mailbox_dict,
    make_config,
    message,
    running,
    wait_until,
)
from tests.servers.imap import Account, ImapServer
from tests.servers.webhook import WebhookReceiver
from tests.test_redrive import cli

SEEN = frozenset({"\\Seen"})
SEEN_FAILED = frozenset({"$MailroomFailed", "\\Seen"})
# Long enough that only a push can bring a message within the waits below.
NO_SWEEP_S = 600


async def flags_are(
    server: ImapServer, account: Account, expected: list[frozenset[str]], mailbox: str = "INBOX"
) -> bool:
    """The messages in ``mailbox`` have these flags (a dead letter's $MailroomId_ aside)."""
    flags = await server.aflags(account, mailbox)
    return [{f for f in each if not f.startswith("$MailroomId_")} for each in flags] == expected


async def test_new_mail_is_pushed(
    imap_server: ImapServer, imap_account: Account, webhook: WebhookReceiver
) -> None:
    config = make_config(imap_server, imap_account, webhook.url, idle_timeout=NO_SWEEP_S)
    async with running(config):
        await imap_server.aappend(imap_account, message(0))  # found by the first sweep, or pushed
        await webhook.wait_for(1, timeout=30)
        for n in (1, 2):  # the watcher is idling now: only a push finds these before 600 s
            await imap_server.aappend(imap_account, message(n))
            await webhook.wait_for(n + 1, timeout=30)
        await wait_until(lambda: flags_are(imap_server, imap_account, [SEEN] * 3), what="seen")
    assert [r.json()["subject"] for r in webhook.requests] == ["test 0", "test 1", "test 2"]


async def test_a_backlog_is_delivered_once_each(
    imap_server: ImapServer, imap_account: Account, webhook: WebhookReceiver
) -> None:
    raws = [message(n) for n in range(60)]
    await imap_server.aappend_many(imap_account, raws)
    async with running(make_config(imap_server, imap_account, webhook.url)):
        received = await webhook.wait_for(60, timeout=60)
        await wait_until(
            lambda: flags_are(imap_server, imap_account, [SEEN] * 60), what="all 60 seen"
        )
    assert sorted(base64.b64decode(r.json()["raw"]) for r in received) == sorted(raws)
    assert len({r.headers["webhook-id"] for r in received}) == 60


async def test_the_server_restarted_under_an_idling_watcher(
    imap_server: ImapServer, server_factory: Callable[..., ImapServer], webhook: WebhookReceiver
) -> None:
    server = server_factory(imap_server.name)
    account = server.add_user()
    async with running(make_config(server, account, webhook.url, idle_timeout=NO_SWEEP_S)):
        await server.aappend(account, message(0))
        await webhook.wait_for(1, timeout=30)
        server.restart()
        await server.aappend(account, message(1))
        await webhook.wait_for(2, timeout=60)  # the sweep after the reconnect
        await wait_until(lambda: flags_are(server, account, [SEEN] * 2), what="both seen")
    assert len(webhook.requests) == 2


async def test_mailroom_restarted_takes_up_where_it_left(
    imap_server: ImapServer, imap_account: Account, webhook: WebhookReceiver
) -> None:
    config = make_config(imap_server, imap_account, webhook.url)
    await imap_server.aappend_many(imap_account, [message(n) for n in range(3)])
    async with running(config):
        await webhook.wait_for(3, timeout=30)
        await wait_until(lambda: flags_are(imap_server, imap_account, [SEEN] * 3), what="seen")
    await imap_server.aappend_many(imap_account, [message(n) for n in range(3, 5)])
    async with running(config):
        await webhook.wait_for(5, timeout=30)
        await wait_until(lambda: flags_are(imap_server, imap_account, [SEEN] * 5), what="seen")
    assert [r.json()["subject"] for r in webhook.requests[3:]] == ["test 3", "test 4"]


@pytest.mark.slow  # mailroom redrive as a process
@pytest.mark.parametrize("failed_folder", [None, "Failed"])
async def test_a_permanent_4xx_dead_letters_once_and_redrive_keeps_the_id(
    failed_folder: str | None,
    imap_server: ImapServer,
    imap_account: Account,
    webhook: WebhookReceiver,
    tmp_path: Path,
) -> None:
    box = mailbox_dict(
        imap_server, imap_account, idle_timeout=NO_SWEEP_S, failed_folder=failed_folder
    )
    document = config_dict([box], webhook.url)
    webhook.respond(400)
    await imap_server.aappend(imap_account, message(1))
    async with running(parse_config(document, env={})):
        first = (await webhook.wait_for(1, timeout=30))[0]
        if failed_folder is None:
            dead = [SEEN_FAILED]
            await wait_until(lambda: flags_are(imap_server, imap_account, dead), what="flagged")
        else:
            folder = imap_server.folder(failed_folder)
            await wait_until(lambda: _count_is(imap_server, imap_account, 1, folder), what="moved")
            assert await imap_server.amessages(imap_account) == []
        assert len(webhook.requests) == 1  # posted once, not again
        webhook.respond(200)
        code, out, err = await cli(document, tmp_path)
        assert code == 0, out + err
        assert "1 dead letter(s) redriven under their webhook-ids" in out
        # Flag cleared in place: the watcher hears of it during IDLE (Dovecot, Cyrus) or
        # finds it at a sweep; moved back: announced as new mail.
        second = (await webhook.wait_for(2, timeout=NO_SWEEP_S / 2))[1]
        await wait_until(
            lambda: _count_is(imap_server, imap_account, 1, "INBOX", seen=True), what="delivered"
        )
    assert second.headers["webhook-id"] == first.headers["webhook-id"]


async def _count_is(
    server: ImapServer, account: Account, count: int, mailbox: str, *, seen: bool = False
) -> bool:
    flags = await server.aflags(account, mailbox)
    return len(flags) == count and (not seen or all("\\Seen" in f for f in flags))


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


@pytest.mark.slow  # mailroom as real processes, killed
async def test_sigkill_mid_backlog_loses_nothing(
    imap_server: ImapServer,
    imap_account: Account,
    webhook: WebhookReceiver,
    processes: list[Process],
    tmp_path: Path,
) -> None:
    count = 300
    raws = [message(n) for n in range(count)]
    await imap_server.aappend_many(imap_account, raws)
    config = config_dict([mailbox_dict(imap_server, imap_account)], webhook.url)
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        processes.append(Process(config, tmp_path / name))
    first, second = processes
    first.start()
    await webhook.wait_for(30, timeout=30)
    first.signal(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    delivered_before = len(webhook.requests)
    assert delivered_before < count, "the backlog finished before the kill; nothing was tested"
    second.start()
    await wait_until(
        lambda: _count_is(imap_server, imap_account, count, "INBOX", seen=True),
        timeout=60,
        what=f"all {count} seen",
    )
    second.signal(signal.SIGTERM)
    assert await second.wait() == 0
    ids_by_raw: dict[bytes, set[str]] = defaultdict(set)
    for request in webhook.requests:
        payload = json.loads(request.body)
        ids_by_raw[base64.b64decode(payload["raw"])].add(request.headers["webhook-id"])
    assert set(ids_by_raw) == set(raws), "a message was lost"
    assert all(len(ids) == 1 for ids in ids_by_raw.values()), "a repeat changed its webhook-id"
