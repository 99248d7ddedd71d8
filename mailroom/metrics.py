"""The Prometheus metrics (prometheus-client), in a registry of their own per ``Health``.

Counters are per mailbox (``mailbox`` label) and exist from the start at 0, so ``rate()`` has
no gaps; request latency is a histogram per webhook (``webhook``: its ``scheme://host:port``),
not per mailbox, so a thousand mailboxes do not make a thousand histograms. Gauges are computed
at scrape time from ``Health``'s state. No ``_created`` series (they double the output and say
nothing a dashboard uses).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailroom import routing
from mailroom.envelope import Outcome
from mailroom.reject import NoticeResult

if TYPE_CHECKING:
    from mailroom.health import Health

__all__ = ["LAG_INTERVAL_S", "LEASE_CHANGES", "Metrics"]

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")
AUTH_KINDS = ("login", "token")
LEASE_CHANGES = ("acquired", "released", "lost")
# Webhook latency: up to the default webhook.timeout (30 s) and beyond.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LAG_INTERVAL_S = 0.25  # how often the event loop's lag is measured


class Metrics:
    """The counters and histograms ``Health`` feeds, and its gauges."""

    def __init__(self, health: Health) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(name, documentation, ["mailbox", *labels], registry=registry)

        self.fetched = counter("mailroom_fetched", "Messages handed to the dispatcher.")
        self.settled = counter("mailroom_settled", "Messages settled, by outcome.", "outcome")
        self.ignored = counter(
            "mailroom_ignored", "Auto-generated messages ignored, by the rule that fired.", "rule"
        )
        self.notices = counter(
            "mailroom_notices", "Reject notices: sent, refused, disabled or failed.", "result"
        )
        self.requests = counter(
            "mailroom_webhook_requests", "Webhook requests by status class (error: none).", "status"
        )
        self.reconnects = counter("mailroom_reconnects", "Connections lost or attempts failed.")
        self.auth_errors = counter(
            "mailroom_auth_errors", "Logins refused (login), OAuth tokens not had (token).", "kind"
        )
        self.restarts = counter(
            "mailroom_source_restarts", "Sources restarted after an unexpected error (a bug)."
        )
        self.marker_hits = counter(
            "mailroom_marker_hits",
            "Messages another replica had already brought to an outcome: settled, not posted.",
        )
        self.lease_changes = Counter(
            "mailroom_lease_changes",
            "Replicas: leases acquired, released (handed over) or lost.",
            ["change"],
            registry=registry,
        )
        self.latency = Histogram(
            "mailroom_webhook_request_duration_seconds",
            "Webhook request time until the answer was read (or failed).",
            ["webhook"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.lag = Histogram(
            "mailroom_event_loop_lag_seconds",
            f"How late the event loop woke a task sleeping {LAG_INTERVAL_S}s (measured "
            "continuously): long steps on the loop delay every mailbox.",
            buckets=LAG_BUCKETS_S,
            registry=registry,
        )
        registry.register(_StateCollector(health))

    def series(self, mailbox: str) -> Iterable[tuple[Counter, tuple[str, ...]]]:
        yield self.fetched, (mailbox,)
        yield self.reconnects, (mailbox,)
        yield self.restarts, (mailbox,)
        yield self.marker_hits, (mailbox,)
        for outcome in Outcome:
            yield self.settled, (mailbox, outcome.value)
        for rule in routing.AUTO_GENERATED_RULES:
            yield self.ignored, (mailbox, rule)
        for status in STATUS_CLASSES:
            yield self.requests, (mailbox, status)
        for kind in AUTH_KINDS:
            yield self.auth_errors, (mailbox, kind)
        for result in NoticeResult:
            yield self.notices, (mailbox, result.value)

    def add(self, mailbox: str) -> None:
        """Every series of a new mailbox exists from the start, at 0 (no gaps in rate())."""
        for counter, labels in self.series(mailbox):
            counter.labels(*labels)

    def remove(self, mailbox: str) -> None:
        for counter, labels in self.series(mailbox):
            counter.remove(*labels)

    def add_webhook(self, label: str) -> None:
        self.latency.labels(label)

    def remove_webhook(self, label: str) -> None:
        self.latency.remove(label)

    async def measure_lag(self, done: asyncio.Event) -> None:
        """Observe the event loop's lag every ``LAG_INTERVAL_S`` until ``done``."""
        loop = asyncio.get_running_loop()
        while not done.is_set():
            started = loop.time()
            try:
                async with asyncio.timeout(LAG_INTERVAL_S):
                    await done.wait()
            except TimeoutError:
                self.lag.observe(max(0.0, loop.time() - started - LAG_INTERVAL_S))


class _StateCollector(Collector):
    """The gauges, computed at scrape time from the state (ages grow between events)."""

    def __init__(self, health: Health) -> None:
        self._health = health

    def collect(self) -> Iterable[Metric]:
        health = self._health
        now = health.clock()
        gauges = {
            name: GaugeMetricFamily(name, text, labels=["mailbox"])
            for name, text in (
                (
                    "mailroom_connected",
                    "1 while the mailbox is connected (IMAP) or its last poll succeeded (Graph).",
                ),
                ("mailroom_mailbox_ready", "1 while the mailbox counts as ready."),
                ("mailroom_unsettled", "Messages handed to the dispatcher and not yet settled."),
                (
                    "mailroom_unsettled_oldest_age_seconds",
                    "Age of the oldest message not yet settled (0 when there is none).",
                ),
            )
        }
        webhooks = health.webhook_states(now)
        for mailbox, source in health.sources.items():
            gauges["mailroom_connected"].add_metric([mailbox], float(source.state == "connected"))
            ready = health.mailbox_ready(source, now, webhooks)
            gauges["mailroom_mailbox_ready"].add_metric([mailbox], float(ready))
            gauges["mailroom_unsettled"].add_metric([mailbox], float(len(source.unsettled)))
            first = next(iter(source.unsettled.values()), now)
            gauges["mailroom_unsettled_oldest_age_seconds"].add_metric([mailbox], now - first)
        yield from gauges.values()
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
            circuit.add_metric([label], float(label in health.open_circuits))
        yield stalled_gauge
        yield circuit
        yield GaugeMetricFamily(
            "mailroom_dispatcher_stalled",
            "1 while any webhook is stalled (see mailroom_webhook_stalled).",
            value=float(any(state.stalled for state in webhooks.values())),
        )
        if health.arbitration_ok is not None:
            for name, text, value in (
                ("mailroom_arbitration_connected", "1 while Redis answers.", health.arbitration_ok),
                ("mailroom_leases_held", "Mailbox leases this replica holds.", health.leases_held),
                ("mailroom_replicas_live", "Replicas with a live heartbeat.", health.replicas_live),
            ):
                yield GaugeMetricFamily(name, text, value=float(value))
        budget = health.budget
        if budget is not None:
            for name, text, value in (
                (
                    "mailroom_in_flight_messages",
                    "Messages fetched and not settled.",
                    budget.messages,
                ),
                ("mailroom_in_flight_bytes", "Bytes of the messages in flight.", budget.bytes),
                (
                    "mailroom_in_flight_limit_messages",
                    "limits.in_flight_messages",
                    budget.max_messages,
                ),
                ("mailroom_in_flight_limit_bytes", "limits.in_flight_bytes", budget.max_bytes),
                (
                    "mailroom_budget_waiting",
                    "Fetches waiting for room under the limits.",
                    budget.waiting,
                ),
            ):
                yield GaugeMetricFamily(name, text, value=float(value))
