"""What Cyrus and Courier showed that Dovecot did not (issue 21), on the real servers: folder
names against the server's hierarchy (item 3), 8-bit credentials (item 4), IDLE that does not
push (item 2), a push's round trips without SEARCHRES (item 5), and Cyrus's cap on keywords
(item 1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mailroom.config import parse_config
from tests.helpers import config_dict, mailbox_dict, message, running, wait_until
from tests.servers.dovecot import free_port
from tests.servers.imap import Account, ImapServer
from tests.servers.webhook import WebhookReceiver
from tests.test_health import Probe, value, with_health
from tests.test_redrive import cli

SEEN = frozenset({"\\Seen"})
SEEN_FAILED = frozenset({"$MailroomFailed", "\\Seen"})


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        yield client


async def flags_are(
    server: ImapServer, account: Account, expected: list[frozenset[str]], mailbox: str = "INBOX"
) -> bool:
    """The messages in ``mailbox`` have these flags (a dead letter's $MailroomId_ aside)."""
    flags = await server.aflags(account, mailbox)
    return [{f for f in each if not f.startswith("$MailroomId_")} for each in flags] == expected


# -- item 3: folder names against the server's hierarchy ----------------------------------------


@pytest.mark.parametrize("failed_folder", ["INBOX/Failed", "INBOX.Failed", "Failed/Mailroom"])
async def test_failed_folder_means_what_the_user_meant_on_every_server(
    failed_folder: str, imap_server: ImapServer, imap_account: Account, webhook: WebhookReceiver
) -> None:
    webhook.respond(400)
    await imap_server.aappend(imap_account, message(1))
    box = mailbox_dict(imap_server, imap_account, failed_folder=failed_folder)
    # INBOX/Failed and INBOX.Failed: under INBOX everywhere; Failed/Mailroom: a folder Failed
    # of the user's own, with Mailroom in it (INBOX.Failed.Mailroom on Cyrus and Courier).
    where = imap_server.folder(failed_folder.replace(".", "/"))
    async with running(parse_config(config_dict([box], webhook.url), env={})):
        await webhook.wait_for(1, timeout=30)
        await wait_until(lambda: flags_are(imap_server, imap_account, [frozenset()], where),
                         what=f"moved to {where}")  # fmt: skip
    assert await imap_server.aflags(imap_account) == []
    assert len(webhook.requests) == 1


# A folder each server refuses to create: a name Dovecot forbids; another user's folder on Cyrus
# (its "user." namespace: permission denied); the shared namespace on Courier (ACL "c" needed).
REFUSED = {"dovecot": "~Failed", "cyrus": "user.someone-else.Failed", "courier": "#shared.Failed"}


async def test_a_failed_folder_refused_for_good_keeps_dead_letters_in_place_not_ready(
    imap_server: ImapServer,
    imap_account: Account,
    webhook: WebhookReceiver,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    folder = REFUSED[imap_server.name]
    port = free_port()
    probe = Probe(session, port)
    box = mailbox_dict(imap_server, imap_account, failed_folder=folder, idle_timeout=2)
    document = with_health(config_dict([box], webhook.url), port)
    webhook.respond(400)
    await imap_server.aappend(imap_account, message(1))
    async with running(parse_config(document, env={})):
        await webhook.wait_for(1, timeout=30)
        await wait_until(lambda: flags_are(imap_server, imap_account, [SEEN_FAILED]),
                         what="flagged $MailroomFailed in place")  # fmt: skip
        await wait_until(probe.not_ready, what="/readyz 503")
        _, body = await probe.get("/readyz")
        refused = body["mailboxes"][imap_account.user]["failed_folder_refused"]
        assert refused.startswith(f"failed_folder {folder}")
        assert "dead letters are flagged $MailroomFailed in INBOX instead" in refused
        assert value(
            await probe.metrics(), "mailroom_dead_letters_kept_in_place_total",
            mailbox=imap_account.user,
        ) == 1  # fmt: skip
        # Sweeps every 2 s (idle_timeout) find it no more: it is never posted again.
        await imap_server.aappend(imap_account, message(2))
        await webhook.wait_for(2, timeout=30)
        await wait_until(lambda: flags_are(imap_server, imap_account, [SEEN_FAILED] * 2),
                         what="the second one flagged too")  # fmt: skip
        code, out, _ = await cli(document, tmp_path, "--dry-run")
        assert code == 0 and "2 dead letter(s) would be redriven (2 with their own" in out
    assert [r.json()["subject"] for r in webhook.requests] == ["test 1", "test 2"]
