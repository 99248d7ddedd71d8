"""Per-mailbox state, and ``/healthz``, ``/readyz`` and ``/metrics`` (prometheus-client).

``Health`` receives the ``Monitor`` events of the sources and the dispatcher, keeps one
``SourceState`` per mailbox (``starting``, ``connected``, ``reconnecting``, ``stopping``), logs
each state change once, and counts into its own ``CollectorRegistry`` (not the global one:
several instances can run in one process). ``HealthServer`` serves it with aiohttp.

Readiness (``/readyz``: 200 or 503, the JSON body gives the state of each mailbox) follows
each mailbox's ``readiness`` rule (``config.Readiness``: its kind says which):

- an IMAP mailbox is ready while it is connected: logged in, mailbox selected, sweeping or
  idling. It stops being ready the moment its connection is lost. A server that closes the
  connection (shutdown, restart or crash: the kernel sends FIN or RST) is noticed at once; a peer
  that vanishes without a word (a dead NAT, a pulled cable) within about 30 s by TCP keepalive
  (15 s idle, then 3 probes 5 s apart), and a command without an answer within its timeout.
  It is not ready either while its server refuses for good to take dead letters into
  ``failed_folder`` (a configuration problem: they are flagged ``$MailroomFailed`` where they
  are instead; ``failed_folder_refused`` in the body says why) until a move succeeds.
- a Microsoft Graph mailbox (a poller) is ready while its last successful poll is at most
  ``2 * poll_interval + 30 s`` old; one failed poll (a 429, say) does not flip it.
- an LMTP listener is ready while it listens (``/readyz`` also shows its open sessions).
- a webhook is *stalled*, and then no mailbox posting to it is ready, when one of its messages
  has waited for its outcome longer than ``health.stall_after`` (300 s) and none of its messages
  was settled during that time: the webhook (or the SMTP server for notices) is down, refusing
  or hanging. A message the dispatcher let go of unsettled stays unsettled until its mailbox
  starts again.
- the process is ready when every mailbox is (``health.ready_when: all``, the default), when
  any one is (``any``: a sidecar whose app can work with some mailboxes down), or when at least
  a fraction of them is (``0.9``);
- while shutting down nothing is ready.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailroom.config import Config, HealthConfig, MailboxConfig, Readiness, webhook_labels
from mailroom.envelope import Outcome
from mailroom.observe.metrics import Metrics
from mailroom.observe.monitor import (
    AuthFailure,
    LeaseChange,
    Monitor,
    NoticeResult,
    SourceState,
    StatusClass,
)

__all__ = ["Health", "WebhookState"]

log = logging.getLogger("mailroom.health")


class InFlight(Protocol):
    """The process-wide in-flight budget as the metrics read it (``sources.budget.Budget``)."""

    messages: int
    bytes: int
    max_messages: int
    max_bytes: int

    @property
    def waiting(self) -> int: ...


@dataclass(slots=True)
class _MailboxState:
    """What is known of one mailbox."""

    kind: str  # its config's kind, for /readyz
    readiness: Readiness  # its kind's rule
    webhook: str  # the label of the webhook it posts to
    state: SourceState
    since: float
    reason: str | None = None
    last_ok: float | None = None  # the last time it reported CONNECTED (a connect, a poll)
    reconnects: int = 0
    refused: str | None = None  # IMAP: failed_folder refused for good (Monitor.failed_folder)
    unsettled: dict[int, float] = field(default_factory=dict)  # token → accepted at (in order)
    settled: int = 0  # outcomes not yet followed by their finished()
    sessions: int | None = None  # a listener's open sessions; None: not a listener


@dataclass(frozen=True, slots=True)
class WebhookState:
    """One webhook's messages at a point in time."""

    stalled: bool
    unsettled: int
    oldest_age_s: float
    last_progress_age_s: float


