"""Redrive a Microsoft Graph mailbox's dead letters, through ``GraphClient`` like the poller.

Two places: the mailbox folder (messages with the category ``MailroomFailed``, whatever
``failed_folder`` says now) and ``failed_folder`` when it is set and exists (every message).
Each is listed whole first (paging with ``$skip`` would skip messages that drop out of the
listing as they are redriven), then each message is PATCHed back to unread without the
category and, from ``failed_folder``, moved back to the mailbox folder (``POST .../move``).
PATCH first: a failure in between leaves it in ``failed_folder`` for the next redrive.
Every request asks for immutable ids (``GraphClient``), so the message keeps its id, and its
webhook-id, through both moves; a move that answers another id says so. The poller finds the
messages at its next poll (``poll_interval``).
"""

from __future__ import annotations

import datetime
import functools
import logging
from typing import Any
from urllib.parse import quote

from mailroom.config import GraphMailboxConfig
from mailroom.errors import GraphError
from mailroom.redrive.job import Job, Letter, Stopped, utc_text
from mailroom.sources.graph import FAILED_CATEGORY, webhook_id
from mailroom.sources.graph_client import (
    GraphClient,
    discard,
    message_url,
    messages_url,
    user_url,
)
from mailroom.trust.entra import TokenProvider

__all__ = ["redrive"]

log = logging.getLogger("mailroom.graph")

PAGE_SIZE = 100  # $top
MAX_PAGES = 100  # per folder and run: 10,000 messages; a second run takes the rest
_SELECT = "id,receivedDateTime,internetMessageId,categories"


async def redrive(config: GraphMailboxConfig, job: Job) -> None:
    """Put back the dead letters of one mailbox (``Stopped`` or ``MailroomError`` on failure)."""
    options = config.inbox_options
    tokens = TokenProvider(options.oauth, label=config.id)
    user = user_url(config)
    try:
        async with GraphClient(options, tokens, label=config.id) as client:
            mailbox = _Mailbox(config, job, client, user)
            await mailbox.redrive(messages_url(user, config.mailbox), config.mailbox, flagged=True)
            name = config.failed_folder
            if name is not None and (folder := await client.find_folder(user, name)):
                await mailbox.redrive(messages_url(user, folder), name, flagged=False)
    finally:
        tokens.close()


class _Mailbox:
    def __init__(
        self, config: GraphMailboxConfig, job: Job, client: GraphClient, user_url: str
    ) -> None:
        self.config = config
        self.job = job
        self.client = client
        self.user_url = user_url

    async def redrive(self, folder_url: str, folder: str, *, flagged: bool) -> None:
        """Every dead letter listed in ``folder``, one request (or two) each."""
        items, more = await self._list(folder_url, flagged=flagged)
        for item in items:
            message_id: str = item["id"]
            internet_id = item.get("internetMessageId")
            letter = Letter(
                where=f"message {message_id[-12:]} in {folder}",
                received=_received(item.get("receivedDateTime")),
                message_id=internet_id if isinstance(internet_id, str) else None,
                webhook_id=webhook_id(self.config, message_id),
            )
            categories = [c for c in item.get("categories") or () if isinstance(c, str)]
            if flagged:
                change = functools.partial(self._patch, message_id, categories)
                done = f"category {FAILED_CATEGORY} removed, marked unread"
                would = f"would remove the category {FAILED_CATEGORY} and mark it unread"
            else:
                change = functools.partial(self._move_back, message_id, categories)
                done = f"marked unread, moved back to {self.config.mailbox}"
                would = f"would mark it unread and move it back to {self.config.mailbox}"
            try:
                await self.job.apply(self.config.id, [letter], change, done, would)
            except Stopped as exc:
                if not isinstance(exc.__cause__, GraphError) or exc.__cause__.status != 404:
                    raise
                # Deleted or moved by someone else since the listing: the others go on.
        if more:
            self.job.out(
                f"{self.config.id}: more than {PAGE_SIZE * MAX_PAGES} dead letters in {folder}; "
                "run mailroom redrive again for the rest"
            )

    async def _list(self, folder_url: str, *, flagged: bool) -> tuple[list[dict[str, Any]], bool]:
        """The messages to redrive in a folder, oldest first; True when more remain."""
        since = self.job.options.since
        start = "1900-01-01T00:00:00Z" if since is None else utc_text(since)
        # Graph wants the $orderby property in $filter too, and first ("InefficientFilter").
        clauses = [f"receivedDateTime ge {start}"]
        if flagged:
            clauses.append(f"categories/any(c:c eq '{FAILED_CATEGORY}')")
        url: str | None = "{}?$filter={}&$orderby={}&$select={}&$top={}".format(
            folder_url,
            quote(" and ".join(clauses), safe=""),
            quote("receivedDateTime asc", safe=""),
            _SELECT,
            PAGE_SIZE,
        )
        items: list[dict[str, Any]] = []
        for _ in range(MAX_PAGES):
            if url is None:
                break
            page = await self.client.send("GET", url)
            for item in page.get("value") or ():
                if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]:
                    items.append(item)
            url = self.client.next_link(page)
        return items, url is not None

    def _url(self, message_id: str) -> str:
        return message_url(self.user_url, message_id)

    async def _patch(self, message_id: str, categories: list[str]) -> None:
        body = {"isRead": False, "categories": [c for c in categories if c != FAILED_CATEGORY]}
        await self.client.send("PATCH", self._url(message_id), body=body, read=discard)

    async def _move_back(self, message_id: str, categories: list[str]) -> None:
        await self._patch(message_id, categories)
        moved = await self.client.send(
            "POST", f"{self._url(message_id)}/move", body={"destinationId": self.config.mailbox}
        )
        if moved.get("id") not in (None, message_id):  # Prefer: IdType="ImmutableId" ignored?
            log.warning(
                "%s: message %s: Graph gave it a new id when it moved back; it is posted under "
                "a new webhook-id",
                self.config.id,
                message_id[-12:],
            )


def _received(value: object) -> datetime.datetime | None:
    """``receivedDateTime`` (ISO 8601, UTC), or None when absent or malformed."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)
