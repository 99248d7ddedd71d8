"""Mail announced by an IDLE push, fetched with the push (``ImapSession.fetch_pushed``).

DONE, ``SEARCH RETURN (SAVE) criteria <new sequence numbers>`` and ``UID FETCH $`` with the
bodies go out back to back, so a pushed message costs one round trip instead of four (DONE,
SEARCH, FETCH sizes, FETCH bodies). On a real Dovecot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from mailroom.config import ImapMailboxConfig
from mailroom.sources.imap_session import ImapSession
from mailroom.sources.imap_wire import FetchedMessage
from tests.helpers import make_config, message, running, wait_until
from tests.servers.dovecot import Account, Dovecot
from tests.servers.webhook import WebhookReceiver

MiB = 1024 * 1024


def mailbox_config(dovecot: Dovecot, account: Account) -> ImapMailboxConfig:
    mailbox = make_config(dovecot, account, "http://127.0.0.1:9/").mailboxes[0]
    assert isinstance(mailbox, ImapMailboxConfig)
    return mailbox


@pytest.fixture
async def session(dovecot: Dovecot, account: Account) -> AsyncIterator[ImapSession]:
    opened = await ImapSession.open(mailbox_config(dovecot, account), timeout_s=10)
    try:
        yield opened
    finally:
        await opened.logout()


async def idle_until_pushed(session: ImapSession) -> None:
    """IDLE (left open) until the server announces new mail."""
    never = asyncio.Event()
    assert await session.idle([never], timeout_s=10) is False, "no push within 10 s"
    assert session.new_mail.is_set()
    session.new_mail.clear()


async def test_pushed_messages_come_with_their_bodies_and_the_search_applies(
    dovecot: Dovecot, account: Account, session: ImapSession
) -> None:
    seen, unseen = message(1), message(2, size=3000)
    await dovecot.aappend(account, seen, flags="\\Seen")
    await dovecot.aappend(account, unseen)
    found: list[FetchedMessage] = []
    for _ in range(2):  # Dovecot may announce the two in one push or in two
        await idle_until_pushed(session)
        pushed = await session.fetch_pushed("UNSEEN", max_count=8, body_bytes=MiB)
        assert pushed is not None
        found += pushed
        if session.exists == 2:
            break
    assert [(m.uid, m.size, m.body) for m in found] == [(2, len(unseen), unseen)]
    # The IDLE was ended on the way: an ordinary command works at once.
    assert [m.uid for m in await session.search_sizes("ALL")] == [1, 2]


async def test_a_body_of_body_bytes_or_more_comes_back_as_its_size_only(
    dovecot: Dovecot, account: Account, session: ImapSession
) -> None:
    raw = message(1, size=4096)
    await dovecot.aappend(account, raw)
    await idle_until_pushed(session)
    pushed = await session.fetch_pushed("ALL", max_count=8, body_bytes=1024)
    assert pushed == [FetchedMessage(uid=1, size=len(raw), body=None)]


async def test_criteria_with_a_charset_work_with_the_pushed_range(
    dovecot: Dovecot, account: Account, session: ImapSession
) -> None:
    raw = message(1)
    await dovecot.aappend(account, raw)
    await idle_until_pushed(session)
    pushed = await session.fetch_pushed("CHARSET UTF-8 UNSEEN", max_count=8, body_bytes=MiB)
    assert pushed == [FetchedMessage(uid=1, size=len(raw), body=raw)]


async def test_more_new_messages_than_max_count_are_left_to_a_full_sweep(
    dovecot: Dovecot, account: Account, session: ImapSession
) -> None:
    await dovecot.aappend_many(account, [message(n) for n in range(3)])
    await idle_until_pushed(session)
    assert session.exists == 3
    assert await session.fetch_pushed("ALL", max_count=2, body_bytes=MiB) is None
    # The IDLE is still open; the sweep's pipelined DONE ends it.
    assert [m.uid for m in await session.search_sizes("ALL")] == [1, 2, 3]


async def test_an_expunge_during_the_idle_keeps_the_pushed_range_right(
    dovecot: Dovecot, account: Account
) -> None:
    await dovecot.aappend_many(account, [message(n) for n in range(3)])
    session = await ImapSession.open(mailbox_config(dovecot, account), timeout_s=10)
    try:
        assert session.exists == 3
        session.new_mail.clear()  # as a sweep of the three would
        never = asyncio.Event()
        idling = asyncio.create_task(session.idle([never], timeout_s=10))
        with dovecot.imap(account) as other:  # another client removes message 1
            other.select("INBOX")
            other.uid("STORE", "1", "+FLAGS.SILENT", "(\\Deleted)")
            other.expunge()

        async def expunged() -> bool:
            return session.exists == 2

        await wait_until(expunged, what="the EXPUNGE push")
        assert not idling.done()  # fewer messages is not new mail
        raw = message(9)
        await dovecot.aappend(account, raw)
        assert await idling is False
        # New is sequence number 3 now, not 4: a range from before the EXPUNGE would miss it.
        pushed = await session.fetch_pushed("ALL", max_count=8, body_bytes=MiB)
        assert pushed == [FetchedMessage(uid=4, size=len(raw), body=raw)]
    finally:
        await session.logout()


async def test_the_watcher_delivers_pushed_mail_by_the_one_round_trip_path(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailroom.imap")
    config = make_config(dovecot, account, webhook.url)
    async with running(config):
        await dovecot.aappend(account, message(0))  # found by the first sweep
        await webhook.wait_for(1)
        await dovecot.aappend(account, message(1))  # announced by a push
        (_, second) = await webhook.wait_for(2)
        assert second.json()["subject"] == "test 1"
    assert any("the push brought 1 new messages" in r.getMessage() for r in caplog.records)
