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

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.registry import Collector

from mailroom.envelope import Outcome
from mailroom.mail import routing
from mailroom.observe.monitor import AuthFailure, NoticeResult, StatusClass

__all__ = ["LAG_INTERVAL_S", "Metrics"]

prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# Webhook latency: up to the default webhook.timeout (30 s) and beyond.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A listener's reply after DATA: milliseconds when the webhook answers at once, up to
# reply_within (60 s by default) when it does not.
REPLY_BUCKETS_S = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The replies a listener gives (lmtp_wire), each a series from the start.
REPLY_CODES = (250, 421, 451, 452, 550, 552, 553, 554)
LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
LAG_INTERVAL_S = 0.25  # how often the event loop's lag is measured


class Metrics:
    """The counters and histograms ``Health`` feeds; its gauges are ``gauges``."""

    def __init__(self, gauges: Collector) -> None:
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
        self.violations = counter(
            "mailroom_peer_violations",
            "Connections dropped because the server broke a bound (line, literal, answer size).",
        )
        self.malformed = counter(
            "mailroom_malformed_items",
            "Messages skipped because the server described them out of range.",
        )
        self.restarts = counter(
            "mailroom_source_restarts", "Sources restarted after an unexpected error (a bug)."
        )
        self.kept_in_place = counter(
            "mailroom_dead_letters_kept_in_place",
            "Dead letters flagged $MailroomFailed where they are: failed_folder was refused.",
        )
        self.idle_without_push = counter(
            "mailroom_idle_without_push",
            "Sweeps that found mail no IDLE push had announced (the server does not push).",
        )
        self.marker_hits = counter(
            "mailroom_marker_hits",
            "Messages another replica had already brought to an outcome: settled, not posted.",
        )
        self.sessions = counter("mailroom_lmtp_sessions", "LMTP sessions opened.")
        self.transactions = counter(
            "mailroom_lmtp_transactions", "LMTP messages taken (the end of DATA)."
        )
        self.replies = counter(
            "mailroom_lmtp_replies",
            "LMTP replies to a recipient, by code (at RCPT, before DATA, or after it).",
            "code",
        )
        self.reply_time = Histogram(
            "mailroom_lmtp_reply_seconds",
            "From the end of DATA to a recipient's reply.",
            ["mailbox"],
            buckets=REPLY_BUCKETS_S,
            registry=registry,
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
        registry.register(gauges)  # computed at scrape time from the state (observe.health)

    def series(self, mailbox: str) -> Iterable[tuple[Counter, tuple[str, ...]]]:
        yield self.fetched, (mailbox,)
        yield self.reconnects, (mailbox,)
        yield self.restarts, (mailbox,)
        yield self.violations, (mailbox,)
        yield self.malformed, (mailbox,)
        yield self.marker_hits, (mailbox,)
        yield self.kept_in_place, (mailbox,)
        yield self.idle_without_push, (mailbox,)
        for outcome in Outcome:
            yield self.settled, (mailbox, outcome.value)
        for rule in routing.AUTO_GENERATED_RULES:
            yield self.ignored, (mailbox, rule)
        for status in StatusClass:
            yield self.requests, (mailbox, status.value)
        for failure in AuthFailure:
            yield self.auth_errors, (mailbox, failure.value)
        for result in NoticeResult:
            yield self.notices, (mailbox, result.value)

    def listener_series(self, mailbox: str) -> Iterable[tuple[Counter, tuple[str, ...]]]:
        yield self.sessions, (mailbox,)
        yield self.transactions, (mailbox,)
        for code in REPLY_CODES:
            yield self.replies, (mailbox, str(code))

    def add(self, mailbox: str) -> None:
        """Every series of a new mailbox exists from the start, at 0 (no gaps in rate())."""
        for counter, labels in self.series(mailbox):
            counter.labels(*labels)

    def add_listener(self, mailbox: str) -> None:
        """A listener's own series, from its start (``Monitor.listening``)."""
        for counter, labels in self.listener_series(mailbox):
            counter.labels(*labels)
        self.reply_time.labels(mailbox)

    def remove(self, mailbox: str, *, listener: bool = False) -> None:
        for counter, labels in self.series(mailbox):
            counter.remove(*labels)
        if listener:
            for counter, labels in self.listener_series(mailbox):
                counter.remove(*labels)
            self.reply_time.remove(mailbox)

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
