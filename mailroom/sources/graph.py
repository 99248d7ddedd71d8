"""``GraphPoller``: a Microsoft 365 mailbox read through Microsoft Graph, one task per mailbox.

The loop (Microsoft Graph v1.0, application permission ``Mail.ReadWrite``):

1. Apply queued settlements, each only after its outcome is known: ``PATCH {"isRead": true}``,
   ``DELETE``, ``POST .../move`` to ``failed_folder`` (created when missing), or the category
   ``MailroomFailed`` with ``isRead``.
2. Every ``poll_interval`` (and at once when settlements made room after a full poll): list
   ``users/{user}/mailFolders/{mailbox}/messages``, unread, oldest first (``$orderby=
   receivedDateTime asc``; Graph wants an ordered property in ``$filter`` too, and first:
   "Update to Filtering and Sorting in the Mail, Calendar and Contacts REST API"), with
   ``$select`` and ``$top``, following ``@odata.nextLink`` for at most ``MAX_PAGES`` pages.
3. For each unread message not already in flight, while fewer than ``MAX_IN_FLIGHT`` await an
   outcome: ``GET .../messages/{id}/$value`` (the MIME, "Get MIME content of a message"),
   streamed and bounded by ``max_message_bytes``; hand it to the dispatcher. A message whose
   ``$value`` fails does not hold up the rest: a 404 (gone meanwhile) is skipped, any other
   failure of that message alone is retried next poll, and after ``MAX_FETCH_FAILURES`` polls
   in a row it is left unread and not fetched again until a restart.

Supervision, the in-flight set and settlement are the shared ``Source`` lifecycle; polls are
jittered (±10 % of ``poll_interval``) so that many mailboxes do not poll in step, and each fetch
takes room in the process-wide budget first.

Every request asks for immutable ids (``Prefer: IdType="ImmutableId"``, Graph "Obtain
immutable identifiers for Outlook resources"), so a message keeps its id, and its webhook-id,
when it is moved. 429 and 503 honour ``Retry-After`` (Graph throttling guidance); a 401 gets
one fresh token, then backs off; any other failure backs off and is retried. Nothing here
stops another mailbox or the process.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable
from urllib.parse import quote

import aiohttp

from mailroom.backoff import Backoff
from mailroom.config import GraphMailboxConfig
from mailroom.envelope import FAILED_CATEGORY, Envelope
from mailroom.errors import GraphError, SourceError
from mailroom.observe.monitor import Monitor, SourceState
from mailroom.sources.budget import Budget, Reservation
from mailroom.sources.graph_client import (
    GraphClient,
    discard,
    message_url,
    messages_url,
    read_mime,
    user_url,
)
from mailroom.sources.lifecycle import Settlement, Source, wait_any
from mailroom.trust.entra import TokenProvider

__all__ = ["FAILED_CATEGORY", "GraphPoller", "idempotency_key"]

log = logging.getLogger("mailroom.graph")

MAX_IN_FLIGHT = 64  # messages handed to the dispatcher and not yet settled
PAGE_SIZE = 50  # $top
POLL_JITTER = 0.1  # each poll interval is poll_interval ± this fraction of it
MAX_PAGES = 20  # per poll: a cyclic or endless @odata.nextLink cannot hold the loop
MAX_FETCH_FAILURES = 5  # polls in a row a message's $value failed: then skipped until restart
FAILURES_IN_A_ROW = 3  # messages failing one after another: Graph's fault, not theirs
_SELECT = "id,categories"
_LIST_QUERY = "?$filter={}&$orderby={}&$select={}&$top={}".format(
    quote("receivedDateTime ge 1900-01-01T00:00:00Z and isRead eq false", safe=""),
    quote("receivedDateTime asc", safe=""),
    _SELECT,
    PAGE_SIZE,
)
_SERVICE_WIDE = (401, 403, 408, 429, 503)  # a $value failure that says nothing of the message


def idempotency_key(mailbox_id: str, message_id: str) -> str:
    """The ``webhook-id``: from the (immutable) Graph message id; a valid header value."""
    digest = hashlib.sha256(f"graph\0{mailbox_id}\0{message_id}".encode()).hexdigest()
    return f"msg_{digest[:32]}"


def _transient(exc: SourceError) -> bool:
    """Worth retrying: no answer, 401/403 (a fix to the app cures them), 408, 429, 5xx."""
    if not isinstance(exc, GraphError) or exc.status is None:
        return True
    return exc.status in (401, 403, 408, 429) or exc.status >= 500


Categories = tuple[str, ...]  # a message's categories, kept to add FAILED_CATEGORY to them


class GraphPoller(Source[GraphMailboxConfig, str, Categories]):
    """Polls one Microsoft Graph mailbox and hands every unread message to ``submit``.

    ``tokens`` may be shared by every mailbox of one app registration, and ``http`` by every
    mailbox of one ``graph_endpoint``; without them the poller makes its own.
    """

    max_in_flight = MAX_IN_FLIGHT
    # A Retry-After of 0 (or a past date) still waits a second; one beyond 15 minutes is
    # taken as 15 minutes.
    backoff = Backoff(initial_s=1.0, max_s=300.0, retry_after_min_s=1.0, retry_after_max_s=900.0)
    retrying = "retrying"

    def __init__(
        self,
        config: GraphMailboxConfig,
        submit: Callable[[Envelope], None],
        *,
        stopping: asyncio.Event,
        drained: asyncio.Event,
        tokens: TokenProvider | None = None,
        http: aiohttp.ClientSession | None = None,
        monitor: Monitor | None = None,
        budget: Budget | None = None,
    ) -> None:
        super().__init__(
            config, submit, stopping=stopping, drained=drained, monitor=monitor, budget=budget,
            logger=log,
        )  # fmt: skip
        options = config.inbox_options
        self._own_tokens = tokens is None
        self.tokens = tokens or TokenProvider(options.oauth, label=config.id)
        self._user_url = user_url(config)
        self._fetch_failures: dict[str, int] = {}  # message id → polls in a row its $value failed
        self._more = False  # the last poll stopped for want of room: poll again on room
        self._asked: Reservation | None = None  # budget asked for and not granted yet
        self._next_poll = 0.0
        self._failed_folder_id: str | None = None
        self._graph = GraphClient(options, self.tokens, label=config.id, http=http)
        self.polls = 0

    # -- one connection ------------------------------------------------------------------------

    async def _serve(self) -> None:
        async with self._graph:
            try:
                await self._loop()
            finally:
                if self._asked is not None:
                    self._budget.cancel(self._asked)
                    self._asked = None

    async def _close(self) -> None:
        if self._own_tokens:
            self.tokens.close()

    async def _loop(self) -> None:
        interval_s = self.config.inbox_options.poll_interval_s
        while True:
            self._wake.clear()
            if self._settlements:
                await self._apply_settlements()
                continue
            if self._stopping.is_set():
                if self._drained.is_set():
                    return
                await wait_any((self._wake, self._stopping, self._drained))
                continue
            now = time.monotonic()
            room = self._asked is None or self._asked.done()
            if now >= self._next_poll or (self._more and room and self._has_capacity()):
                await self._poll()
                jitter = 1 + random.uniform(-POLL_JITTER, POLL_JITTER)
                self._next_poll = time.monotonic() + interval_s * jitter
                self._attempt = 0
                self._set_healthy()
                continue
            await wait_any(
                (self._wake, self._stopping, self._drained), timeout_s=self._next_poll - now
            )

    def _set_healthy(self) -> None:
        if self.state is not SourceState.CONNECTED:
            self.log.info("Graph mailbox %s reachable", self.config.mailbox)
        self._set_connected()  # after every successful poll: readiness follows the last one

    # -- polling -------------------------------------------------------------------------------

    def _messages_url(self) -> str:
        return messages_url(self._user_url, self.config.mailbox)

    async def _poll(self) -> None:
        self.polls += 1
        self._more = False
        url: str | None = self._messages_url() + _LIST_QUERY
        seen: set[str] = set()
        run: list[str] = []  # the messages that just failed one after another
        found = 0
        while url is not None:
            if url in seen or len(seen) >= MAX_PAGES:
                self.log.warning(
                    "@odata.nextLink %s after %d pages; the rest waits for the next poll",
                    "repeats" if url in seen else "goes on",
                    len(seen),
                )
                break
            seen.add(url)
            page = await self._graph.send("GET", url)
            for item in page.get("value", []):
                message_id = item.get("id")
                if not isinstance(message_id, str) or message_id in self._pending:
                    continue
                if message_id in self._stuck:
                    continue
                if self._stopping.is_set():
                    return
                if not self._has_capacity() or (reservation := self._reserve()) is None:
                    self._more = True
                    return
                categories = tuple(c for c in item.get("categories") or () if isinstance(c, str))
                try:
                    await self._fetch(message_id, categories, reservation)
                except GraphError as exc:
                    if exc.status is None or exc.status in _SERVICE_WIDE:
                        raise
                    self._fetch_failed(message_id, exc, run)
                    continue
                finally:
                    self._budget.cancel(reservation)  # nothing, once it was used
                run.clear()
                self._fetch_failures.pop(message_id, None)
                found += 1
            url = self._graph.next_link(page)
        if found:
            self.log.debug("poll found %d new messages", found)

    def _reserve(self) -> Reservation | None:
        """Room in the budget for one more message (its bytes are charged once read), or None
        (then the poll stops, and polls again as soon as the room is granted)."""
        reservation, self._asked = self._asked or self._budget.reserve(1, 0), None
        if reservation.done():
            return reservation
        reservation.granted.add_done_callback(lambda _: self._wake.set())
        self._asked = reservation
        return None

    def _fetch_failed(self, message_id: str, exc: GraphError, run: list[str]) -> None:
        """One message's ``$value`` failed: skip it for now, or for good after a while."""
        ref = f"graph {message_id[-12:]}"
        if exc.status == 404:
            self.log.info("%s: gone before it was fetched; skipped", ref)
            return
        count = self._fetch_failures[message_id] = self._fetch_failures.get(message_id, 0) + 1
        run.append(message_id)
        if len(run) >= FAILURES_IN_A_ROW:  # not these messages: counted against none of them
            for each in run:
                self._fetch_failures[each] -= 1
            raise exc
        last = count >= MAX_FETCH_FAILURES
        self.log.log(
            logging.ERROR if last else logging.WARNING,
            "%s: %s (%d of %d polls in a row); %s",
            ref,
            exc,
            count,
            MAX_FETCH_FAILURES,
            "it stays unread, not fetched again until the next error or restart"
            if last
            else "skipped this poll",
        )
        if last:
            del self._fetch_failures[message_id]
            self._stuck.add(message_id)

    async def _fetch(
        self, message_id: str, categories: tuple[str, ...], reservation: Reservation
    ) -> None:
        url = f"{self._messages_url()}/{quote(message_id, safe='')}/$value"
        limit = self.config.max_message_bytes
        raw, size, too_large = await self._graph.send(
            "GET", url, read=lambda response: read_mime(response, limit), accept="*/*"
        )
        if self._stopping.is_set():
            return  # the dispatcher takes no more; the message stays unread for the next run
        charged = len(raw) if too_large else size
        self._budget.use(reservation, 1, charged)
        self._hand_out(
            message_id,
            ref=f"graph {message_id[-12:]}",
            idempotency_key=idempotency_key(self.id, message_id),
            raw=raw,
            size=size,
            charged=charged,
            too_large=too_large,
            tag=categories,
        )

    # -- settlements ---------------------------------------------------------------------------

    async def _apply_settlements(self) -> None:
        """Apply the queued settlements, one request each, in order."""
        batch = self._take_settlements()
        for index, settlement in enumerate(batch):
            try:
                await self._apply(settlement)
            except BaseException as exc:  # also a bug, a malformed answer, a cancellation
                if not isinstance(exc, SourceError) or _transient(exc):
                    self._requeue(batch[index:])  # kept, in order, for the retry
                    raise
                self.log.error(
                    "graph %s: could not settle as %s: %s; it stays as it is and is not "
                    "fetched again until the next error or restart",
                    settlement.key[-12:],
                    settlement.outcome.value,
                    exc,
                )
                self._stuck.add(settlement.key)
            self._settled(settlement)

    async def _apply(self, settlement: Settlement[str, Categories]) -> None:
        url = message_url(self._user_url, settlement.key)
        try:
            if settlement.outcome.processed:
                if self.config.delete_after_delivery:
                    await self._graph.send("DELETE", url, read=discard)
                else:
                    await self._graph.send("PATCH", url, body={"isRead": True}, read=discard)
            elif name := self.config.failed_folder:
                folder_id = self._failed_folder_id or await self._graph.folder_id(
                    self._user_url, name
                )
                self._failed_folder_id = folder_id
                await self._graph.send("POST", f"{url}/move", body={"destinationId": folder_id})
            else:
                categories = [*settlement.tag, FAILED_CATEGORY]
                body = {"isRead": True, "categories": list(dict.fromkeys(categories))}
                await self._graph.send("PATCH", url, body=body, read=discard)
        except GraphError as exc:
            if exc.status != 404:
                raise
            # Deleted or moved by someone else meanwhile: nothing left to settle.
            self.log.info("graph %s: already gone", settlement.key[-12:])
