"""The dispatcher: parse, route, POST to the webhook, settle. Knows nothing of IMAP.

Each submitted ``Envelope`` gets its own task (owned here, named ``deliver:<mailbox>:<ref>``).
At most ``webhook.concurrency`` requests are in flight per webhook; a message waiting out a
retry delay holds no slot. Each webhook has a circuit breaker (``mailroom.circuit``): during an
outage one probe request goes at a time and the other messages wait without sending or logging.
The outcome is settled with ``asyncio.shield`` so a shutdown cannot lose an acknowledgement once
the webhook has answered. A message the dispatcher will not take (shutting down, its mailbox
being stopped by a reload) is released untouched, for the next sweep.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from mailroom import message, notices, routing
from mailroom.backoff import backoff_delay
from mailroom.circuit import Circuit
from mailroom.config import Config, MailboxConfig, WebhookConfig
from mailroom.envelope import Envelope, Outcome
from mailroom.errors import PermanentDeliveryError, TransientDeliveryError
from mailroom.markers import UNKNOWN, Markers, Shared
from mailroom.monitor import Monitor
from mailroom.reject import NoticeResult, Notifier
from mailroom.tls import client_context
from mailroom.webhook import (
    MAX_ANSWER_BYTES,
    Rejected,
    classify,
    labels,
    payload_body,
    request_headers,
    retry_after,
)

__all__ = ["Dispatcher", "Prepared"]

log = logging.getLogger("mailroom.dispatch")


def _ssl_context(config: WebhookConfig) -> ssl.SSLContext | bool:
    if not config.url.startswith("https:"):
        return True
    return client_context(ca_file=config.ca_file, verify=config.tls_verify)


class _Webhook:
    """One configured webhook: its slots, its circuit, its TLS settings, its request builder."""

    def __init__(self, config: WebhookConfig, label: str, monitor: Monitor) -> None:
        self.config = config
        self.label = label
        self.slots = asyncio.Semaphore(config.concurrency)
        retry = config.retry
        self.circuit = Circuit(label, initial_s=retry.initial_s, max_s=retry.max_s, monitor=monitor)
        self.ssl = _ssl_context(config)
        self.timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self.content_type = config.request_content_type

    def headers(self, envelope: Envelope, key: str | None, body: bytes) -> dict[str, str]:
        headers = request_headers(
            self.config,
            webhook_id=envelope.idempotency_key,
            body=body,
            content_type=self.content_type,
        )
        headers["X-Mailroom-Mailbox"] = envelope.mailbox
        if key is not None:
            headers["X-Mailroom-Key"] = quote(key, safe="!#$&'*+-.^_`|~=@")
        return headers


@dataclass(frozen=True, slots=True)
class Prepared:
    """What ``Dispatcher.prepare`` built for a config, for ``apply``."""

    config: Config
    webhooks: dict[WebhookConfig, _Webhook]
    notifier: Notifier


class Dispatcher:
    """Takes envelopes from the sources and brings each one to a settled outcome."""

    def __init__(
        self, config: Config, monitor: Monitor | None = None, *, shared: Shared | None = None
    ) -> None:
        self._monitor = monitor or Monitor()
        self._mailboxes: dict[str, MailboxConfig] = {}
        self._webhooks: dict[WebhookConfig, _Webhook] = {}
        self._markers = Markers(shared)
        self._notifier = Notifier(config.reject_notices, shared=shared)
        self._closed: set[str] = set()  # mailboxes a reload is stopping: their mail waits
        self.apply(self.prepare(config))
        self._tasks: dict[asyncio.Task[None], str] = {}  # → mailbox id
        self._session: aiohttp.ClientSession | None = None
        self.accepting = True
        self.in_flight = 0

    async def __aenter__(self) -> Dispatcher:
        # One session for every webhook; per-request timeouts come from each webhook's config.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            trust_env=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # a webhook sets no cookies we would keep
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain(0)
        if self._session is not None:
            await self._session.close()

    def prepare(self, config: Config) -> Prepared:
        """Build what ``config`` needs (webhooks, notifier) without changing anything yet: the
        first phase of a reload; raises when something cannot be built."""
        named = labels(m.webhook for m in config.mailboxes)
        webhooks: dict[WebhookConfig, _Webhook] = {}
        for hook, label in named.items():  # an unchanged webhook keeps its slots and circuit
            webhooks[hook] = self._webhooks.get(hook) or _Webhook(hook, label, self._monitor)
        notifier = self._notifier
        if config.reject_notices != notifier.config:
            notifier = Notifier(config.reject_notices, shared=self._markers.shared)
            notifier.limiter = self._notifier.limiter  # the 24-hour rate limit survives
        return Prepared(config, webhooks, notifier)

    def apply(self, prepared: Prepared) -> None:
        """Take a (re)loaded config: new deliveries use its mailboxes, webhooks and notices.

        Deliveries already under way finish with the settings they started with.
        """
        self._mailboxes = {m.id: m for m in prepared.config.mailboxes}
        self._webhooks = prepared.webhooks
        self._notifier = prepared.notifier
        self._closed -= set(self._mailboxes)

    def submit(self, envelope: Envelope) -> None:
        """Start bringing ``envelope`` to an outcome. Called by the sources; never blocks."""
        mailbox = envelope.mailbox
        if not self.accepting or mailbox in self._closed:
            # Fetched while shutting down, or while a reload stops its mailbox: left unsettled
            # on the server, found again by the next sweep (or the next start).
            log.info("%s: %s: stopping; left for the next sweep", mailbox, envelope.ref)
            envelope.release(hold=False)
            return
        token = self._monitor.accepted(mailbox)
        task = asyncio.get_running_loop().create_task(
            self._handle(envelope), name=f"deliver:{mailbox}:{envelope.ref}"
        )
        self._tasks[task] = mailbox

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.pop(task, None)
            self._monitor.finished(mailbox, token)

        task.add_done_callback(done)

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting; give in-flight work ``timeout_s`` to finish; cancel the rest.

        Returns how many messages were abandoned (left unsettled: delivered again after a
        restart, with the same webhook-id).
        """
        self.accepting = False
        return await self._finish(set(self._tasks), timeout_s, "shutdown")

    def open(self, mailbox: str) -> None:
        """Take ``mailbox``'s mail again (its source starts again after ``drain_mailbox``)."""
        self._closed.discard(mailbox)

    async def drain_mailbox(self, mailbox: str, timeout_s: float) -> int:
        """Like ``drain``, for one mailbox that a reload stops; the others carry on."""
        self._closed.add(mailbox)
        tasks = {task for task, owner in self._tasks.items() if owner == mailbox}
        return await self._finish(tasks, timeout_s, mailbox)

    async def _finish(self, tasks: set[asyncio.Task[None]], timeout_s: float, who: str) -> int:
        if not tasks:
            return 0
        if timeout_s > 0:
            await asyncio.wait(tasks, timeout=timeout_s)
        remaining = {task for task in tasks if not task.done()}
        for task in remaining:
            task.cancel()
        if remaining:
            await asyncio.gather(*remaining, return_exceptions=True)
            log.warning(
                "%s: %d deliveries did not finish within %.1fs and were abandoned; "
                "their messages stay unread and are delivered again after a restart",
                who,
                len(remaining),
                timeout_s,
            )
        return len(remaining)

    async def _handle(self, envelope: Envelope) -> None:
        mailbox = self._mailboxes[envelope.mailbox]
        fields: dict[str, Any] = {
            "mailbox": envelope.mailbox,
            "uid": envelope.ref,
            "webhook_id": envelope.idempotency_key,
        }
        seen = await self._markers.seen(envelope, fields)
        if seen == UNKNOWN:
            envelope.release(hold=False)
            self._monitor.released(envelope.mailbox)
            return
        if isinstance(seen, Outcome):
            log.info(
                "%s: %s: another replica already brought it to %s (its marker); settling it "
                "without posting again",
                envelope.mailbox,
                envelope.ref,
                seen.value,
                extra=fields,
            )
            self._monitor.marker_hit(envelope.mailbox)
            await self._settle(envelope, seen, fields)
            return
        try:
            outcome = await self._decide(envelope, mailbox, fields)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must neither lose the message nor retry it in a loop (a poison message
            # would be fetched again on every sweep and hold an in-flight slot): keep it in the
            # dead letters for a human, and say so loudly.
            log.exception(
                "%s: %s: internal error; dead-lettering the message to keep it",
                envelope.mailbox,
                envelope.ref,
                extra=fields,
            )
            outcome = Outcome.DEAD_LETTERED
        await self._settle(envelope, outcome, fields)

    async def _settle(self, envelope: Envelope, outcome: Outcome, fields: dict[str, Any]) -> None:
        fields["outcome"] = outcome.value
        # Shield the settlement, not the work (arq worker.py): once the outcome is known, a
        # cancellation must not lose the acknowledgement (nor its marker, with replicas).
        await asyncio.shield(self._record_and_settle(envelope, outcome, fields))
        self._monitor.outcome(envelope.mailbox, outcome, fields.get("rule"))
        log.info("%s: %s: %s", envelope.mailbox, envelope.ref, outcome.value, extra=fields)

    async def _record_and_settle(
        self, envelope: Envelope, outcome: Outcome, fields: dict[str, Any]
    ) -> None:
        await self._markers.record(envelope, outcome, fields)
        await envelope.settle(outcome)

    async def _decide(
        self, envelope: Envelope, mailbox: MailboxConfig, fields: dict[str, Any]
    ) -> Outcome:
        parsed = message.parse(envelope.raw)
        fields["message_id"] = parsed.message_id
        if envelope.too_large:
            log.warning(
                "%s: %s: %d bytes is over max_message_bytes (%d); dead-lettering",
                envelope.mailbox,
                envelope.ref,
                envelope.size,
                mailbox.max_message_bytes,
                extra=fields,
            )
            return await self._notify(
                Outcome.DEAD_LETTERED, envelope, parsed, notices.TOO_LARGE, fields
            )
        decision = routing.decide(parsed, mailbox.routing)
        if isinstance(decision, routing.Ignore):
            fields["rule"] = decision.rule
            log.info(
                "%s: %s: auto-generated (%s); ignored",
                envelope.mailbox,
                envelope.ref,
                decision.rule,
                extra=fields,
            )
            return Outcome.IGNORED
        if isinstance(decision, routing.Reject):
            if decision.reason == routing.UNPARSABLE_MESSAGE:  # no sender to tell
                log.warning(
                    "%s: %s: unparsable (%s); dead-lettering",
                    envelope.mailbox,
                    envelope.ref,
                    ", ".join(parsed.defects),
                    extra=fields,
                )
                return Outcome.DEAD_LETTERED
            log.info(
                "%s: %s: rejected: %s",
                envelope.mailbox,
                envelope.ref,
                decision.reason,
                extra=fields,
            )
            return await self._notify(Outcome.REJECTED, envelope, parsed, decision.reason, fields)
        result = await self._deliver(envelope, parsed, decision, mailbox.webhook, fields)
        if isinstance(result, Rejected):
            log.info(
                "%s: %s: the application rejected it: %s",
                envelope.mailbox,
                envelope.ref,
                result.reason,
                extra=fields,
            )
            return await self._notify(Outcome.DELIVERED, envelope, parsed, result.reason, fields)
        return result

    async def _notify(
        self,
        outcome: Outcome,
        envelope: Envelope,
        parsed: message.ParsedMessage,
        reason: str,
        fields: dict[str, Any],
    ) -> Outcome:
        """Send the reject notice if the policy allows, then ``outcome``; dead-lettered instead
        when the notice could not be sent (nothing is dropped silently)."""
        mailbox = self._mailboxes[envelope.mailbox]
        result = await self._notifier.notify(
            parsed,
            reason,
            mailbox=envelope.mailbox,
            ref=envelope.ref,
            rules=mailbox.routing,
            max_message_bytes=mailbox.max_message_bytes,
            fields=fields,
        )
        self._monitor.notice(envelope.mailbox, result.value)
        return Outcome.DEAD_LETTERED if result is NoticeResult.FAILED else outcome

    async def _deliver(
        self,
        envelope: Envelope,
        parsed: message.ParsedMessage,
        decision: routing.Deliver,
        config: WebhookConfig,
        fields: dict[str, Any],
    ) -> Outcome | Rejected:
        webhook = self._webhooks[config]
        circuit = webhook.circuit
        body = payload_body(envelope, parsed, decision) if config.format == "json" else envelope.raw
        retry = config.retry
        started = time.monotonic()
        attempt = 0
        while True:
            waited = time.monotonic() - started
            left = None if retry.give_up_after_s is None else retry.give_up_after_s - waited
            if not await circuit.admit(left):
                return self._give_up(
                    envelope, waited, attempt, "the webhook's circuit is open", fields
                )
            attempt += 1
            fields["attempt"] = attempt
            try:
                async with webhook.slots:
                    result = await self._post(webhook, envelope, decision.key, body, fields)
            except PermanentDeliveryError as exc:
                circuit.answered()
                log.error(
                    "%s: %s: webhook refused it for good: %s; dead-lettering",
                    envelope.mailbox,
                    envelope.ref,
                    exc,
                    extra=fields,
                )
                return Outcome.DEAD_LETTERED
            except TransientDeliveryError as exc:
                circuit.failed(str(exc), exc.retry_after_s)
                if circuit.is_open:
                    continue  # the circuit paces the retries now, and logged the outage
                delay = backoff_delay(attempt, initial_s=retry.initial_s, max_s=retry.max_s)
                if exc.retry_after_s is not None:
                    # Not sooner than asked, nor sooner than the backoff: "Retry-After: 0"
                    # from a struggling server must not become a tight loop.
                    delay = min(max(exc.retry_after_s, delay), retry.max_s)
                waited = time.monotonic() - started
                if retry.give_up_after_s is not None and waited + delay > retry.give_up_after_s:
                    return self._give_up(envelope, waited, attempt, str(exc), fields)
                log.log(
                    logging.ERROR if exc.misconfigured else logging.WARNING,
                    "%s: %s: webhook attempt %d failed: %s; retrying in %.1fs",
                    envelope.mailbox,
                    envelope.ref,
                    attempt,
                    exc,
                    delay,
                    extra={**fields, "delay_s": round(delay, 3)},
                )
                await asyncio.sleep(delay)
            except BaseException:
                circuit.abandoned()
                raise
            else:
                circuit.answered()
                return result

    def _give_up(
        self, envelope: Envelope, waited: float, attempts: int, last: str, fields: dict[str, Any]
    ) -> Outcome:
        log.error(
            "%s: %s: webhook failed for %.0fs (%d attempts, last: %s); giving up "
            "(retry.give_up_after) and dead-lettering",
            envelope.mailbox,
            envelope.ref,
            waited,
            attempts,
            last,
            extra=fields,
        )
        return Outcome.DEAD_LETTERED

    async def _post(
        self,
        webhook: _Webhook,
        envelope: Envelope,
        key: str | None,
        body: bytes,
        fields: dict[str, Any],
    ) -> Outcome | Rejected:
        assert self._session is not None
        config = webhook.config
        self.in_flight += 1
        started = time.monotonic()
        status_class = "error"  # no answer: a timeout or a connection error
        try:
            async with self._session.post(
                config.url,
                data=body,
                headers=webhook.headers(envelope, key, body),
                timeout=webhook.timeout,
                allow_redirects=False,
                ssl=webhook.ssl,
            ) as response:
                status = response.status
                status_class = f"{min(max(status // 100, 2), 5)}xx"
                delay_s = retry_after(response.headers.get("Retry-After"))
                try:
                    answer = await _read_bounded(response, MAX_ANSWER_BYTES)
                except (aiohttp.ClientError, TimeoutError):
                    if not 200 <= status < 300:
                        raise
                    answer = b""  # the status is the answer; a 2xx must not be posted again
        except TimeoutError as exc:
            raise TransientDeliveryError(f"no answer within {config.timeout_s:g}s") from exc
        except aiohttp.ClientError as exc:
            raise TransientDeliveryError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.in_flight -= 1
            self._monitor.webhook(envelope.mailbox, status_class, time.monotonic() - started)
        fields["status"] = status
        return classify(status, answer, delay_s, config)


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
