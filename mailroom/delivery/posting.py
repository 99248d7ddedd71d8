"""Posting to the webhooks: one aiohttp session, slots, retries and a circuit per webhook.

``Webhooks.deliver`` brings one message to an answer: it posts (at most ``webhook.concurrency``
at once per webhook; a message waiting out a retry holds no slot), retries transient failures
with capped, jittered backoff (never sooner than a ``Retry-After``), and returns the outcome the
answer means (``webhook.classify``). Each webhook has a circuit breaker (``mailroom.circuit``):
during an outage one probe request goes at a time and the other messages wait without sending
or logging. Requests go through the proxy ``mailroom.proxies`` names for the URL.

A reload that changes a webhook retires the old one (``Webhooks.use``): a message waiting
there for its next attempt, or for an open circuit, stops waiting and is answered
``Superseded``, and the dispatcher decides it again under the new config. A request already
sent is not interrupted.

A push source's message has a deadline (``Envelope.deadline``): its sender waits for the reply.
It does not wait for an open circuit (unless it may be the probe), no request runs past the
deadline and no retry is scheduled beyond it: the answer is ``Deferred`` instead, and the
sender's queue retries the message later.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp

from mailroom.backoff import Retry
from mailroom.backoff import retry_after as parse_retry_after
from mailroom.config import (
    ArbitrationConfig,
    Config,
    SidekiqConfig,
    WebhookConfig,
    webhook_labels,
)
from mailroom.delivery import sidekiq
from mailroom.delivery.circuit import Circuit
from mailroom.delivery.sidekiq import JobQueue
from mailroom.delivery.webhook import MAX_ANSWER_BYTES, Rejected, classify, request_headers
from mailroom.envelope import Envelope, Outcome
from mailroom.errors import ArbitrationError, PermanentDeliveryError, TransientDeliveryError
from mailroom.mail import routing
from mailroom.observe.monitor import Monitor, StatusClass
from mailroom.redact import error_text
from mailroom.trust.proxies import proxy_for
from mailroom.trust.tls import client_context

__all__ = ["Deferred", "Superseded", "Webhook", "Webhooks"]

log = logging.getLogger("mailroom.delivery.dispatch")

# A larger body is posted in slices (with its Content-Length): given whole, asyncio's
# transport copied a 25 MB message's 33 MB body twice over (measured by
# bench/many_mailboxes.py), and aiohttp warns about raw bytes over 1 MiB.
SLICED_BODY_BYTES = 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Deferred:
    """Not now: a push source's deadline comes first (``why`` says what the webhook did)."""

    why: str


@dataclass(frozen=True, slots=True)
class Superseded:
    """Not here: a reload replaced the webhook while the message waited for its next attempt
    (the dispatcher decides it again under the new config)."""


SUPERSEDED = Superseded()


class Webhook:
    """One configured webhook: its slots, its circuit, its TLS settings, its request builder;
    with ``sidekiq``, the Redis its jobs are pushed to (``queue``)."""

    def __init__(
        self, config: WebhookConfig, label: str, monitor: Monitor, queue: JobQueue | None = None
    ) -> None:
        self.config = config
        self.queue = queue
        self.label = label
        self.slots = asyncio.Semaphore(config.concurrency)
        self.circuit = Circuit(label, config.retry.backoff, monitor=monitor)
        self.ssl: ssl.SSLContext | bool = True
        if config.url.startswith("https:"):
            self.ssl = client_context(ca_file=config.ca_file, verify=config.tls_verify)
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        # Looked up once, from the environment as it is when the webhook is first configured
        # (a reload with another proxy: makes a new webhook), not for every request.
        self.proxy = proxy_for(config.url, config.proxy)
        # Set when a reload leaves this webhook out: its waiting messages go to the new one.
        self.retired = asyncio.Event()

    def headers(self, envelope: Envelope, key: str | None, body: bytes) -> dict[str, str]:
        headers = request_headers(
            self.config,
            webhook_id=envelope.idempotency_key,
            body=body,
            content_type=self.config.request_content_type,
        )
        headers["X-Mailroom-Mailbox"] = envelope.mailbox
        if key is not None:
            headers["X-Mailroom-Key"] = quote(key, safe="!#$&'*+-.^_`|~=@")
        return headers


