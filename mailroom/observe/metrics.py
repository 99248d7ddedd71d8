"""The Prometheus metrics (prometheus-client), in a registry of their own per ``Health``.

Counters are per mailbox (``mailbox`` label) and exist from the start at 0, so ``rate()`` has
no gaps; request latency is a histogram per webhook (``webhook``: its ``scheme://host:port``),
not per mailbox, so a thousand mailboxes do not make a thousand histograms. Gauges are computed
at scrape time from ``Health``'s state. No ``_created`` series (they double the output and say
nothing a dashboard uses).

``Metrics.exposition`` writes the ``/metrics`` text off the event loop: the gauges are collected
on the loop (they read state the loop changes: 6 ms for 1,000 mailboxes), the counters and
histograms are collected and written in a worker thread (prometheus-client guards each with a
lock). Writing 24,000 series for 1,000 mailboxes takes 0.3 s of CPU, which on the loop delayed
every mailbox by as much at each scrape (issue 23); scrapes that come while one is being
written share it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from mailroom.envelope import Outcome
from mailroom.mail import routing
from mailroom.observe.monitor import AuthFailure, NoticeResult, StatusClass

__all__ = ["LAG_INTERVAL_S", "Families", "MailboxCounter", "Metrics"]

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

    def __init__(self, gauges: Collector, *, per_mailbox: bool = True) -> None:
        # The counters and histograms; ``gauges`` are collected apart (``exposition``).
        self.counters = registry = CollectorRegistry(auto_describe=True)
        self.gauges = gauges
        self.registry = Families(registry, gauges)  # everything, collected in the caller
        self._writing: asyncio.Future[bytes] | None = None
        self._latency: dict[str, Any] = {}  # webhook label -> its histogram's child

        self.per_mailbox = per_mailbox  # metrics.per_mailbox: false keeps totals only

        def counter(name: str, documentation: str, *labels: str) -> MailboxCounter:
            return MailboxCounter(name, documentation, labels, registry, per_mailbox=per_mailbox)

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
            "The LMTP reply that settles each recipient, by code: a refusal at RCPT or before "
            "DATA, or the reply after DATA (an accepted RCPT's 250 is not counted).",
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

    def series(self, mailbox: str) -> Iterable[tuple[MailboxCounter, tuple[str, ...]]]:
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

    def listener_series(self, mailbox: str) -> Iterable[tuple[MailboxCounter, tuple[str, ...]]]:
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
        if self.per_mailbox:  # a total keeps what a removed mailbox added to it
            for counter, labels in self.series(mailbox):
                counter.remove(*labels)
            if listener:
                for counter, labels in self.listener_series(mailbox):
                    counter.remove(*labels)
        if listener:
            self.reply_time.remove(mailbox)

    def add_webhook(self, label: str) -> None:
        self._latency[label] = self.latency.labels(label)

    def remove_webhook(self, label: str) -> None:
        self._latency.pop(label, None)
        self.latency.remove(label)

    def latency_of(self, label: str) -> Any:
        """The latency histogram of webhook ``label`` (prometheus-client's ``labels`` checks
        and locks at every call: looked up once)."""
        child = self._latency.get(label)
        if child is None:
            child = self._latency[label] = self.latency.labels(label)
        return child

    async def exposition(self, view: Callable[[Families], Any] | None = None) -> bytes:
        """The ``/metrics`` text: the gauges collected here, on the loop; the rest collected
        and written in a worker thread (through ``view``, which may rename labels, when
        given). A scrape that comes while one is being written gets the same text."""
        if self._writing is None:
            snapshot = Families(self.counters, *self.gauges.collect())
            shown = snapshot if view is None else view(snapshot)
            self._writing = asyncio.ensure_future(asyncio.to_thread(generate_latest, shown))
            self._writing.add_done_callback(self._written)
        return await asyncio.shield(self._writing)

    def _written(self, writing: asyncio.Future[bytes]) -> None:
        self._writing = None

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


class MailboxCounter(Collector):
    """A counter with labels, per mailbox, as light as a dict entry a series.

    prometheus-client's ``Counter`` makes a whole child metric (a lock, its label names, its
    value object) for each label set: 27 series for each of 1,000 mailboxes held 14 MiB, and
    each ``labels(...)`` call checked and converted the values under a lock (issue 23). Here a
    series is a ``_Count`` under its tuple of label values; the loop alone changes them, and a
    scrape in a worker thread copies the table first (one C call, so under the GIL it sees a
    consistent table). The same calls as prometheus-client's: ``labels(mailbox, ...).inc()``,
    ``remove(mailbox, ...)``. Without ``per_mailbox`` the mailbox is left out: one series per
    set of the other labels counts for every mailbox.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        registry: CollectorRegistry,
        *,
        per_mailbox: bool = True,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label_names = ("mailbox", *labels) if per_mailbox else labels
        self._skip = 0 if per_mailbox else 1  # label values left out (the mailbox)
        self._series: dict[tuple[str, ...], _Count] = {}
        registry.register(self)

    def labels(self, mailbox: str, *values: str) -> _Count:
        """The series of ``mailbox`` and ``values`` (one per other label), made at 0 the
        first time."""
        key = (mailbox, *values)[self._skip :]
        count = self._series.get(key)
        if count is None:
            if len(key) != len(self.label_names):
                raise ValueError(f"{self.name}: expected labels {self.label_names}, not {key}")
            count = self._series[key] = _Count()
        return count

    def remove(self, mailbox: str, *values: str) -> None:
        self._series.pop((mailbox, *values)[self._skip :], None)

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.label_names)]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for values, count in list(self._series.items()):
            family.add_metric(values, count.value)
        return [family]


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Families:
    """A registry-like view (``collect()``, which ``generate_latest`` asks for) of collectors
    and metric families already collected."""

    def __init__(self, *parts: Collector | Metric) -> None:
        self._parts = parts

    def collect(self) -> Iterator[Metric]:
        for part in self._parts:
            if isinstance(part, Metric):
                yield part
            else:
                yield from part.collect()
