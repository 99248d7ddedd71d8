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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote

from mailroom.auth import TokenProvider
from mailroom.backoff import backoff_delay
from mailroom.config import GraphMailboxConfig
from mailroom.envelope import Envelope, Outcome
from mailroom.errors import GraphError, SourceError, TokenError
from mailroom.monitor import Monitor
from mailroom.sources.graph_client import GraphClient, discard, read_mime

__all__ = ["GraphPoller", "idempotency_key"]

log = logging.getLogger("mailroom.graph")

MAX_IN_FLIGHT = 64  # messages handed to the dispatcher and not yet settled
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
PAGE_SIZE = 50  # $top
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 300.0
RETRY_AFTER_MIN_S = 1.0  # a Retry-After of 0 (or a past date) still waits this long
RETRY_AFTER_MAX_S = 900.0  # a Retry-After beyond this is taken as this
MAX_PAGES = 20  # per poll: a cyclic or endless @odata.nextLink cannot hold the loop
MAX_FETCH_FAILURES = 5  # polls in a row a message's $value failed: then skipped until restart
FAILURES_IN_A_ROW = 3  # messages failing one after another: Graph's fault, not theirs
FAILED_CATEGORY = "MailroomFailed"
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


@dataclass(slots=True)
class _Settlement:
    message_id: str
    categories: tuple[str, ...]
    outcome: Outcome
    done: asyncio.Future[None] = field(repr=False)


