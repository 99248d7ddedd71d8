"""Servers without IDLE, MOVE, UIDPLUS or SEARCHRES: the fallbacks, on a real Dovecot.

Dovecot's ``imap_capability`` replaces the capability list it advertises after login, and
mailroom chooses its commands from what is advertised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest

from mailroom.config import ImapMailboxConfig, parse_config
from mailroom.sources.imap_session import ImapSession
from tests.helpers import config_dict, mailbox_dict, make_config, message, running, wait_until
from tests.servers.dovecot import Account, Dovecot
from tests.servers.proxy import TcpRelay
from tests.servers.webhook import WebhookReceiver


@pytest.fixture
def bare_dovecot() -> Iterator[Dovecot]:
    """A Dovecot that advertises neither IDLE nor MOVE, UIDPLUS or SEARCHRES."""
    with Dovecot(extra_config="imap_capability = IMAP4rev1 LITERAL+ ENABLE\n") as server:
        server.start()
        yield server


async def flags(dovecot: Dovecot, account: Account, mailbox: str = "INBOX") -> list[set[str]]:
    return [set(m.flags) for m in await dovecot.amessages(account, mailbox)]


def flags_are(
    dovecot: Dovecot, account: Account, expected: list[set[str]]
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await flags(dovecot, account) == expected

    return check


async def test_capabilities_told_by_the_greeting_and_the_login_are_not_asked_for(
    bare_dovecot: Dovecot,
) -> None:
    """Issue 23: Dovecot tells its capabilities in its greeting and in the answer to LOGIN
    (RFC 3501 §7.1), and mailroom asked for them after each all the same: two round trips of
    five before SELECT, for each of 1,000 mailboxes at start. What the login told is what
    counts: here the list ``imap_capability`` sets, not the longer one before login."""
    account = bare_dovecot.add_user()
    async with TcpRelay(bare_dovecot.host, bare_dovecot.port) as relay:
        box = mailbox_dict(bare_dovecot, account, port=relay.port, ssl=False, ca_file=None)
        config = parse_config(config_dict([box], "http://127.0.0.1:9/"), env={}).mailboxes[0]
        assert isinstance(config, ImapMailboxConfig)
        session = await ImapSession.open(config, timeout_s=10)
        try:
            assert session.capabilities == {"IMAP4REV1", "LITERAL+", "ENABLE"}
        finally:
            await session.logout()
    commands = [line.split(b" ")[1] for line in bytes(relay.sent).splitlines() if b" " in line]
    assert commands == [b"LOGIN", b"SELECT", b"LOGOUT"], relay.sent


@pytest.mark.slow
async def test_without_idle_the_periodic_sweep_finds_mail(
    bare_dovecot: Dovecot, webhook: WebhookReceiver
) -> None:
    account = bare_dovecot.add_user()
    config = make_config(bare_dovecot, account, webhook.url, idle_timeout=1)
    async with running(config):
        await bare_dovecot.aappend(account, message(0))
        await webhook.wait_for(1)  # first sweep: either at connect or one interval later
        await bare_dovecot.aappend(account, message(1))
        await webhook.wait_for(2)  # no IDLE, no push: only a later sweep can have found it
        await wait_until(flags_are(bare_dovecot, account, [{"\\Seen"}] * 2), what="both \\Seen")


async def test_without_move_and_uidplus_dead_letters_by_copy_and_leaves_expunge_alone(
    bare_dovecot: Dovecot, webhook: WebhookReceiver
) -> None:
    account = bare_dovecot.add_user()
    # Another client's deleted-but-not-expunged message must survive: no plain EXPUNGE.
    await bare_dovecot.aappend(account, message(0), flags="\\Seen \\Deleted")
    await bare_dovecot.aappend(account, message(1))
    webhook.respond(400)
    config = make_config(bare_dovecot, account, webhook.url, failed_folder="Failed", idle_timeout=1)
    async with running(config):
        await webhook.wait_for(1)

        async def copied() -> bool:  # as it was: no keyword keeps its webhook-id (identity)
            if "Failed" not in await asyncio.to_thread(bare_dovecot.mailboxes, account):
                return False
            return await flags(bare_dovecot, account, "Failed") == [frozenset()]

        await wait_until(copied, what="the copy in Failed")
        await wait_until(
            flags_are(bare_dovecot, account, [{"\\Seen", "\\Deleted"}, {"\\Seen", "\\Deleted"}]),
            what="the original flagged \\Seen \\Deleted, not expunged",
        )


async def test_without_uidplus_expunge_deleted_uses_plain_expunge(
    bare_dovecot: Dovecot, webhook: WebhookReceiver
) -> None:
    account = bare_dovecot.add_user()
    await bare_dovecot.aappend_many(account, [message(n) for n in range(3)])
    config = make_config(
        bare_dovecot,
        account,
        webhook.url,
        delete_after_delivery=True,
        expunge_deleted=True,
        idle_timeout=1,
    )
    async with running(config):
        await webhook.wait_for(3)
        await wait_until(flags_are(bare_dovecot, account, []), what="expunged")
