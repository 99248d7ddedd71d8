"""Per-mailbox state, and ``/healthz``, ``/readyz`` and ``/metrics`` (prometheus-client).

``Health`` receives the ``Monitor`` events of the sources and the dispatcher, keeps one state per
mailbox (``starting``, ``connected``, ``reconnecting``, ``stopping``), logs each state change
once, and counts into its own ``CollectorRegistry`` (not the global one: several instances can
run in one process). ``HealthServer`` serves it with aiohttp.

Readiness (``/readyz``: 200 or 503, the JSON body gives the state of each mailbox):

- an IMAP mailbox is ready while it is connected: logged in, mailbox selected, sweeping or
  idling. It stops being ready the moment its connection is lost. A server that closes the
  connection (shutdown, restart or crash: the kernel sends FIN or RST) is noticed at once; a peer
  that vanishes without a word (a dead NAT, a pulled cable) within about 30 s by TCP keepalive
  (15 s idle, then 3 probes 5 s apart), and a command without an answer within its timeout.
- a Microsoft Graph mailbox is ready while its last successful poll is at most
  ``2 * poll_interval + 30 s`` old; one failed poll (a 429, say) does not flip it.
- the dispatcher is *stalled*, and then nothing is ready, when a message has waited for its
  outcome longer than ``health.stall_after`` (300 s) and no message at all was settled during
  that time: the webhook (or the SMTP server for notices) is down, refusing or hanging. A message
  the dispatcher let go of unsettled stays unsettled until its mailbox starts again.
- while shutting down nothing is ready.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from mailroom import routing
from mailroom.config import Config, GraphMailboxConfig, HealthConfig, MailboxConfig
from mailroom.envelope import Outcome
from mailroom.monitor import Monitor

__all__ = ["GRAPH_GRACE_S", "Health", "HealthServer"]

log = logging.getLogger("mailroom.health")

GRAPH_GRACE_S = 30.0  # a Graph mailbox may be this late on top of two poll intervals
CHECK_INTERVAL_S = 5.0  # readiness is also evaluated (and its changes logged) this often
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")
# Webhook latency: up to the default webhook.timeout (30 s) and beyond.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(slots=True)
class _Source:
    """What is known of one mailbox."""

    kind: str  # imap | graph
    poll_interval_s: float | None  # Graph only
    state: str
    since: float
    reason: str | None = None
    last_ok: float | None = None  # the last connect (IMAP) or successful poll (Graph)
    reconnects: int = 0
    unsettled: dict[int, float] = field(default_factory=dict)  # token → accepted at (in order)
    settled: int = 0  # outcomes not yet followed by their finished()


class Health(Monitor):
    """The state of every mailbox and of the dispatcher, and the metrics registry."""

    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sources: dict[str, _Source] = {}
        self._expected: dict[str, MailboxConfig] = {}
        self._tokens = itertools.count(1)
        self._stall_after_s = HealthConfig().stall_after_s
        self._last_progress = clock()
        self._stopping = False
        self._not_ready: tuple[str, ...] | None = None  # as last logged
        self.started = clock()
        self.registry = registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, documentation: str, *labels: str) -> Counter:
            return Counter(name, documentation, ["mailbox", *labels], registry=registry)

        self._fetched = counter("mailroom_fetched", "Messages handed to the dispatcher.")
        self._settled = counter("mailroom_settled", "Messages settled, by outcome.", "outcome")
        self._ignored = counter(
            "mailroom_ignored", "Auto-generated messages ignored, by the rule that fired.", "rule"
        )
        self._requests = counter(
            "mailroom_webhook_requests", "Webhook requests by status class (error: none).", "status"
        )
        self._reconnects = counter("mailroom_reconnects", "Connections lost or attempts failed.")
        self._latency = Histogram(
            "mailroom_webhook_request_duration_seconds",
            "Webhook request time until the answer was read (or failed).",
            ["mailbox"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.registry.register(_StateCollector(self))
        self.configure(config)

    # -- the set of mailboxes ------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Take the (re)loaded config: the mailboxes readiness waits for, ``stall_after``."""
        self._expected = {m.id: m for m in config.mailboxes}
        if config.health is not None:
            self._stall_after_s = config.health.stall_after_s
        for mailbox in config.mailboxes:
            kind, interval = "imap", None
            if isinstance(mailbox, GraphMailboxConfig):
                kind, interval = "graph", mailbox.inbox_options.poll_interval_s
            if (source := self._sources.get(mailbox.id)) is None:
                source = self._sources[mailbox.id] = _Source(
                    kind, interval, "starting", self._clock()
                )
                self._zero(mailbox.id)
            source.kind, source.poll_interval_s = kind, interval

    def _series(self, mailbox: str) -> Iterable[tuple[Counter, tuple[str, ...]]]:
        yield self._fetched, (mailbox,)
        yield self._reconnects, (mailbox,)
        for outcome in Outcome:
            yield self._settled, (mailbox, outcome.value)
        for rule in routing.AUTO_GENERATED_RULES:
            yield self._ignored, (mailbox, rule)
        for status in STATUS_CLASSES:
            yield self._requests, (mailbox, status)

    def _zero(self, mailbox: str) -> None:
        """Every series of a new mailbox exists from the start, at 0 (no gaps in rate())."""
        for counter, labels in self._series(mailbox):
            counter.labels(*labels)
        self._latency.labels(mailbox)

    def forget(self, mailbox: str) -> None:
        """A reload removed ``mailbox`` and it has stopped: drop its state and its series."""
        if mailbox in self._expected:
            return
        self._sources.pop(mailbox, None)
        for counter, labels in self._series(mailbox):
            counter.remove(*labels)
        self._latency.remove(mailbox)

    def starting(self, mailbox: str) -> None:
        """A source task for ``mailbox`` is being started (again, after a reload)."""
        if (source := self._sources.get(mailbox)) is not None:
            self._set_state(mailbox, source, "starting", None)
            source.last_ok, source.settled = None, 0
            source.unsettled.clear()  # the new source task fetches them again

    def stopping(self, mailbox: str | None = None) -> None:
        """``mailbox`` is being stopped by a reload; None: the whole process is shutting down."""
        if mailbox is None:
            self._stopping = True
            for each in self._sources.values():
                each.state = "stopping"
            return
        if (source := self._sources.get(mailbox)) is not None:
            self._set_state(mailbox, source, "stopping", None)

    def _set_state(self, mailbox: str, source: _Source, state: str, reason: str | None) -> None:
        old = source.state
        source.reason = reason
        if old == state:
            return
        now = self._clock()
        level = logging.WARNING if state == "reconnecting" else logging.INFO
        log.log(
            level,
            "%s: %s → %s after %.1fs%s",
            mailbox,
            old,
            state,
            now - source.since,
            f" ({reason})" if reason else "",
            extra={"mailbox": mailbox},
        )
        source.state, source.since = state, now

    # -- Monitor events ------------------------------------------------------------------------

    def connected(self, mailbox: str) -> None:
        if (source := self._sources.get(mailbox)) is None or source.state == "stopping":
            return
        source.last_ok = self._clock()
        self._set_state(mailbox, source, "connected", None)

    def disconnected(self, mailbox: str, reason: str) -> None:
        if (source := self._sources.get(mailbox)) is None or source.state == "stopping":
            return
        source.reconnects += 1
        self._reconnects.labels(mailbox).inc()
        self._set_state(mailbox, source, "reconnecting", reason)

    def accepted(self, mailbox: str) -> int:
        token = next(self._tokens)
        self._fetched.labels(mailbox).inc()
        if (source := self._sources.get(mailbox)) is not None:
            source.unsettled[token] = self._clock()
        return token

    def finished(self, mailbox: str, token: int) -> None:
        # The dispatcher calls outcome() just before, unless it gave up unsettled.
        if (source := self._sources.get(mailbox)) is not None and source.settled > 0:
            source.settled -= 1
            source.unsettled.pop(token, None)

    def outcome(self, mailbox: str, outcome: Outcome, rule: str | None = None) -> None:
        if (source := self._sources.get(mailbox)) is None:
            return
        self._last_progress = self._clock()  # progress is a settled message, nothing less
        source.settled += 1
        self._settled.labels(mailbox, outcome.value).inc()
        if outcome is Outcome.IGNORED and rule is not None:
            self._ignored.labels(mailbox, rule).inc()

    def webhook(self, mailbox: str, status_class: str, seconds: float) -> None:
        if mailbox not in self._sources:
            return
        self._requests.labels(mailbox, status_class).inc()
        self._latency.labels(mailbox).observe(seconds)

    # -- readiness -----------------------------------------------------------------------------

    def _mailbox_ready(self, source: _Source, now: float) -> bool:
        if source.kind == "imap":
            return source.state == "connected"
        assert source.poll_interval_s is not None
        window = 2 * source.poll_interval_s + GRAPH_GRACE_S
        return source.last_ok is not None and now - source.last_ok <= window

    def _stalled(self, now: float) -> tuple[bool, int, float]:
        """(stalled, unsettled count, age of the oldest unsettled message)."""
        count, oldest = 0, now
        for source in self._sources.values():
            count += len(source.unsettled)
            if source.unsettled:
                oldest = min(oldest, next(iter(source.unsettled.values())))
        bound = self._stall_after_s
        stalled = count > 0 and now - oldest > bound and now - self._last_progress > bound
        return stalled, count, now - oldest

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the process is ready, and the ``/readyz`` body; logs a change once."""
        now = self._clock()
        mailboxes: dict[str, Any] = {}
        not_ready = []
        for mailbox_id in self._expected:
            source = self._sources[mailbox_id]
            ready = not self._stopping and self._mailbox_ready(source, now)
            if not ready:
                not_ready.append(f"{mailbox_id} {source.state}")
            oldest = next(iter(source.unsettled.values()), now)
            mailboxes[mailbox_id] = {
                "kind": source.kind,
                "ready": ready,
                "state": source.state,
                "since_s": round(now - source.since, 3),
                "reason": source.reason,
                "last_ok_age_s": None if source.last_ok is None else round(now - source.last_ok, 3),
                "reconnects": source.reconnects,
                "unsettled": len(source.unsettled),
                "oldest_unsettled_age_s": round(now - oldest, 3),
            }
        stalled, count, oldest_age = self._stalled(now)
        if stalled:
            not_ready.append("dispatcher stalled")
        if self._stopping:
            not_ready.append("stopping")
        self._log_readiness(tuple(not_ready), count, oldest_age)
        body = {
            "ready": not not_ready,
            "stopping": self._stopping,
            "dispatcher": {
                "stalled": stalled,
                "unsettled": count,
                "oldest_unsettled_age_s": round(oldest_age, 3),
                "last_progress_age_s": round(now - self._last_progress, 3),
                "stall_after_s": self._stall_after_s,
            },
            "mailboxes": mailboxes,
        }
        return not not_ready, body

    def _log_readiness(self, not_ready: tuple[str, ...], count: int, oldest_age: float) -> None:
        if not_ready == self._not_ready:
            return
        first = self._not_ready is None
        self._not_ready = not_ready
        if not not_ready:
            if not first:
                log.info("health: ready")
        elif "dispatcher stalled" in not_ready:
            log.warning(
                "health: not ready: %s (%d messages wait for an outcome, the oldest for %.0fs, "
                "and none was settled for health.stall_after, %.0fs)",
                ", ".join(not_ready),
                count,
                oldest_age,
                self._stall_after_s,
            )
        elif not first and "stopping" not in not_ready:
            log.warning("health: not ready: %s", ", ".join(not_ready))

    async def check(self, done: asyncio.Event) -> None:
        """Evaluate readiness every few seconds until ``done``, so that changes nobody asks
        about (a stalled dispatcher, an overdue Graph poll) are logged too."""
        while not done.is_set():
            self.readiness()
            try:
                async with asyncio.timeout(CHECK_INTERVAL_S):
                    await done.wait()
            except TimeoutError:
                continue


class _StateCollector(Collector):
    """The gauges, computed at scrape time from the state (ages grow between events)."""

    def __init__(self, health: Health) -> None:
        self._health = health

    def collect(self) -> Iterable[Metric]:
        health = self._health
        now = health._clock()
        connected = GaugeMetricFamily(
            "mailroom_connected",
            "1 while the mailbox is connected (IMAP) or its last poll succeeded (Graph).",
            labels=["mailbox"],
        )
        ready = GaugeMetricFamily(
            "mailroom_mailbox_ready", "1 while the mailbox counts as ready.", labels=["mailbox"]
        )
        unsettled = GaugeMetricFamily(
            "mailroom_unsettled",
            "Messages handed to the dispatcher and not yet settled.",
            labels=["mailbox"],
        )
        oldest = GaugeMetricFamily(
            "mailroom_unsettled_oldest_age_seconds",
            "Age of the oldest message not yet settled (0 when there is none).",
            labels=["mailbox"],
        )
        for mailbox, source in health._sources.items():
            connected.add_metric([mailbox], float(source.state == "connected"))
            is_ready = not health._stopping and health._mailbox_ready(source, now)
            ready.add_metric([mailbox], float(is_ready))
            unsettled.add_metric([mailbox], float(len(source.unsettled)))
            first = next(iter(source.unsettled.values()), now)
            oldest.add_metric([mailbox], now - first)
        stalled = GaugeMetricFamily(
            "mailroom_dispatcher_stalled",
            "1 while messages wait longer than health.stall_after without any being settled.",
            value=float(health._stalled(now)[0]),
        )
        yield from (connected, ready, unsettled, oldest, stalled)


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` over HTTP (aiohttp)."""

    def __init__(self, health: Health, config: HealthConfig) -> None:
        self.health = health
        self.config = config
        self.port = config.port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve; an ``OSError`` (address in use) is raised as it is."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.config.host, self.config.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
        log.info(
            "health: serving /healthz, /readyz and /metrics on http://%s:%d",
            self.config.host,
            self.port,
        )

    async def serve(self, done: asyncio.Event) -> None:
        """The ``health`` task: check readiness until ``done``, then stop serving."""
        try:
            await self.health.check(done)
        finally:
            await self.close()

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        # Answering at all shows that the process and its event loop are alive.
        uptime = self.health._clock() - self.health.started
        return web.json_response({"status": "ok", "uptime_s": round(uptime, 3)})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, body = self.health.readiness()
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.health.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )
