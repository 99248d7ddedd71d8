"""The dispatcher: parse, decide, post or notify, settle. Knows nothing of IMAP.

Each submitted ``Envelope`` gets its own task (owned here, named ``deliver:<mailbox>:<ref>``).
The decision is ``mailroom.decision``'s; posting (slots, retries, the circuit breaker of each
webhook) is ``mailroom.delivery``'s; notices are ``mailroom.reject``'s; with replicas, delivered
markers are ``mailroom.markers``'. The outcome is settled with ``asyncio.shield`` so a shutdown
cannot lose an acknowledgement once the webhook has answered. A message the dispatcher will not
take (shutting down, its mailbox being stopped) is released untouched, for the next sweep.

In a dry run (``mailroom run --dry-run``) nothing is posted, no notice is sent and nothing is
settled: each message's decision is logged and the message released, untouched on the server,
and not read again until its mailbox reconnects.

A mailbox whose kind ``bounces`` (LMTP) sends no reject notice: its source tells the sending
MTA why (the reason goes with the settlement), and the MTA's bounce is the notice. A message
the webhook does not take before its push source's deadline is released (``Deferred``): the
sender's queue retries it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mailroom.config import ArbitrationConfig, Config, MailboxConfig, WebhookConfig
from mailroom.delivery import notices
from mailroom.delivery.claims import Claim, Claims, MailRoomClaims
from mailroom.delivery.markers import UNKNOWN, Markers, Shared
from mailroom.delivery.posting import Deferred, Superseded, Webhook, Webhooks
from mailroom.delivery.reject import Notifier
from mailroom.delivery.sidekiq import JobQueue
from mailroom.delivery.webhook import Rejected, payload_body
from mailroom.envelope import Envelope, Outcome
from mailroom.mail import message
from mailroom.mail.decision import Action, Verdict, decide
from mailroom.observe.monitor import Monitor, NoticeResult

__all__ = ["Dispatcher", "Prepared", "notice_text"]

log = logging.getLogger("mailroom.delivery.dispatch")

T = TypeVar("T")
# Above this size a message is parsed, and its JSON body encoded, in a worker thread. Parsing is
# linear (mime.py) but hostile shapes cost up to ~2 µs a byte (issue 13): inline, 64 KiB stalls
# every mailbox and /healthz for at most ~0.15 s; ordinary mail under it takes < 1 ms and skips
# the thread hand-off.
OFF_LOOP_BYTES = 64 * 1024


async def _off_loop(size: int, function: Callable[..., T], *args: Any) -> T:
    """``function(*args)``, in a worker thread when ``size`` is over ``OFF_LOOP_BYTES``."""
    if size <= OFF_LOOP_BYTES:
        return function(*args)
    return await asyncio.to_thread(function, *args)


@dataclass(frozen=True, slots=True)
class Prepared:
    """What ``Dispatcher.prepare`` built for a config, for ``apply``."""

    config: Config
    webhooks: dict[WebhookConfig, Webhook]
    notifier: Notifier


class Dispatcher:
    """Takes envelopes from the sources and brings each one to a settled outcome."""

    def __init__(
        self,
        config: Config,
        monitor: Monitor | None = None,
        *,
        shared: Shared | None = None,
        claims: MailRoomClaims | None = None,
        queues: Callable[[ArbitrationConfig], JobQueue] | None = None,
        dry_run: bool = False,
    ) -> None:
        self._monitor = monitor or Monitor()
        self._mailboxes: dict[str, MailboxConfig] = {}
        self._config = config
        self._webhooks = Webhooks(self._monitor, queues)
        self._markers = Markers(None if dry_run else shared)  # a dry run settles nothing
        self._claims = Claims(None if dry_run else claims)  # a migration from MailRoom
        self.dry_run = dry_run
        self._notifier = Notifier(config.reject_notices, shared=shared)
        # Mailboxes being stopped (a reload, a lease handed over): their mail waits. Only
        # ``open`` takes one back, when ``Running.start`` starts its source again.
        self._closed: set[str] = set()
        self.apply(self.prepare(config))
        self._tasks: dict[asyncio.Task[None], str] = {}  # → mailbox id
        self.accepting = True

    async def __aenter__(self) -> Dispatcher:
        await self._webhooks.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.drain(0)
        await self._webhooks.__aexit__(*exc)

    def prepare(self, config: Config) -> Prepared:
        """Build what ``config`` needs (webhooks, notifier) without changing anything yet: the
        first phase of a reload; raises when something cannot be built."""
        webhooks = self._webhooks.prepare(config)
        notifier = self._notifier
        if config.reject_notices != notifier.config:
            notifier = Notifier(config.reject_notices, shared=self._markers.shared)
            notifier.limiter = self._notifier.limiter  # the 24-hour rate limit survives
        return Prepared(config, webhooks, notifier)

    def apply(self, prepared: Prepared) -> None:
        """Take a (re)loaded config: new deliveries use its mailboxes, webhooks and notices.

        A delivery waiting to try a webhook again that the new config changed is decided again
        under it (``Superseded``); the others finish with the settings they started with.
        """
        self._config = prepared.config
        self._mailboxes = {m.id: m for m in prepared.config.mailboxes}
        self._webhooks.use(prepared.webhooks)
        self._notifier = prepared.notifier

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
            await self._settle(envelope, seen, fields, recorded=True)
            return
        async with self._claims.held(envelope, fields) as claim:
            if claim is not Claim.OURS:  # MailRoom has it, or it cannot be told
                envelope.release(hold=False)
                self._monitor.released(envelope.mailbox)
                return
            await self._deliver(envelope, mailbox, fields)

    async def _deliver(
        self, envelope: Envelope, mailbox: MailboxConfig, fields: dict[str, Any]
    ) -> None:
        """Decide, deliver and settle ``envelope``."""
        try:
            outcome = await self._decide(envelope, mailbox, fields)
            while isinstance(outcome, Superseded):  # once per reload that changed its webhook
                current = self._mailboxes.get(envelope.mailbox)
                if current is None:  # the reload removed its mailbox, which is stopping
                    log.info(
                        "%s: %s: its mailbox is no longer configured; left for the next run",
                        envelope.mailbox,
                        envelope.ref,
                        extra=fields,
                    )
                    envelope.release(hold=False)
                    self._monitor.released(envelope.mailbox)
                    return
                log.info(
                    "%s: %s: the reload changed its webhook; deciding again with the new config",
                    envelope.mailbox,
                    envelope.ref,
                    extra=fields,
                )
                outcome = await self._decide(envelope, current, fields)
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
            fields["why"] = "an internal error in mailroom (its log says which)"
            outcome = None if self.dry_run else Outcome.DEAD_LETTERED
        if outcome is None or isinstance(outcome, Deferred):
            if isinstance(outcome, Deferred):  # the sender's queue retries it
                fields["why"] = outcome.why
                log.warning(
                    "%s: %s: not delivered in time (%s); the sender retries it",
                    envelope.mailbox,
                    envelope.ref,
                    outcome.why,
                    extra=fields,
                )
            # A dry run: not read again until the mailbox reconnects.
            envelope.release(hold=outcome is None)
            self._monitor.released(envelope.mailbox)
            return
        await self._settle(envelope, outcome, fields)

    async def _settle(
        self,
        envelope: Envelope,
        outcome: Outcome,
        fields: dict[str, Any],
        *,
        recorded: bool = False,
    ) -> None:
        """Settle ``envelope``; with replicas, its marker first (unless it is ``recorded``: the
        marker another replica left)."""
        fields["outcome"] = outcome.value
        # Shield the settlement, not the work (arq worker.py): once the outcome is known, a
        # cancellation must not lose the acknowledgement (nor its marker, with replicas).
        await asyncio.shield(self._record_and_settle(envelope, outcome, fields, recorded))
        self._monitor.outcome(envelope.mailbox, outcome, fields.get("rule"))
        log.info("%s: %s: %s", envelope.mailbox, envelope.ref, outcome.value, extra=fields)

    async def _record_and_settle(
        self, envelope: Envelope, outcome: Outcome, fields: dict[str, Any], recorded: bool
    ) -> None:
        if not recorded:
            await self._markers.record(envelope, outcome, fields)
        await envelope.settle(outcome, fields.get("why", ""))

    async def _decide(
        self, envelope: Envelope, mailbox: MailboxConfig, fields: dict[str, Any]
    ) -> Outcome | Deferred | Superseded | None:
        """The outcome of ``envelope`` (``fields["why"]``: its reason, for a refusal); None in
        a dry run (nothing is to be settled); ``Deferred`` when a push source's deadline came
        first; ``Superseded`` when a reload replaced its webhook before it got an answer."""
        parsed = await _off_loop(len(envelope.raw), message.parse, envelope.raw)
        fields["message_id"] = parsed.message_id
        verdict = decide(
            parsed, mailbox.routing, too_large=envelope.too_large, recipient=envelope.recipient
        )
        if self.dry_run:
            self._dry_run(envelope, mailbox, verdict, fields)
            return None
        ref = f"{envelope.mailbox}: {envelope.ref}"
        if verdict.action is not Action.DELIVER:
            fields["why"] = verdict.why
        if verdict.action is Action.IGNORE:
            fields["rule"] = verdict.why
            log.info("%s: auto-generated (%s); ignored", ref, verdict.why, extra=fields)
            return Outcome.IGNORED
        if verdict.action is Action.DEAD_LETTER:
            if verdict.notice:  # too large: the sender is told
                log.warning(
                    "%s: %d bytes is over max_message_bytes (%d); dead-lettering",
                    ref,
                    envelope.size,
                    mailbox.max_message_bytes,
                    extra=fields,
                )
                return await self._notify(Outcome.DEAD_LETTERED, envelope, verdict, fields)
            defects = ", ".join(parsed.defects)
            log.warning("%s: unparsable (%s); dead-lettering", ref, defects, extra=fields)
            return Outcome.DEAD_LETTERED
        if verdict.action is Action.REJECT:
            log.info("%s: rejected: %s", ref, verdict.why, extra=fields)
            return await self._notify(Outcome.REJECTED, envelope, verdict, fields)
        delivery = verdict.delivery
        hook = mailbox.webhook
        body = envelope.raw
        if hook.format == "json":
            body = await _off_loop(len(body), payload_body, envelope, parsed, delivery)
        result = await self._webhooks.deliver(envelope, delivery, hook, body, fields)
        if isinstance(result, Rejected):
            log.info("%s: the application rejected it: %s", ref, result.reason, extra=fields)
            fields["why"] = result.reason
            if mailbox.bounces:  # the sending MTA is told, and bounces it
                return Outcome.REJECTED
            rejected = Verdict(Action.REJECT, result.reason, parsed, delivery)
            return await self._notify(Outcome.DELIVERED, envelope, rejected, fields)
        return result

    def _dry_run(
        self, envelope: Envelope, mailbox: MailboxConfig, verdict: Verdict, fields: dict[str, Any]
    ) -> None:
        """Log what would happen to ``envelope``; nothing is posted, sent or settled."""
        if verdict.action is Action.DELIVER:
            delivery = verdict.delivery
            what = (
                f"would {'push a Sidekiq job to' if mailbox.webhook.sidekiq else 'POST to'} "
                f"{mailbox.webhook.origin} (key {delivery.key}, "
                f"matched {delivery.matched_header})"
            )
        elif verdict.action is Action.IGNORE:
            what = f"would ignore it as auto-generated ({verdict.why})"
        else:
            verb = "reject" if verdict.action is Action.REJECT else "dead-letter"
            what = f"would {verb} it ({verdict.why})"
            if verdict.action is Action.DEAD_LETTER:
                what += f": {mailbox.dead_letter}"
            if verdict.notice:
                notice = notice_text(verdict.parsed, mailbox, self._config)
                what += f"; notice: {notice}"
        log.info(
            "%s: %s: dry run: %s; left as it is", envelope.mailbox, envelope.ref, what, extra=fields
        )

    async def _notify(
        self, outcome: Outcome, envelope: Envelope, verdict: Verdict, fields: dict[str, Any]
    ) -> Outcome:
        """Send the reject notice if the policy allows, then ``outcome``; dead-lettered instead
        when the notice could not be sent (nothing is dropped silently). A mailbox that
        ``bounces`` sends none: its source tells the sending MTA."""
        mailbox = self._mailboxes[envelope.mailbox]
        if mailbox.bounces:
            return Outcome.REJECTED if verdict.action is Action.REJECT else outcome
        result = await self._notifier.notify(
            verdict.parsed,
            verdict.why,
            mailbox=envelope.mailbox,
            ref=envelope.ref,
            rules=mailbox.routing,
            max_message_bytes=mailbox.max_message_bytes,
            fields=fields,
        )
        self._monitor.notice(envelope.mailbox, result)
        return Outcome.DEAD_LETTERED if result is NoticeResult.FAILED else outcome


def notice_text(parsed: message.ParsedMessage, mailbox: MailboxConfig, config: Config) -> str:
    """Who would get a reject notice, or why nobody would (the rate limit aside)."""
    if mailbox.bounces:
        return "none: mailroom answers the sending MTA 5xx, and its bounce tells the sender"
    rules = mailbox.routing
    settings = config.reject_notices
    if settings is None:
        return "none: reject_notices is not configured"
    recipient = notices.configured_recipient(parsed, rules, settings)
    if recipient.address is None:
        return f"none: {recipient.refused}"
    return f"a reject notice to {recipient.address} (at most one per sender and reason a day)"