class Health(Monitor):
    """The state of every mailbox and webhook, and the metrics registry."""

    def __init__(
        self,
        config: Config,
        *,
        budget: InFlight | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.budget = budget
        self.sources: dict[str, _MailboxState] = {}
        self._expected: dict[str, MailboxConfig] = {}
        self._tokens = itertools.count(1)
        self._stall_after_s = HealthConfig().stall_after_s
        self._ready_when: Any = "all"
        self._progress: dict[str, float] = {}  # webhook label → last settled message
        self._webhooks: dict[str, str] = {}  # mailbox id → webhook label
        self.open_circuits: set[str] = set()
        self.arbitration_ok: bool | None = None  # None: no arbitration (one replica)
        self.arbitration_reason: str | None = None
        self.leases_held = 0
        self.replicas_live = 0
        self._held: set[str] | None = None  # replicas: the mailboxes this one watches
        self.conflicts: dict[str, str] = {}  # replicas: mailboxes whose lease is another's
        self._stopping = False
        self._not_ready: tuple[str, ...] | None = None  # as last logged
        self.started = clock()
        self.metrics = Metrics(_Gauges(self), per_mailbox=config.metrics.per_mailbox)
        self.registry = self.metrics.registry
        self.configure(config)

    # -- the set of mailboxes ------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Take the (re)loaded config: the mailboxes readiness waits for, their webhooks,
        ``stall_after`` and ``ready_when``."""
        self._expected = {m.id: m for m in config.mailboxes}
        if config.health is not None:
            self._stall_after_s = config.health.stall_after_s
            self._ready_when = config.health.ready_when
        named = webhook_labels(m.webhook for m in config.mailboxes)
        for label in set(named.values()) - set(self._progress):
            self._progress[label] = self.clock()
            self.metrics.add_webhook(label)
        for label in set(self._progress) - set(named.values()):
            del self._progress[label]
            self.metrics.remove_webhook(label)
        for mailbox in config.mailboxes:
            kind, readiness = mailbox.kind, mailbox.readiness
            label = self._webhooks[mailbox.id] = named[mailbox.webhook]
            if (source := self.sources.get(mailbox.id)) is None:
                source = self.sources[mailbox.id] = _MailboxState(
                    kind, readiness, label, SourceState.STARTING, self.clock()
                )
                self.metrics.add(mailbox.id)
            source.kind, source.readiness, source.webhook = kind, readiness, label

    def forget(self, mailbox: str) -> None:
        """A reload removed ``mailbox`` and it has stopped: drop its state and its series."""
        if mailbox in self._expected:
            return
        source = self.sources.pop(mailbox, None)
        self._webhooks.pop(mailbox, None)
        self.metrics.remove(mailbox, listener=source is not None and source.sessions is not None)

    def starting(self, mailbox: str) -> None:
        """A source task for ``mailbox`` is being started (again, after a reload)."""
        if (source := self.sources.get(mailbox)) is not None:
            self._set_state(mailbox, source, SourceState.STARTING, None)
            source.last_ok, source.settled, source.refused = None, 0, None
            source.unsettled.clear()  # the new source task fetches them again

    def stopping(self, mailbox: str | None = None) -> None:
        """``mailbox`` is being stopped by a reload; None: the whole process is shutting down."""
        if mailbox is None:
            self._stopping = True
            for each in self.sources.values():
                each.state = SourceState.STOPPING
            return
        if (source := self.sources.get(mailbox)) is not None:
            self._set_state(mailbox, source, SourceState.STOPPING, None)

    def _set_state(
        self, mailbox: str, source: _MailboxState, state: SourceState, reason: str | None
    ) -> None:
        old = source.state
        source.reason = reason
        if old == state:
            return
        now = self.clock()
        level = logging.WARNING if state is SourceState.RECONNECTING else logging.INFO
        log.log(
            level,
            "%s: %s → %s after %.1fs%s",
            mailbox,
            old.value,
            state.value,
            now - source.since,
            f" ({reason})" if reason else "",
            extra={"mailbox": mailbox},
        )
        source.state, source.since = state, now

    # -- Monitor events ------------------------------------------------------------------------

    def state(self, mailbox: str, state: SourceState, reason: str | None = None) -> None:
        source = self.sources.get(mailbox)
        if source is None or source.state is SourceState.STOPPING:
            return  # a stop decided here outranks what the source says on its way out
        if state is SourceState.CONNECTED:
            source.last_ok = self.clock()
        elif state is SourceState.RECONNECTING:
            source.reconnects += 1
            self.metrics.reconnects.labels(mailbox).inc()
        self._set_state(mailbox, source, state, reason)

    def auth_error(self, mailbox: str, failure: AuthFailure) -> None:
        if mailbox in self.sources:
            self.metrics.auth_errors.labels(mailbox, failure.value).inc()

    def restarted(self, mailbox: str) -> None:
        if mailbox in self.sources:
            self.metrics.restarts.labels(mailbox).inc()

    def violation(self, mailbox: str) -> None:
        if mailbox in self.sources:
            self.metrics.violations.labels(mailbox).inc()

    def malformed(self, mailbox: str) -> None:
        if mailbox in self.sources:
            self.metrics.malformed.labels(mailbox).inc()

    def failed_folder(self, mailbox: str, refused: str | None, kept: int = 0) -> None:
        if (source := self.sources.get(mailbox)) is None:
            return
        if kept:
            self.metrics.kept_in_place.labels(mailbox).inc(kept)
        if refused != source.refused:
            source.refused = refused
            if refused is None:
                log.info("%s: failed_folder accepts dead letters again", mailbox)

    def idle_without_push(self, mailbox: str) -> None:
        if mailbox in self.sources:
            self.metrics.idle_without_push.labels(mailbox).inc()

    def accepted(self, mailbox: str) -> int:
        token = next(self._tokens)
        self.metrics.fetched.labels(mailbox).inc()
        if (source := self.sources.get(mailbox)) is not None:
            source.unsettled[token] = self.clock()
        return token

    def finished(self, mailbox: str, token: int) -> None:
        # The dispatcher calls outcome() just before, unless it gave up unsettled.
        if (source := self.sources.get(mailbox)) is not None and source.settled > 0:
            source.settled -= 1
            source.unsettled.pop(token, None)

    def released(self, mailbox: str) -> None:
        if (source := self.sources.get(mailbox)) is not None:
            source.settled += 1  # paired with the finished() that follows, as an outcome is

    def outcome(self, mailbox: str, outcome: Outcome, rule: str | None = None) -> None:
        if (source := self.sources.get(mailbox)) is None:
            return
        self._progress[source.webhook] = self.clock()  # progress is a settled message
        source.settled += 1
        self.metrics.settled.labels(mailbox, outcome.value).inc()
        if outcome is Outcome.IGNORED and rule is not None:
            self.metrics.ignored.labels(mailbox, rule).inc()

    def notice(self, mailbox: str, result: NoticeResult) -> None:
        if mailbox in self.sources:
            self.metrics.notices.labels(mailbox, result.value).inc()

    def webhook(self, mailbox: str, status: StatusClass, seconds: float) -> None:
        if (source := self.sources.get(mailbox)) is None:
            return
        self.metrics.requests.labels(mailbox, status.value).inc()
        self.metrics.latency_of(source.webhook).observe(seconds)

    def circuit(self, webhook: str, *, is_open: bool) -> None:
        if is_open:
            self.open_circuits.add(webhook)
        else:
            self.open_circuits.discard(webhook)

    def arbitration(self, connected: bool, reason: str | None = None) -> None:
        if self.arbitration_ok is None:  # replicas: the lease counters exist from 0 on
            for change in LeaseChange:
                self.metrics.lease_changes.labels(change.value)
        self.arbitration_ok, self.arbitration_reason = connected, reason

    def leases(self, held: int, live: int) -> None:
        self.leases_held, self.replicas_live = held, live

    def lease_change(self, change: LeaseChange) -> None:
        self.metrics.lease_changes.labels(change.value).inc()

    def marker_hit(self, mailbox: str) -> None:
        if mailbox in self.sources:
            self.metrics.marker_hits.labels(mailbox).inc()

    def listening(self, mailbox: str) -> None:
        if (source := self.sources.get(mailbox)) is not None and source.sessions is None:
            source.sessions = 0
            self.metrics.add_listener(mailbox)

    def session(self, mailbox: str, *, opened: bool) -> None:
        if (source := self.sources.get(mailbox)) is None or source.sessions is None:
            return
        source.sessions += 1 if opened else -1
        if opened:
            self.metrics.sessions.labels(mailbox).inc()

    def transaction(self, mailbox: str) -> None:
        if (source := self.sources.get(mailbox)) is not None and source.sessions is not None:
            self.metrics.transactions.labels(mailbox).inc()

    def reply(self, mailbox: str, code: int, seconds: float | None) -> None:
        if (source := self.sources.get(mailbox)) is None or source.sessions is None:
            return
        self.metrics.replies.labels(mailbox, str(code)).inc()
        if seconds is not None:
            self.metrics.reply_time.labels(mailbox).observe(seconds)

    def expect(self, mailboxes: set[str] | None) -> None:
        self._held = mailboxes

    def conflict(self, mailbox: str, reason: str | None) -> None:
        if reason is None:
            self.conflicts.pop(mailbox, None)
        else:
            self.conflicts[mailbox] = reason

    # -- readiness -----------------------------------------------------------------------------

    def mailbox_ready(
        self, source: _MailboxState, now: float, webhooks: dict[str, WebhookState]
    ) -> bool:
        """Whether the mailbox counts as ready (``/readyz`` and ``mailroom_mailbox_ready``): its
        source is, and its webhook (``webhook_states``) is not stalled."""
        return self._source_ready(source, now) and not _stalled(source, webhooks)

    def _source_ready(self, source: _MailboxState, now: float) -> bool:
        """Its kind's rule (``Readiness``): while connected, or a recent enough success."""
        if self._stopping:
            return False
        within_s = source.readiness.within_s
        if within_s is None:
            return source.state is SourceState.CONNECTED and source.refused is None
        return source.last_ok is not None and now - source.last_ok <= within_s

    def webhook_states(self, now: float) -> dict[str, WebhookState]:
        """Per webhook: stalled or not, its unsettled messages, the oldest one's age."""
        counts: dict[str, int] = dict.fromkeys(self._progress, 0)
        oldest: dict[str, float] = dict.fromkeys(self._progress, now)
        for source in self.sources.values():
            if source.webhook not in counts:
                continue
            counts[source.webhook] += len(source.unsettled)
            if source.unsettled:
                first = next(iter(source.unsettled.values()))
                oldest[source.webhook] = min(oldest[source.webhook], first)
        bound = self._stall_after_s
        return {
            label: WebhookState(
                stalled=counts[label] > 0
                and now - oldest[label] > bound
                and now - progress > bound,
                unsettled=counts[label],
                oldest_age_s=now - oldest[label],
                last_progress_age_s=now - progress,
            )
            for label, progress in self._progress.items()
        }

    def _needed(self, total: int) -> int:
        """How many ready mailboxes make the process ready (``health.ready_when``)."""
        if self._ready_when == "all":
            return total
        if self._ready_when == "any":
            return min(1, total)
        return math.ceil(float(self._ready_when) * total)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the process is ready, and the ``/readyz`` body; logs a change once."""
        now = self.clock()
        webhooks = self.webhook_states(now)
        mailboxes: dict[str, Any] = {}
        not_ready = []
        expected = [m for m in self._expected if self._held is None or m in self._held]
        for mailbox_id in expected:
            source = self.sources[mailbox_id]
            ready = self.mailbox_ready(source, now, webhooks)
            if not ready:
                stalled = _stalled(source, webhooks)
                why = f"webhook {source.webhook} stalled" if stalled else source.state.value
                if not stalled and source.refused is not None:
                    why = "failed_folder refused: dead letters kept in place"
                not_ready.append(f"{mailbox_id} {why}")
            mailboxes[mailbox_id] = _mailbox_body(source, ready, now)
        needed = self._needed(len(expected))
        ready_count = sum(1 for m in mailboxes.values() if m["ready"])
        redis_down = self.arbitration_ok is False
        conflicts = [m for m in self._expected if m in self.conflicts]
        ready = not self._stopping and not redis_down and not conflicts and ready_count >= needed
        reasons = ()
        if not ready:
            reasons = (
                *not_ready,
                *(f"{m}: its lease is held for another mailbox" for m in conflicts),
                *(("Redis unreachable",) if redis_down else ()),
                *(("stopping",) if self._stopping else ()),
            )
        self._log_readiness(tuple(reasons), ready_count, needed)
        body = {
            "ready": ready,
            "stopping": self._stopping,
            "ready_when": self._ready_when,
            "mailboxes_ready": ready_count,
            "mailboxes_needed": needed,
            "dispatcher": self._dispatcher_body(webhooks),
            "webhooks": {
                label: {
                    "stalled": state.stalled,
                    "circuit_open": label in self.open_circuits,
                    "unsettled": state.unsettled,
                    "oldest_unsettled_age_s": round(state.oldest_age_s, 3),
                    "last_progress_age_s": round(state.last_progress_age_s, 3),
                }
                for label, state in webhooks.items()
            },
            "mailboxes": mailboxes,
        }
        if self.arbitration_ok is not None:
            body["arbitration"] = {
                "connected": self.arbitration_ok,
                "reason": self.arbitration_reason,
                "leases": self.leases_held,
                "replicas": self.replicas_live,
                "conflicts": {m: self.conflicts[m] for m in conflicts},
            }
        return ready, body

    def _dispatcher_body(self, webhooks: dict[str, WebhookState]) -> dict[str, Any]:
        """``/readyz``'s ``dispatcher``: every webhook's messages taken together."""
        states = webhooks.values()
        return {
            "stalled": any(state.stalled for state in states),
            "unsettled": sum(state.unsettled for state in states),
            "oldest_unsettled_age_s": round(
                max((state.oldest_age_s for state in states), default=0.0), 3
            ),
            "last_progress_age_s": round(
                min((state.last_progress_age_s for state in states), default=0.0), 3
            ),
            "stall_after_s": self._stall_after_s,
        }

    def _log_readiness(self, not_ready: tuple[str, ...], ready: int, needed: int) -> None:
        if not_ready == self._not_ready:
            return
        first = self._not_ready is None
        self._not_ready = not_ready
        if not not_ready:
            if not first:
                log.info("health: ready")
        elif any("stalled" in reason for reason in not_ready):
            log.warning(
                "health: not ready (%d of %d mailboxes needed are ready): %s (messages wait "
                "longer than health.stall_after, %.0fs, and none was settled meanwhile)",
                ready,
                needed,
                _summary(not_ready),
                self._stall_after_s,
            )
        elif not first and "stopping" not in not_ready:
            log.warning(
                "health: not ready (%d of %d mailboxes needed are ready): %s",
                ready,
                needed,
                _summary(not_ready),
            )


def _mailbox_body(source: _MailboxState, ready: bool, now: float) -> dict[str, Any]:
    """``/readyz``'s entry for one mailbox."""
    oldest = next(iter(source.unsettled.values()), now)
    body = {
        "kind": source.kind,
        "ready": ready,
        "state": source.state.value,
        "since_s": round(now - source.since, 3),
        "reason": source.reason,
        "webhook": source.webhook,
        "last_ok_age_s": None if source.last_ok is None else round(now - source.last_ok, 3),
        "reconnects": source.reconnects,
        "failed_folder_refused": source.refused,
        "unsettled": len(source.unsettled),
        "oldest_unsettled_age_s": round(now - oldest, 3),
    }
    if source.sessions is not None:
        body["sessions"] = source.sessions
    return body


def _stalled(source: _MailboxState, webhooks: dict[str, WebhookState]) -> bool:
    return source.webhook in webhooks and webhooks[source.webhook].stalled


def _summary(reasons: tuple[str, ...], most: int = 10) -> str:
    """At most ``most`` reasons: a thousand mailboxes down make one readable line."""
    shown = ", ".join(reasons[:most])
    return shown if len(reasons) <= most else f"{shown} and {len(reasons) - most} more"


class _Gauges(Collector):
    """The gauges, computed at scrape time from the state (ages grow between events)."""

    def __init__(self, health: Health) -> None:
        self._health = health

    def collect(self) -> Iterable[Metric]:
        health = self._health
        now = health.clock()
        webhooks = health.webhook_states(now)
        yield from self._mailboxes(now, webhooks)
        yield from self._webhooks(webhooks)
        if health.arbitration_ok is not None:
            for name, text, value in (
                ("mailroom_arbitration_connected", "1 while Redis answers.", health.arbitration_ok),
                ("mailroom_leases_held", "Mailbox leases this replica holds.", health.leases_held),
                ("mailroom_replicas_live", "Replicas with a live heartbeat.", health.replicas_live),
            ):
                yield GaugeMetricFamily(name, text, value=float(value))
        if health.budget is not None:
            yield from self._budget(health.budget)

    def _mailboxes(self, now: float, webhooks: dict[str, WebhookState]) -> Iterable[Metric]:
        """Per mailbox; with ``metrics.per_mailbox: false`` totals over all of them (how many
        are connected and ready, their unsettled messages, the oldest one's age)."""
        health = self._health
        per_mailbox = health.metrics.per_mailbox
        texts = (
            (
                "mailroom_connected",
                "1 while the mailbox is connected (IMAP), its last poll succeeded (Graph), or "
                "it listens (LMTP).",
                "Mailboxes connected (IMAP), whose last poll succeeded (Graph), or listening "
                "(LMTP).",
            ),
            (
                "mailroom_mailbox_ready",
                "1 while the mailbox counts as ready.",
                "Mailboxes that count as ready.",
            ),
            (
                "mailroom_unsettled",
                "Messages handed to the dispatcher and not yet settled.",
                "Messages handed to the dispatcher and not yet settled.",
            ),
            (
                "mailroom_unsettled_oldest_age_seconds",
                "Age of the oldest message not yet settled (0 when there is none).",
                "Age of the oldest message not yet settled (0 when there is none).",
            ),
            (
                "mailroom_lmtp_sessions_open",
                "LMTP sessions open now (listeners only).",
                "LMTP sessions open now (listeners only).",
            ),
        )
        if not per_mailbox:
            totals = [0.0, 0.0, 0.0, 0.0, 0.0]
            for source in health.sources.values():
                totals[0] += source.state is SourceState.CONNECTED
                totals[1] += health.mailbox_ready(source, now, webhooks)
                totals[2] += len(source.unsettled)
                first = next(iter(source.unsettled.values()), now)
                totals[3] = max(totals[3], now - first)
                totals[4] += source.sessions or 0
            return [
                GaugeMetricFamily(name, text, value=value)
                for (name, _, text), value in zip(texts, totals, strict=True)
            ]
        gauges = {
            name: GaugeMetricFamily(name, text, labels=["mailbox"]) for name, text, _ in texts
        }
        for mailbox, source in health.sources.items():
            connected = source.state is SourceState.CONNECTED
            gauges["mailroom_connected"].add_metric([mailbox], float(connected))
            ready = health.mailbox_ready(source, now, webhooks)
            gauges["mailroom_mailbox_ready"].add_metric([mailbox], float(ready))
            gauges["mailroom_unsettled"].add_metric([mailbox], float(len(source.unsettled)))
            first = next(iter(source.unsettled.values()), now)
            gauges["mailroom_unsettled_oldest_age_seconds"].add_metric([mailbox], now - first)
            if source.sessions is not None:
                gauges["mailroom_lmtp_sessions_open"].add_metric([mailbox], source.sessions)
        return gauges.values()

    def _webhooks(self, webhooks: dict[str, WebhookState]) -> Iterable[Metric]:
        stalled_gauge = GaugeMetricFamily(
            "mailroom_webhook_stalled",
            "1 while the webhook's messages wait longer than health.stall_after and none of "
            "them was settled in that time.",
            labels=["webhook"],
        )
        circuit = GaugeMetricFamily(
            "mailroom_webhook_circuit_open",
            "1 while the webhook's circuit breaker holds deliveries back (one probe at a time).",
            labels=["webhook"],
        )
        for label, state in webhooks.items():
            stalled_gauge.add_metric([label], float(state.stalled))
            circuit.add_metric([label], float(label in self._health.open_circuits))
        yield stalled_gauge
        yield circuit
        yield GaugeMetricFamily(
            "mailroom_dispatcher_stalled",
            "1 while any webhook is stalled (see mailroom_webhook_stalled).",
            value=float(any(state.stalled for state in webhooks.values())),
        )

    @staticmethod
    def _budget(budget: InFlight) -> Iterable[Metric]:
        for name, text, value in (
            ("mailroom_in_flight_messages", "Messages fetched and not settled.", budget.messages),
            ("mailroom_in_flight_bytes", "Bytes of the messages in flight.", budget.bytes),
            ("mailroom_in_flight_limit_messages", "limits.in_flight_messages", budget.max_messages),
            ("mailroom_in_flight_limit_bytes", "limits.in_flight_bytes", budget.max_bytes),
            (
                "mailroom_budget_waiting",
                "Fetches waiting for room under the limits.",
                budget.waiting,
            ),
        ):
            yield GaugeMetricFamily(name, text, value=float(value))
