"""Redrive an IMAP mailbox's dead letters, through ``ImapSession`` like the watcher.

Two places, each on its own connection: the mailbox itself (messages flagged
``$MailroomFailed``, whatever ``failed_folder`` says now: the config may have changed since), and
``failed_folder`` when it is set and exists (every message not ``\\Deleted``). In a dry run both
are opened with EXAMINE (RFC 3501 §6.3.2), so nothing can change, not even ``\\Recent``.

A message goes back in the state the watcher looks for: ``$MailroomFailed`` and ``\\Seen``
cleared first, then (from ``failed_folder``) ``UID MOVE`` to the mailbox. Cleared first: a crash
in between leaves it in ``failed_folder`` for the next redrive, not read in the mailbox, where
no redrive would look. The watcher finds a message moved back at once (IDLE announces it), and a
flag cleared in place at once too when the server sends the flag change during IDLE (Dovecot
does), else at its periodic sweep (``idle_timeout``).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from collections.abc import AsyncIterator, Awaitable, Callable

from mailroom.config import ImapMailboxConfig
from mailroom.envelope import FAILED_KEYWORD
from mailroom.mail import message
from mailroom.redrive.job import Job, Letter
from mailroom.sources.imap import idempotency_key
from mailroom.sources.imap_session import ImapSession
from mailroom.sources.imap_wire import FetchedMessage
from mailroom.trust.providers import token_provider

__all__ = ["redrive"]

BATCH = 500  # messages per UID FETCH, STORE and MOVE
ITEMS = "UID RFC822.SIZE FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


async def redrive(config: ImapMailboxConfig, job: Job) -> None:
    """Put back the dead letters of one mailbox (``Stopped`` or ``MailroomError`` on failure)."""
    tokens = token_provider(config.oauth, label=config.id) if config.oauth is not None else None
    token = tokens.token if tokens is not None else None
    folder = config.failed_folder
    try:
        session = await _open(config, config.mailbox, job, token)
        try:
            await _flagged(session, config, job)
            exists = folder is not None and await session.folder_exists(folder)
        finally:
            await session.logout()
        if folder is None or not exists:
            return
        session = await _open(config, folder, job, token)
        try:
            await _moved(session, config, job)
        finally:
            await session.logout()
    finally:
        if tokens is not None:
            tokens.close()


async def _open(
    config: ImapMailboxConfig,
    folder: str,
    job: Job,
    token: Callable[[], Awaitable[str]] | None,
) -> ImapSession:
    session = await ImapSession.connect(dataclasses.replace(config, mailbox=folder), token=token)
    try:
        await session.login()
        await session.select(readonly=job.options.dry_run)
    except BaseException:
        session.abort()
        raise
    return session


async def _flagged(session: ImapSession, config: ImapMailboxConfig, job: Job) -> None:
    """Dead letters flagged in place: same UID, so the same webhook-id."""
    criteria = f"KEYWORD {FAILED_KEYWORD} NOT DELETED{_since(job)}"
    async for batch in _batches(session, criteria, job):
        letters = [
            _letter(
                item,
                f"in {config.mailbox}",
                item.webhook_id or idempotency_key(config.id, session.uidvalidity, item.uid),
            )
            for item in batch
        ]
        await job.apply(
            config.id,
            letters,
            functools.partial(_clear, session, [item.uid for item in batch]),
            f"{FAILED_KEYWORD} and \\Seen cleared",
            f"would clear {FAILED_KEYWORD} and \\Seen",
        )


async def _moved(session: ImapSession, config: ImapMailboxConfig, job: Job) -> None:
    """Dead letters in failed_folder: cleared, then moved back to the mailbox."""
    async for batch in _batches(session, f"NOT DELETED{_since(job)}", job):
        await job.apply(
            config.id,
            [_letter(item, f"in {config.failed_folder}", item.webhook_id) for item in batch],
            functools.partial(_move_back, session, [item.uid for item in batch], config),
            f"moved back to {config.mailbox}",
            f"would move back to {config.mailbox}",
        )


async def _clear(session: ImapSession, uids: list[int]) -> None:
    await session.store(uids, f"{FAILED_KEYWORD} \\Seen", remove=True)


async def _move_back(session: ImapSession, uids: list[int], config: ImapMailboxConfig) -> None:
    await _clear(session, uids)
    await session.move(uids, config.mailbox, expunge=config.expunge_deleted)


async def _batches(
    session: ImapSession, criteria: str, job: Job
) -> AsyncIterator[list[FetchedMessage]]:
    """The messages matching ``criteria`` and ``--since``, in batches, oldest UID first."""
    uids = await session.search(criteria)
    for start in range(0, len(uids), BATCH):
        fetched = await session.fetch(uids[start : start + BATCH], ITEMS)
        batch = [item for item in fetched if job.wanted(item.internal_date)]
        if batch:
            yield sorted(batch, key=lambda item: item.uid)


def _since(job: Job) -> str:
    """SEARCH SINCE a day early (it compares dates only, in the server's idea of the zone,
    RFC 3501 §6.4.4); INTERNALDATE then decides to the second."""
    if job.options.since is None:
        return ""
    day = (job.options.since - datetime.timedelta(days=1)).date()
    return f" SINCE {day.day}-{_MONTHS[day.month - 1]}-{day.year}"


def _letter(item: FetchedMessage, where: str, webhook_id: str | None) -> Letter:
    message_id = message.parse(item.body).message_id if item.body else None
    return Letter(
        where=f"uid {item.uid} {where}",
        received=item.internal_date,
        message_id=message_id,
        webhook_id=webhook_id,
    )