class Webhooks:
    """The webhooks of one process; ``async with`` owns the HTTP session."""

    def __init__(
        self, monitor: Monitor, queues: Callable[[ArbitrationConfig], JobQueue] | None = None
    ) -> None:
        self._monitor = monitor
        self._queues = queues  # the Sidekiq Redis of a config (delivery_method: sidekiq)
        self.by_config: dict[WebhookConfig, Webhook] = {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Webhooks:
        # One session for every webhook; per-request timeouts come from each webhook's config.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            trust_env=False,  # proxies come from mailroom.proxies; .netrc is never read
            cookie_jar=aiohttp.DummyCookieJar(),  # a webhook sets no cookies we would keep
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def prepare(self, config: Config) -> dict[WebhookConfig, Webhook]:
        """The webhooks ``config`` names; an unchanged one keeps its slots and circuit."""
        named = webhook_labels(m.webhook for m in config.mailboxes)
        return {
            hook: self.by_config.get(hook) or Webhook(hook, label, self._monitor, self._queue(hook))
            for hook, label in named.items()
        }

    def use(self, webhooks: dict[WebhookConfig, Webhook]) -> None:
        """Take the webhooks ``prepare`` made; retire those left out, so that no message keeps
        retrying a URL the config no longer names (a wrong one, fixed by a reload)."""
        kept = {id(webhook) for webhook in webhooks.values()}
        for webhook in self.by_config.values():
            if id(webhook) not in kept:
                webhook.retired.set()
        self.by_config = webhooks

    def _queue(self, hook: WebhookConfig) -> JobQueue | None:
        if hook.sidekiq is None:
            return None
        if self._queues is None:
            raise ValueError(f"{hook.origin}: no Redis client for Sidekiq jobs was given")
        return self._queues(hook.sidekiq.redis)

    async def deliver(
        self,
        envelope: Envelope,
        decision: routing.Deliver,
        config: WebhookConfig,
        body: bytes,
        fields: dict[str, Any],
    ) -> Outcome | Rejected | Deferred | Superseded:
        """Post ``body`` until the webhook gives an answer that settles it (or, with a
        deadline, until the deadline: ``Deferred``; or until a reload retires the webhook:
        ``Superseded``). ``fields["why"]`` says why a message was refused for good."""
        webhook = self.by_config[config]
        circuit = webhook.circuit
        retry = Retry(config.retry.backoff)
        deadline = envelope.deadline
        last = "no attempt yet"
        while True:
            if webhook.retired.is_set():
                return SUPERSEDED
            admit = circuit.admit(retry.left_s if deadline is None else 0.0)
            # An open circuit may keep it waiting for minutes: a reload must be able to end that.
            admitted = await _unless_retired(webhook, admit) if circuit.is_open else await admit
            if admitted is SUPERSEDED:
                return SUPERSEDED
            if not admitted:
                if deadline is not None:
                    return Deferred(f"the webhook's circuit is open (last: {last})")
                return _give_up(envelope, retry, "the webhook's circuit is open", fields)
            if not await _slot(webhook, deadline):
                circuit.abandoned()
                return Deferred(f"no free webhook slot in time (last: {last})")
            fields["attempt"] = retry.begin()
            try:
                try:  # the slot is held for the request only, never for a retry's wait
                    left_s = None if deadline is None else deadline - time.monotonic()
                    result = await self._post(
                        webhook, envelope, decision.key, body, fields, left_s=left_s
                    )
                finally:
                    webhook.slots.release()
            except PermanentDeliveryError as exc:
                circuit.answered()
                log.error(
                    "%s: %s: webhook refused it for good: %s; dead-lettering",
                    envelope.mailbox,
                    envelope.ref,
                    exc,
                    extra=fields,
                )
                fields["why"] = f"the webhook refused it for good: {exc}"
                return Outcome.DEAD_LETTERED
            except TransientDeliveryError as exc:
                last = str(exc)
                circuit.failed(last, exc.retry_after_s)
                if circuit.is_open:
                    continue  # the circuit paces the retries now, and logged the outage
                # Not sooner than a Retry-After asks, nor than the backoff (Backoff.delay).
                delay = retry.delay(exc.retry_after_s)
                if delay is None:
                    return _give_up(envelope, retry, last, fields)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    return Deferred(last)
                waited = retry.wait(
                    log,
                    logging.ERROR if exc.misconfigured else logging.WARNING,
                    f"{envelope.mailbox}: {envelope.ref}: webhook",
                    exc,
                    delay_s=delay,
                    fields=fields,
                )
                if await _unless_retired(webhook, waited) is SUPERSEDED:
                    return SUPERSEDED
            except BaseException:
                circuit.abandoned()
                raise
            else:
                circuit.answered()
                return result

    async def _post(
        self,
        webhook: Webhook,
        envelope: Envelope,
        key: str | None,
        body: bytes,
        fields: dict[str, Any],
        *,
        left_s: float | None = None,
    ) -> Outcome | Rejected:
        """One request (or, with ``sidekiq``, one push); within ``left_s`` when a push
        source's deadline is nearer than the webhook's timeout."""
        if webhook.config.sidekiq is not None:
            return await self._push(webhook, webhook.config.sidekiq, envelope, body)
        if self._session is None:
            raise RuntimeError("use Webhooks in `async with`")
        config = webhook.config
        headers = webhook.headers(envelope, key, body)
        data: bytes | AsyncIterator[memoryview] = body
        if len(body) > SLICED_BODY_BYTES:
            # In slices, each sent before the next: asyncio's transport (Python 3.11) copies
            # what the socket did not take at once into its buffer, twice over for a large body.
            headers["Content-Length"] = str(len(body))
            data = _slices(body)
        started = time.monotonic()
        status_class = StatusClass.ERROR  # no answer: a timeout or a connection error
        try:
            async with self._session.post(
                config.url,
                data=data,
                headers=headers,
                timeout=webhook.timeout if left_s is None else _sooner(webhook, left_s),
                allow_redirects=False,
                ssl=webhook.ssl,
                proxy=webhook.proxy,
            ) as response:
                status = response.status
                status_class = StatusClass.of(status)
                delay_s = parse_retry_after(response.headers.get("Retry-After"))
                try:
                    answer = await _read_bounded(response, MAX_ANSWER_BYTES)
                except (aiohttp.ClientError, TimeoutError):
                    if not 200 <= status < 300:
                        raise
                    answer = b""  # the status is the answer; a 2xx must not be posted again
        except TimeoutError as exc:
            within = config.timeout_s if left_s is None else min(config.timeout_s, left_s)
            raise TransientDeliveryError(f"no answer within {within:g}s") from exc
        except aiohttp.ClientError as exc:
            # aiohttp's text carries the whole URL, its ?query (a receiver's token) too.
            raise TransientDeliveryError(error_text(exc, config.url)) from exc
        finally:
            self._monitor.webhook(envelope.mailbox, status_class, time.monotonic() - started)
        fields["status"] = status
        return classify(status, answer, delay_s, config)

    async def _push(
        self, webhook: Webhook, config: SidekiqConfig, envelope: Envelope, body: bytes
    ) -> Outcome:
        """One attempt of ``delivery_method: sidekiq``: the job, LPUSHed (``sidekiq``)."""
        if webhook.queue is None:
            raise RuntimeError(f"{webhook.label}: no Redis client for its Sidekiq jobs")
        item = await _off_thread(len(body), sidekiq.job, config, body)
        started = time.monotonic()
        status_class = StatusClass.ERROR
        try:
            await webhook.queue.push(config.key, item)
            status_class = StatusClass.SUCCESS
        except ArbitrationError as exc:
            raise TransientDeliveryError(str(exc), misconfigured=exc.misconfigured) from exc
        finally:
            self._monitor.webhook(envelope.mailbox, status_class, time.monotonic() - started)
        return Outcome.DELIVERED


async def _off_thread(size: int, function: Callable[..., str], *args: Any) -> str:
    """``function(*args)``, in a worker thread for a message over 64 KiB (charset detection
    and JSON encoding are linear, but not free)."""
    if size <= 64 * 1024:
        return function(*args)
    return await asyncio.to_thread(function, *args)


async def _unless_retired(webhook: Webhook, waiting: Coroutine[Any, Any, T]) -> T | Superseded:
    """``await waiting``, unless a reload retires ``webhook`` first: then ``waiting`` is
    cancelled and the answer is ``SUPERSEDED``. An admission the circuit granted that is not
    used (the webhook retired meanwhile, or this delivery cancelled) is given back."""
    task = asyncio.ensure_future(waiting)
    retired = asyncio.ensure_future(webhook.retired.wait())
    used = False
    try:
        await asyncio.wait((task, retired), return_when=asyncio.FIRST_COMPLETED)
        if task.done() and not webhook.retired.is_set():
            used = True
            return task.result()
        return SUPERSEDED
    finally:
        retired.cancel()
        if not used:
            task.cancel()  # nothing, if it is done
            task.add_done_callback(lambda done: _give_back(webhook, done))


def _give_back(webhook: Webhook, done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is None and done.result() is True:
        webhook.circuit.abandoned()  # the circuit let it through, perhaps as its probe


async def _slot(webhook: Webhook, deadline: float | None) -> bool:
    """Take one of the webhook's slots (``concurrency``); False when ``deadline`` came first."""
    if deadline is None:
        await webhook.slots.acquire()
        return True
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await webhook.slots.acquire()
    except TimeoutError:
        return False
    return True


def _sooner(webhook: Webhook, left_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=min(webhook.config.timeout_s, left_s))


def _give_up(envelope: Envelope, retry: Retry, last: str, fields: dict[str, Any]) -> Outcome:
    log.error(
        "%s: %s: webhook failed for %.0fs (%d attempts, last: %s); giving up "
        "(retry.give_up_after) and dead-lettering",
        envelope.mailbox,
        envelope.ref,
        retry.elapsed_s,
        retry.attempt,
        last,
        extra=fields,
    )
    fields["why"] = f"the webhook failed for {retry.elapsed_s:.0f}s (last: {last})"
    return Outcome.DEAD_LETTERED


async def _slices(body: bytes, size: int = 64 * 1024) -> AsyncIterator[memoryview]:
    view = memoryview(body)
    for start in range(0, len(view), size):
        yield view[start : start + size]


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read at most ``limit`` bytes of an answer: we only need a 422's reason."""
    chunks: list[bytes] = []
    size = 0
    content = response.content
    while size < limit and not content.at_eof():  # at_eof: spares a read that would say b""
        chunk = await content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
