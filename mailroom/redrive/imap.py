"""Redrive an IMAP mailbox's dead letters, through ``ImapSession`` like the watcher.

Two places, each on its own connection: the mailbox itself (messages flagged
``$MailroomFailed``, whatever ``failed_folder`` says now: the config may have changed since), and
``failed_folder`` when it is set and exists (every message not ``\\Deleted``). In a dry run both
are opened with EXAMINE (RFC 3501 §6.3.2), so nothing can change, not even ``\\Recent``.

Each dead letter's webhook-id is found from the message itself, as the watcher computes it
(``identity``: the mailbox's server identity and the message's bytes, or its header block when
it is over ``max_message_bytes``): its bodies are fetched in batches bounded in bytes. A
``$MailroomId_`` keyword of a version before 0.2 gives the id only with
``legacy_id_keywords: true``, as in the watcher.

A message goes back in the state the watcher looks for: ``$MailroomFailed`` and ``\\Seen``
cleared first, then (from ``failed_folder``) ``UID MOVE`` to the mailbox. Cleared first: a crash
in between leaves it in ``failed_folder`` for the next redrive, not read in the mailbox, where
no redrive would look. The watcher finds a message moved back at once (IDLE announces it), and a
flag cleared in place at once too when the server sends the flag change during IDLE (Dovecot
does), else at its periodic sweep (``idle_timeout``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
from collections.abc import AsyncIterator, Awaitable, Callable

from mailroom.config import ImapMailboxConfig
from mailroom.envelope import FAILED_KEYWORD
from mailroom.mail import message
from mailroom.redrive.job import Job, Letter
from mailroom.sources.imap import PUSH_BODY_BYTES, webhook_id
from mailroom.sources.imap_session import ImapSession
from mailroom.sources.imap_wire import BodyLimits, FetchedMessage
from mailroom.trust.providers import token_provider

__all__ = ["redrive"]

BATCH = 500  # messages per UID FETCH, STORE and MOVE
BODY_BATCH_BYTES = 16 * 1024 * 1024  # bodies fetched at once (at least one, however large)
ITEMS = "UID RFC822.SIZE FLAGS INTERNALDATE"
HEAD_BYTES = 64 * 1024  # where a Message-ID is looked for
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
    """Dead letters flagged in place."""
    criteria = f"KEYWORD {FAILED_KEYWORD} NOT DELETED{_since(job)}"
    async for batch in _batches(session, config, criteria, job):
        await job.apply(
            config.id,
            [letter for _, letter in batch],
            functools.partial(_clear, session, [uid for uid, _ in batch]),
            f"{FAILED_KEYWORD} and \\Seen cleared",
            f"would clear {FAILED_KEYWORD} and \\Seen",
        )


async def _moved(session: ImapSession, config: ImapMailboxConfig, job: Job) -> None:
    """Dead letters in failed_folder: cleared, then moved back to the mailbox."""
    async for batch in _batches(session, config, f"NOT DELETED{_since(job)}", job):
        await job.apply(
            config.id,
            [letter for _, letter in batch],
            functools.partial(_move_back, session, [uid for uid, _ in batch], config),
            f"moved back to {config.mailbox}",
            f"would move back to {config.mailbox}",
        )


async def _clear(session: ImapSession, uids: list[int]) -> None:
    await session.store(uids, f"{FAILED_KEYWORD} \\Seen", remove=True)


async def _move_back(session: ImapSession, uids: list[int], config: ImapMailboxConfig) -> None:
    await _clear(session, uids)
    await session.move(uids, config.mailbox, expunge=config.expunge_deleted)


async def _batches(
    session: ImapSession, config: ImapMailboxConfig, criteria: str, job: Job
) -> AsyncIterator[list[tuple[int, Letter]]]:
    """The messages matching ``criteria`` and ``--since``, in batches, oldest UID first, each
    with its letter (where it is, and the webhook-id it will be posted under)."""
    uids = await session.search(criteria)
    for start in range(0, len(uids), BATCH):
        fetched = await session.fetch(uids[start : start + BATCH], ITEMS)
        wanted = sorted(
            (item for item in fetched if job.wanted(item.internal_date)), key=lambda i: i.uid
        )
        letters = []
        for part in _by_bytes(wanted, config.max_message_bytes):
            letters += await _letters(session, config, part)
        if letters:
            yield letters


def _by_bytes(items: list[FetchedMessage], cap: int) -> list[list[FetchedMessage]]:
    """``items`` in runs of at most ``BODY_BATCH_BYTES`` to fetch (at least one each)."""
    runs: list[list[FetchedMessage]] = []
    size = 0
    for item in items:
        cost = min(item.size, cap) if item.size <= cap else PUSH_BODY_BYTES
        if not runs or size + cost > BODY_BATCH_BYTES:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += cost
    return runs


async def _letters(
    session: ImapSession, config: ImapMailboxConfig, items: list[FetchedMessage]
) -> list[tuple[int, Letter]]:
    """Fetch the bodies of ``items`` (or the header block of those over max_message_bytes,
    as the watcher does) and name each as the watcher will."""
    cap = config.max_message_bytes
    small = {item.uid: item.size for item in items if item.size <= cap}
    large = [item.uid for item in items if item.size > cap]
    bodies: dict[int, tuple[bytes, bool]] = {}
    if small:
        limits = BodyLimits(cap, small)
        for got in await session.fetch(small, "UID RFC822.SIZE BODY.PEEK[]", limits=limits):
            if got.body is not None:
                bodies[got.uid] = (got.body, False)
    if large:
        items_ = f"UID RFC822.SIZE BODY.PEEK[HEADER]<0.{PUSH_BODY_BYTES}>"
        limits = BodyLimits(PUSH_BODY_BYTES, count=len(large))
        for got in await session.fetch(large, items_, limits=limits):
            if got.body is not None:
                bodies[got.uid] = (got.body, True)
    found = []
    for item in items:
        if item.uid not in bodies:
            continue  # expunged meanwhile: nothing to redrive
        raw, too_large = bodies.pop(item.uid)
        key = await asyncio.to_thread(webhook_id, config, raw, too_large=too_large)
        legacy = item.webhook_id
        letter = Letter(
            where=f"uid {item.uid} in {session.config.mailbox}",
            received=item.internal_date,
            message_id=message.parse(_head(raw)).message_id,
            webhook_id=legacy if legacy is not None and config.legacy_id_keywords else key,
            legacy_id=legacy,
        )
        found.append((item.uid, letter))
    return found


def _head(raw: bytes) -> bytes:
    """The header block of ``raw`` (the part that has the Message-ID), bounded."""
    end = raw.find(b"\r\n\r\n", 0, HEAD_BYTES)
    return raw[: end + 4] if end >= 0 else raw[:HEAD_BYTES]


def _since(job: Job) -> str:
    """SEARCH SINCE a day early (it compares dates only, in the server's idea of the zone,
    RFC 3501 §6.4.4); INTERNALDATE then decides to the second."""
    if job.options.since is None:
        return ""
    day = (job.options.since - datetime.timedelta(days=1)).date()
    return f" SINCE {day.day}-{_MONTHS[day.month - 1]}-{day.year}"