class GraphPoller:
    """Polls one Microsoft Graph mailbox and hands every unread message to ``submit``."""

    def __init__(
        self,
        config: GraphMailboxConfig,
        submit: Callable[[Envelope], None],
        *,
        stopping: asyncio.Event,
        drained: asyncio.Event,
        tokens: TokenProvider | None = None,
        monitor: Monitor | None = None,
    ) -> None:
        self.config = config
        self.id = config.id
        options = config.inbox_options
        self.tokens = tokens or TokenProvider(options.oauth, label=config.id)
        self._submit = submit
        self._stopping = stopping
        self._drained = drained
        self._monitor = monitor or Monitor()
        self._user_url = f"{options.graph_endpoint}/v1.0/users/{quote(config.user, safe='@')}"
        self._wake = asyncio.Event()
        self._pending: dict[str, int] = {}  # message id → size, handed out and not settled
        self._stuck: set[str] = set()  # settlement refused, or fetch failed, for good
        self._fetch_failures: dict[str, int] = {}  # message id → polls in a row its $value failed
        self._settlements: list[_Settlement] = []
        self._more = False  # the last poll stopped at MAX_IN_FLIGHT: poll again on room
        self._failed_folder_id: str | None = None
        self._graph = GraphClient(options, self.tokens, label=config.id)
        self.state = "starting"
        self.healthy = False
        self.polls = 0

    @property
    def pending(self) -> int:
        """Messages handed to the dispatcher and not settled yet."""
        return len(self._pending)

    # -- the task ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Poll until stopped and drained. Never raises: failures are logged and retried."""
        try:
            async with self._graph:
                await self._loop()
        finally:
            self._abandon_settlements()

    async def _loop(self) -> None:
        attempt = 0
        next_poll = 0.0
        while True:
            self._wake.clear()
            try:
                if self._settlements:
                    await self._apply_settlements()
                    continue
                if self._stopping.is_set():
                    if self._drained.is_set():
                        return
                    self.state = "draining"
                    await self._wait(None)
                    continue
                now = time.monotonic()
                if now >= next_poll or (self._more and self._has_capacity()):
                    self.state = "polling"
                    await self._poll()
                    next_poll = time.monotonic() + self.config.inbox_options.poll_interval_s
                    attempt = 0
                    self._set_healthy(True)
                    continue
                self.state = "waiting"
                await self._wait(next_poll - now)
            except SourceError as exc:
                attempt += 1
                delay = backoff_delay(attempt, initial_s=BACKOFF_INITIAL_S, max_s=BACKOFF_MAX_S)
                retry_after = exc.retry_after_s if isinstance(exc, GraphError) else None
                if retry_after is not None:  # never below the backoff: a 0 must not spin
                    delay = min(max(retry_after, delay, RETRY_AFTER_MIN_S), RETRY_AFTER_MAX_S)
                self._set_healthy(False, f"{type(exc).__name__}: {exc}")
                loud = isinstance(exc, TokenError) or attempt > 3
                log.log(
                    logging.ERROR if loud else logging.WARNING,
                    "%s: %s: %s; retrying in %.1fs (attempt %d)",
                    self.id,
                    type(exc).__name__,
                    exc,
                    delay,
                    attempt,
                    extra={"mailbox": self.id, "attempt": attempt, "delay_s": round(delay, 3)},
                )
                await self._pause(delay)
            except Exception:
                attempt += 1
                delay = backoff_delay(attempt, initial_s=BACKOFF_INITIAL_S, max_s=BACKOFF_MAX_S)
                self._set_healthy(False, "unexpected error")
                log.exception(
                    "%s: unexpected error; retrying in %.1fs",
                    self.id,
                    delay,
                    extra={"mailbox": self.id, "attempt": attempt},
                )
                await self._pause(delay)

    def _set_healthy(self, healthy: bool, reason: str = "") -> None:
        if healthy:
            self._monitor.connected(self.id)  # after every successful poll
        else:
            self._monitor.disconnected(self.id, reason)
        if healthy and not self.healthy:
            log.info("%s: Graph mailbox %s reachable", self.id, self.config.mailbox)
        self.healthy = healthy

    async def _wait(self, timeout_s: float | None) -> None:
        """Until a settlement, stop, drained, or ``timeout_s``."""
        events = (self._wake, self._stopping, self._drained)
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _pause(self, delay_s: float) -> None:
        """A backoff delay; cut short by stop only while there is nothing left to settle."""
        if self._stopping.is_set():
            if self._drained.is_set() and not self._settlements:
                return
            await asyncio.sleep(delay_s)  # the supervisor bounds the shutdown
            return
        await self._wait(delay_s)

    def _abandon_settlements(self) -> None:
        self.state = "stopped"
        if self._settlements:
            log.warning(
                "%s: stopping with %d settlements not applied; those messages stay unread and "
                "are delivered again (same webhook-id) after a restart",
                self.id,
                len(self._settlements),
                extra={"mailbox": self.id},
            )
        for settlement in self._settlements:
            if not settlement.done.done():
                settlement.done.set_result(None)
        self._settlements.clear()

    # -- polling -------------------------------------------------------------------------------

    def _messages_url(self) -> str:
        folder = quote(self.config.mailbox, safe="")
        return f"{self._user_url}/mailFolders/{folder}/messages"

    def _has_capacity(self) -> bool:
        return (
            len(self._pending) < MAX_IN_FLIGHT and sum(self._pending.values()) < MAX_IN_FLIGHT_BYTES
        )

    async def _poll(self) -> None:
        self.polls += 1
        self._more = False
        url: str | None = self._messages_url() + _LIST_QUERY
        seen: set[str] = set()
        run: list[str] = []  # the messages that just failed one after another
        found = 0
        while url is not None:
            if url in seen or len(seen) >= MAX_PAGES:
                log.warning(
                    "%s: @odata.nextLink %s after %d pages; the rest waits for the next poll",
                    self.id,
                    "repeats" if url in seen else "goes on",
                    len(seen),
                    extra={"mailbox": self.id},
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
                if not self._has_capacity():
                    self._more = True
                    return
                categories = tuple(c for c in item.get("categories") or () if isinstance(c, str))
                try:
                    await self._fetch(message_id, categories)
                except GraphError as exc:
                    if exc.status is None or exc.status in _SERVICE_WIDE:
                        raise
                    self._fetch_failed(message_id, exc, run)
                    continue
                run.clear()
                self._fetch_failures.pop(message_id, None)
                found += 1
            url = self._graph.next_link(page)
        if found:
            log.debug("%s: poll found %d new messages", self.id, found)

    def _fetch_failed(self, message_id: str, exc: GraphError, run: list[str]) -> None:
        """One message's ``$value`` failed: skip it for now, or for good after a while."""
        ref = f"{self.id}: graph {message_id[-12:]}"
        if exc.status == 404:
            log.info("%s: gone before it was fetched; skipped", ref, extra={"mailbox": self.id})
            return
        count = self._fetch_failures[message_id] = self._fetch_failures.get(message_id, 0) + 1
        run.append(message_id)
        if len(run) >= FAILURES_IN_A_ROW:  # not these messages: counted against none of them
            for each in run:
                self._fetch_failures[each] -= 1
            raise exc
        last = count >= MAX_FETCH_FAILURES
        log.log(
            logging.ERROR if last else logging.WARNING,
            "%s: %s (%d of %d polls in a row); %s",
            ref,
            exc,
            count,
            MAX_FETCH_FAILURES,
            "it stays unread, not fetched again until a restart" if last else "skipped this poll",
            extra={"mailbox": self.id},
        )
        if last:
            del self._fetch_failures[message_id]
            self._stuck.add(message_id)

    async def _fetch(self, message_id: str, categories: tuple[str, ...]) -> None:
        url = f"{self._messages_url()}/{quote(message_id, safe='')}/$value"
        limit = self.config.max_message_bytes
        raw, size, too_large = await self._graph.send(
            "GET", url, read=lambda response: read_mime(response, limit), accept="*/*"
        )
        if self._stopping.is_set():
            return  # the dispatcher takes no more; the message stays unread for the next run
        self._pending[message_id] = len(raw) if too_large else size

        async def settle(outcome: Outcome) -> None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._settlements.append(_Settlement(message_id, categories, outcome, done))
            self._wake.set()
            await done

        self._submit(
            Envelope(
                mailbox=self.id,
                ref=f"graph {message_id[-12:]}",
                idempotency_key=idempotency_key(self.id, message_id),
                raw=raw,
                size=size,
                too_large=too_large,
                _settle=settle,
            )
        )

    # -- settlements ---------------------------------------------------------------------------

    async def _apply_settlements(self) -> None:
        batch, self._settlements = self._settlements, []
        for index, settlement in enumerate(batch):
            try:
                await self._apply(settlement)
            except BaseException as exc:  # also a bug, a malformed answer, a cancellation
                if not isinstance(exc, SourceError) or _transient(exc):
                    self._settlements[:0] = batch[index:]  # kept, in order, for the retry
                    raise
                log.error(
                    "%s: graph %s: could not settle as %s: %s; it stays as it is and is not "
                    "fetched again until a restart",
                    self.id,
                    settlement.message_id[-12:],
                    settlement.outcome.value,
                    exc,
                    extra={"mailbox": self.id},
                )
                self._stuck.add(settlement.message_id)
            self._pending.pop(settlement.message_id, None)
            settlement.done.set_result(None)

    async def _apply(self, settlement: _Settlement) -> None:
        url = f"{self._user_url}/messages/{quote(settlement.message_id, safe='')}"
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
                categories = [*settlement.categories, FAILED_CATEGORY]
                body = {"isRead": True, "categories": list(dict.fromkeys(categories))}
                await self._graph.send("PATCH", url, body=body, read=discard)
        except GraphError as exc:
            if exc.status != 404:
                raise
            # Deleted or moved by someone else meanwhile: nothing left to settle.
            log.info("%s: graph %s: already gone", self.id, settlement.message_id[-12:])
