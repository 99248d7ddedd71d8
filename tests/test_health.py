"""/healthz, /readyz and /metrics under real state changes, and Health's rules on a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import prometheus_client.exposition
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailroom.config import POLL_GRACE_S, ConfigError, parse_config
from mailroom.envelope import Outcome
from mailroom.kinds import KINDS
from mailroom.observe.health import Health
from mailroom.observe.monitor import LeaseChange, SourceState
from mailroom.redact import origin
from mailroom.runtime import supervisor
from mailroom.runtime.health_server import MAX_CONNECTIONS
from tests.helpers import config_dict, mailbox_dict, message, running, wait_until
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.webhook import WebhookReceiver

# IMAP: a server that closes the connection is noticed at once (docs/monitoring.md).
READY_FLIP_S = 2.0


class Probe:
    """An HTTP client for the health endpoints of one mailroom."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.base + path) as response:
            if path == "/metrics":
                assert response.headers["Content-Type"].startswith("text/plain; version=")
                return response.status, await response.text()
            return response.status, await response.json()

    async def ready(self) -> bool:
        try:
            return (await self.get("/readyz"))[0] == 200
        except aiohttp.ClientConnectionError:  # not listening yet
            return False

    async def not_ready(self) -> bool:
        return (await self.get("/readyz"))[0] == 503

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, text = await self.get("/metrics")
        assert status == 200
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def value(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return metrics[(name, frozenset(labels.items()))]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        yield client


def with_health(config: dict[str, Any], port: int, **health: Any) -> dict[str, Any]:
    config["health"] = {"listen": f"127.0.0.1:{port}", **health}
    return config


def auto_submitted(n: int) -> bytes:
    return message(n).replace(b"Subject:", b"Auto-Submitted: auto-replied\r\nSubject:", 1)


async def test_metrics_after_known_traffic_are_exact(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    port = free_port()
    webhook.fail_next(1, status=400)  # one of the three deliverable messages: dead-lettered
    await dovecot.aappend_many(
        account,
        [
            message(1),
            message(2),
            message(3),
            auto_submitted(4),
            message(5, to="someone@elsewhere.example"),  # no key: rejected (notices are off)
        ],
    )
    config = with_health(config_dict([mailbox_dict(dovecot, account)], webhook.url), port)
    probe = Probe(session, port)
    box = account.user
    async with running(parse_config(config, env={})):
        await wait_until(probe.ready, what="/readyz 200")

        async def all_settled() -> bool:
            metrics = await probe.metrics()
            settled = sum(
                value(metrics, "mailroom_settled_total", mailbox=box, outcome=o.value)
                for o in Outcome
            )
            return settled == 5

        await wait_until(all_settled, what="5 messages settled")
        metrics = await probe.metrics()
        status, body = await probe.get("/readyz")
        healthz = await probe.get("/healthz")
        liveness = await probe.get("/liveness")  # MailRoom's path, which GitLab's chart probes
    assert value(metrics, "mailroom_fetched_total", mailbox=box) == 5
    settled = {
        o.value: value(metrics, "mailroom_settled_total", mailbox=box, outcome=o.value)
        for o in Outcome
    }
    assert settled == {"delivered": 2, "rejected": 1, "ignored": 1, "dead_lettered": 1}
    assert value(metrics, "mailroom_ignored_total", mailbox=box, rule="auto_submitted") == 1
    assert value(metrics, "mailroom_ignored_total", mailbox=box, rule="precedence") == 0
    requests = {
        s: value(metrics, "mailroom_webhook_requests_total", mailbox=box, status=s)
        for s in ("2xx", "3xx", "4xx", "5xx", "error")
    }
    assert requests == {"2xx": 2, "3xx": 0, "4xx": 1, "5xx": 0, "error": 0}
    notices = {
        r: value(metrics, "mailroom_notices_total", mailbox=box, result=r)
        for r in ("sent", "refused", "disabled", "failed")
    }
    assert notices == {"sent": 0, "refused": 0, "disabled": 1, "failed": 0}  # notices are off
    assert value(metrics, "mailroom_auth_errors_total", mailbox=box, kind="login") == 0
    hook = origin(webhook.url)  # latency is per webhook, not per mailbox
    assert value(metrics, "mailroom_webhook_request_duration_seconds_count", webhook=hook) == 3
    assert (
        value(metrics, "mailroom_webhook_request_duration_seconds_bucket", webhook=hook, le="+Inf")
        == 3
    )
    assert 0 < value(metrics, "mailroom_webhook_request_duration_seconds_sum", webhook=hook) < 15
    assert not [name for name, _ in metrics if name.endswith("_created")]
    assert value(metrics, "mailroom_source_restarts_total", mailbox=box) == 0
    assert value(metrics, "mailroom_webhook_circuit_open", webhook=hook) == 0
    assert value(metrics, "mailroom_in_flight_messages") == 0
    assert value(metrics, "mailroom_in_flight_limit_messages") == 2048
    assert value(metrics, "mailroom_reconnects_total", mailbox=box) == 0
    assert value(metrics, "mailroom_dead_letters_kept_in_place_total", mailbox=box) == 0
    assert value(metrics, "mailroom_idle_without_push_total", mailbox=box) == 0
    assert value(metrics, "mailroom_connected", mailbox=box) == 1
    assert value(metrics, "mailroom_mailbox_ready", mailbox=box) == 1
    assert value(metrics, "mailroom_unsettled", mailbox=box) == 0
    assert value(metrics, "mailroom_unsettled_oldest_age_seconds", mailbox=box) == 0
    assert value(metrics, "mailroom_dispatcher_stalled") == 0
    assert status == 200
    assert body["ready"] is True
    assert body["mailboxes"][box] | {"since_s": 0, "last_ok_age_s": 0} == {
        "kind": "imap",
        "ready": True,
        "state": "connected",
        "since_s": 0,
        "reason": None,
        "webhook": hook,
        "last_ok_age_s": 0,
        "reconnects": 0,
        "failed_folder_refused": None,
        "unsettled": 0,
        "oldest_unsettled_age_s": 0,
    }
    assert body["dispatcher"]["stalled"] is False and body["dispatcher"]["unsettled"] == 0
    assert healthz[0] == 200 and healthz[1]["status"] == "ok"
    assert liveness[0] == 200 and liveness[1]["status"] == "ok"


async def test_a_refused_login_is_counted(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    port = free_port()
    box = mailbox_dict(dovecot, account, password="wrong")
    config = with_health(config_dict([box], webhook.url), port)
    probe = Probe(session, port)

    async def counted() -> bool:
        try:
            metrics = await probe.metrics()
        except aiohttp.ClientConnectionError:  # not listening yet
            return False
        return value(metrics, "mailroom_auth_errors_total", mailbox=account.user, kind="login") > 0

    async with running(parse_config(config, env={})):
        await wait_until(counted, what="mailroom_auth_errors_total{kind=login}")
        metrics = await probe.metrics()
    assert value(metrics, "mailroom_auth_errors_total", mailbox=account.user, kind="token") == 0
    assert value(metrics, "mailroom_connected", mailbox=account.user) == 0


@pytest.mark.slow
async def test_readyz_follows_dovecot_stop_and_start(
    dovecot_factory: Callable[[], Dovecot],
    webhook: WebhookReceiver,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    server = dovecot_factory()
    account = server.add_user()
    port = free_port()
    config = with_health(config_dict([mailbox_dict(server, account)], webhook.url), port)
    probe = Probe(session, port)
    box = account.user
    async with running(parse_config(config, env={})):
        await wait_until(probe.ready, what="/readyz 200")

        stopping = time.monotonic()
        await asyncio.to_thread(server.stop)
        stopped = time.monotonic()
        await wait_until(probe.not_ready, timeout=READY_FLIP_S + 5, what="/readyz 503")
        flipped = time.monotonic()
        print(
            f"\n/readyz 503 {flipped - stopping:.3f}s after Dovecot was told to stop "
            f"({flipped - stopped:.3f}s after it exited)"
        )
        status, body = await probe.get("/readyz")
        assert status == 503 and body["ready"] is False
        assert body["mailboxes"][box]["state"] == "reconnecting"
        assert body["mailboxes"][box]["reason"].startswith("ImapConnectionLost")
        assert (await probe.get("/healthz"))[0] == 200  # alive, only not ready

        async def attempts_failed() -> bool:  # the loss, then a refused reconnect
            reconnects: int = (await probe.get("/readyz"))[1]["mailboxes"][box]["reconnects"]
            return reconnects >= 2

        await wait_until(attempts_failed, what="a failed reconnect attempt")
        metrics = await probe.metrics()
        assert value(metrics, "mailroom_connected", mailbox=box) == 0
        assert value(metrics, "mailroom_mailbox_ready", mailbox=box) == 0

        starting = time.monotonic()
        await asyncio.to_thread(server.start)
        await wait_until(probe.ready, timeout=30, what="/readyz 200 again")
        print(f"/readyz 200 {time.monotonic() - starting:.3f}s after Dovecot started again")
        metrics = await probe.metrics()
        assert value(metrics, "mailroom_connected", mailbox=box) == 1
        assert value(metrics, "mailroom_reconnects_total", mailbox=box) >= 2
    changes = [r.getMessage() for r in caplog.records if r.name == "mailroom.health"]
    # Logged once each, however many reconnect attempts failed in between.
    assert [c.split(" after ")[0] for c in changes if c.startswith(box)] == [
        f"{box}: starting → connected",
        f"{box}: connected → reconnecting",
        f"{box}: reconnecting → connected",
    ]


@pytest.mark.slow
async def test_a_stalled_webhook_makes_the_dispatcher_not_ready(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    port = free_port()
    config = with_health(
        config_dict([mailbox_dict(dovecot, account)], webhook.url), port, stall_after=1
    )
    probe = Probe(session, port)
    webhook.stall()
    async with running(parse_config(config, env={})):
        await wait_until(probe.ready, what="ready")
        await dovecot.aappend(account, message(1))
        await webhook.wait_for(1)
        await wait_until(probe.not_ready, timeout=5, what="stalled")
        body = (await probe.get("/readyz"))[1]
        hook = origin(webhook.url)
        assert body["dispatcher"]["stalled"] is True
        assert body["dispatcher"]["unsettled"] == 1
        assert body["dispatcher"]["oldest_unsettled_age_s"] > 1
        assert body["webhooks"][hook]["stalled"] is True
        assert body["webhooks"][hook]["unsettled"] == 1
        mailbox = body["mailboxes"][account.user]
        assert mailbox["state"] == "connected"  # the mailbox itself is fine, its webhook is not
        assert mailbox["ready"] is False and mailbox["webhook"] == hook
        metrics = await probe.metrics()
        assert value(metrics, "mailroom_dispatcher_stalled") == 1
        assert value(metrics, "mailroom_webhook_stalled", webhook=hook) == 1
        webhook.release()
        await wait_until(probe.ready, what="ready again")


async def test_a_health_port_in_use_fails_at_start(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = with_health(config_dict([mailbox_dict(dovecot, account)], webhook.url), port)
        with pytest.raises(ConfigError) as caught:
            await supervisor.run(parse_config(config, env={}), asyncio.Event(), kinds=KINDS)
    assert str(caught.value) == (
        f"health.listen: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "stop what uses it, or choose another"
    )


# -- the rules, on a fake clock -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def graph_box(mailbox_id: str, poll_interval: float) -> dict[str, Any]:
    return {
        "id": mailbox_id,
        "inbox_method": "microsoft_graph",
        "address": "incoming+%{key}@example.com",
        "user": "incoming@example.com",
        "inbox_options": {
            "tenant_id": "tenant",
            "client_id": "client",
            "client_secret": "secret",
            "poll_interval": poll_interval,
        },
    }


def imap_box(mailbox_id: str) -> dict[str, Any]:
    return {
        "id": mailbox_id,
        "address": "incoming+%{key}@example.com",
        "host": "127.0.0.1",
        "user": "u",
        "password": "p",
    }


def health_of(*boxes: dict[str, Any], clock: Clock, stall_after: float = 300) -> Health:
    config = config_dict(list(boxes), "http://127.0.0.1:1/")
    config["health"] = {"stall_after": stall_after}
    return Health(parse_config(config, env={}), clock=clock)


def test_graph_is_ready_while_its_last_poll_is_within_two_intervals_and_grace() -> None:
    clock = Clock()
    health = health_of(graph_box("g", 60), clock=clock)
    assert health.readiness()[0] is False  # no poll yet
    health.state("g", SourceState.CONNECTED)
    clock.now += 2 * 60 + POLL_GRACE_S
    health.state(
        "g", SourceState.RECONNECTING, "GraphError: HTTP 429"
    )  # one failed poll does not flip it
    ready, body = health.readiness()
    assert ready is True and body["mailboxes"]["g"]["state"] == "reconnecting"
    clock.now += 0.1
    ready, body = health.readiness()
    assert ready is False and body["mailboxes"]["g"]["ready"] is False
    health.state("g", SourceState.CONNECTED)
    assert health.readiness()[0] is True


def test_dispatcher_stalls_only_without_progress() -> None:
    clock = Clock()
    health = health_of(imap_box("a"), clock=clock, stall_after=10)
    health.state("a", SourceState.CONNECTED)
    first = health.accepted("a")
    second = health.accepted("a")
    clock.now += 11
    assert health.readiness()[1]["dispatcher"]["stalled"] is True
    health.outcome("a", Outcome.DELIVERED)
    health.finished("a", first)  # progress: not stalled, though `second` is as old
    ready, body = health.readiness()
    assert ready is True and body["dispatcher"]["unsettled"] == 1
    clock.now += 11
    assert health.readiness()[0] is False
    health.outcome("a", Outcome.DEAD_LETTERED)
    health.finished("a", second)
    assert health.readiness()[0] is True


def test_a_message_given_up_unsettled_is_no_progress_and_stays_unsettled() -> None:
    clock = Clock()
    health = health_of(imap_box("a"), clock=clock, stall_after=10)
    health.state("a", SourceState.CONNECTED)
    first = health.accepted("a")
    clock.now += 11
    health.finished("a", first)  # the dispatcher let go of it without an outcome
    ready, body = health.readiness()
    assert ready is False and body["dispatcher"]["stalled"] is True
    assert body["mailboxes"]["a"]["unsettled"] == 1
    second = health.accepted("a")
    health.outcome("a", Outcome.DELIVERED)
    health.finished("a", second)
    assert health.readiness()[1]["dispatcher"]["unsettled"] == 1  # progress: not stalled
    assert health.readiness()[0] is True
    clock.now += 11
    assert health.readiness()[0] is False
    health.starting("a")  # the source starts again: it fetches that message anew
    health.state("a", SourceState.CONNECTED)
    assert health.readiness()[1]["mailboxes"]["a"]["unsettled"] == 0
    assert health.readiness()[0] is True


def test_stopping_is_not_ready_and_forget_drops_the_series(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    clock = Clock()
    health = health_of(imap_box("a"), imap_box("b"), clock=clock)
    health.state("a", SourceState.CONNECTED)
    health.state("b", SourceState.CONNECTED)
    for _ in range(5):
        health.state("b", SourceState.RECONNECTING, "ImapConnectionLost: refused")
    assert [r.getMessage() for r in caplog.records if "→ reconnecting" in r.getMessage()] == [
        "b: connected → reconnecting after 0.0s (ImapConnectionLost: refused)"
    ]
    health.configure(parse_config(config_dict([imap_box("a")], "http://127.0.0.1:1/"), env={}))
    health.stopping("b")
    health.forget("b")
    names = {s.labels.get("mailbox") for f in health.registry.collect() for s in f.samples}
    assert names == {"a", None}
    assert health.readiness()[0] is True
    health.stopping()
    ready, body = health.readiness()
    assert ready is False and body["stopping"] is True


async def test_metrics_are_written_off_the_loop_and_concurrent_scrapes_share_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 23: writing 24,000 series for 1,000 mailboxes took 0.3 s on the event loop. The
    gauges are collected on the loop, the rest is written in a worker thread; two scrapes at
    once get one text."""
    health = health_of(*(imap_box(f"box{n}") for n in range(50)), clock=Clock())
    health.state("box7", SourceState.CONNECTED)
    health.outcome("box7", Outcome.DELIVERED)
    threads: list[str] = []
    write = prometheus_client.exposition.generate_latest

    def recording(registry: Any) -> bytes:
        threads.append(threading.current_thread().name)
        return write(registry)

    monkeypatch.setattr("mailroom.observe.metrics.generate_latest", recording)
    first, second = await asyncio.gather(health.metrics.exposition(), health.metrics.exposition())
    assert first is second and len(threads) == 1
    assert threads[0] != threading.main_thread().name
    assert first == write(health.registry)  # the same text as written on the loop
    samples = {
        (sample.name, sample.labels.get("mailbox"), sample.labels.get("outcome")): sample.value
        for family in text_string_to_metric_families(first.decode())
        for sample in family.samples
    }
    assert samples[("mailroom_connected", "box7", None)] == 1
    assert samples[("mailroom_connected", "box8", None)] == 0
    assert samples[("mailroom_settled_total", "box7", "delivered")] == 1
    await health.metrics.exposition()
    assert len(threads) == 2  # a scrape after it is written again


async def test_per_mailbox_false_keeps_totals_only() -> None:
    """``metrics: {per_mailbox: false}``: no series per mailbox (27 a mailbox otherwise), the
    counters and gauges are totals over all of them."""
    config = config_dict([imap_box(f"box{n}") for n in range(300)], "http://127.0.0.1:1/")
    config["metrics"] = {"per_mailbox": False}
    health = Health(parse_config(config, env={}), clock=Clock())
    health.state("box1", SourceState.CONNECTED)
    health.state("box2", SourceState.CONNECTED)
    token = health.accepted("box1")
    health.accepted("box2")
    health.outcome("box1", Outcome.DELIVERED)
    health.finished("box1", token)
    health.outcome("box3", Outcome.DELIVERED)
    text = (await health.metrics.exposition()).decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert not [key for key in samples if "mailbox" in dict(key[1])]
    assert samples[("mailroom_settled_total", (("outcome", "delivered"),))] == 2
    assert samples[("mailroom_fetched_total", ())] == 2
    assert samples[("mailroom_connected", ())] == 2
    assert samples[("mailroom_unsettled", ())] == 1
    assert len(samples) < 100


@pytest.mark.slow
async def test_a_backlog_behind_a_stalled_webhook_is_bounded_in_memory(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    """MAX_IN_FLIGHT messages are fetched and held; the rest wait on the server, unfetched."""
    from mailroom.sources.imap import MAX_IN_FLIGHT  # noqa: PLC0415

    count = MAX_IN_FLIGHT + 144
    await dovecot.aappend_many(account, [message(n) for n in range(count)])
    webhook.stall()
    port = free_port()
    config = with_health(config_dict([mailbox_dict(dovecot, account)], webhook.url), port)
    probe = Probe(session, port)
    box = account.user
    async with running(parse_config(config, env={})):

        async def held(expected: int) -> bool:
            metrics = await probe.metrics()
            return value(metrics, "mailroom_unsettled", mailbox=box) == expected

        await wait_until(probe.ready, what="/readyz 200")
        await wait_until(lambda: held(MAX_IN_FLIGHT), what=f"{MAX_IN_FLIGHT} held")
        await webhook.wait_for(8)  # webhook.concurrency requests in flight, stalled
        metrics = await probe.metrics()
        assert value(metrics, "mailroom_fetched_total", mailbox=box) == MAX_IN_FLIGHT
        webhook.release()
        await webhook.wait_for(count, timeout=30)
        await wait_until(lambda: held(0), what="everything settled")
    assert len({r.headers["webhook-id"] for r in webhook.requests}) == count


@pytest.mark.parametrize(
    ("ready_when", "connected", "ready"),
    [
        ("all", 9, False),
        ("all", 10, True),
        ("any", 0, False),
        ("any", 1, True),
        (0.9, 8, False),
        (0.9, 9, True),
        ("25%", 2, False),
        ("25%", 3, True),  # rounded up: a quarter of 10 is 3 mailboxes
    ],
)
def test_ready_when_sets_how_many_mailboxes_must_be_ready(
    ready_when: Any, connected: int, ready: bool
) -> None:
    boxes = [imap_box(f"m{i}") for i in range(10)]
    data = config_dict(boxes, "http://127.0.0.1:1/")
    data["health"] = {"listen": "127.0.0.1:0", "ready_when": ready_when}
    health = Health(parse_config(data, env={}), clock=Clock())
    for i in range(connected):
        health.state(f"m{i}", SourceState.CONNECTED)
    is_ready, body = health.readiness()
    assert is_ready is ready
    assert body["mailboxes_ready"] == connected


@pytest.mark.parametrize("bad", ["most", 0, 1.5, "0%", True, "-10%"])
def test_ready_when_refuses_what_it_cannot_count(bad: Any) -> None:
    data = config_dict([imap_box("a")], "http://127.0.0.1:1/")
    data["health"] = {"ready_when": bad}
    with pytest.raises(ConfigError, match=r"^health\.ready_when: expected all, any, or a fraction"):
        parse_config(data, env={})


def test_a_stalled_webhook_takes_out_only_its_own_mailboxes() -> None:
    clock = Clock()
    boxes = [imap_box("a"), {**imap_box("b"), "webhook": {"url": "http://127.0.0.2:1/"}}]
    data = config_dict(boxes, "http://127.0.0.1:1/")
    data["health"] = {"stall_after": 10, "ready_when": "any"}
    health = Health(parse_config(data, env={}), clock=clock)
    health.state("a", SourceState.CONNECTED)
    health.state("b", SourceState.CONNECTED)
    health.accepted("a")
    clock.now += 11
    ready, body = health.readiness()
    assert ready is True  # "any": b still serves
    assert body["webhooks"]["http://127.0.0.1:1"]["stalled"] is True
    assert body["webhooks"]["http://127.0.0.2:1"]["stalled"] is False
    assert [body["mailboxes"][m]["ready"] for m in "ab"] == [False, True]


def test_replica_series_exist_from_the_first_arbitration_round() -> None:
    health = health_of(imap_box("a"), clock=Clock())
    names = {s.name for family in health.registry.collect() for s in family.samples}
    assert "mailroom_leases_held" not in names and "mailroom_lease_changes_total" not in names
    health.arbitration(True)
    health.lease_change(LeaseChange.ACQUIRED)
    samples = {
        (s.name, s.labels.get("change")): s.value
        for family in health.registry.collect()
        for s in family.samples
    }
    # From 0, so that increase() sees the first lease lost (Prometheus takes a series' first
    # sample as its start, not as an increase).
    assert samples["mailroom_lease_changes_total", "lost"] == 0
    assert samples["mailroom_lease_changes_total", "released"] == 0
    assert samples["mailroom_lease_changes_total", "acquired"] == 1
    assert samples["mailroom_arbitration_connected", None] == 1


# -- the health port is a stranger's too (issue 18) ------------------------------------------------


async def test_hashed_mailbox_labels_name_no_mailbox(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    """``metrics.mailbox_label: hash``: /metrics and /readyz show a digest of each mailbox id
    (``<user>@<host>/<mailbox>`` by default), and /readyz no error text."""
    port = free_port()
    config = with_health(config_dict([mailbox_dict(dovecot, account)], webhook.url), port)
    config["metrics"] = {"mailbox_label": "hash"}
    parsed = parse_config(config, env={})
    label = parsed.metrics.label(account.user)
    assert label.startswith("mailbox-") and len(label) == 20
    probe = Probe(session, port)
    async with running(parsed):
        await wait_until(probe.ready, what="/readyz 200")
        metrics = await probe.metrics()
        _, text = await probe.get("/metrics")
        _, body = await probe.get("/readyz")
    assert value(metrics, "mailroom_connected", mailbox=label) == 1
    assert account.user not in text and account.user not in str(body)
    assert list(body["mailboxes"]) == [label]


@pytest.mark.slow
async def test_the_health_port_serves_four_paths_to_bounded_requests(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    port = free_port()
    config = with_health(config_dict([mailbox_dict(dovecot, account)], webhook.url), port)
    probe = Probe(session, port)
    base = f"http://127.0.0.1:{port}"
    async with running(parse_config(config, env={})):
        await wait_until(probe.ready, what="/readyz 200")
        async with session.post(base + "/healthz", data=b"x") as response:
            assert response.status == 405
        async with session.get(base + "/admin") as response:
            assert response.status == 404
        async with session.get(base + "/healthz", data=b"x" * 4096) as response:
            assert response.status == 413
        async with session.get(base + "/healthz", headers={"X-Big": "a" * 8192}) as response:
            assert response.status == 400  # aiohttp: the header line is too long
        async with session.head(base + "/metrics") as response:
            assert response.status == 200
        # Connections beyond the cap close the oldest, so the newest is answered; and within
        # CONNECTION_MAX_S every connection ends (a slow client is cut off).
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        try:
            async with aiohttp.ClientSession() as fresh, fresh.get(base + "/healthz") as response:
                assert response.status == 200
            closed = 0
            for reader, _ in idle:
                with contextlib.suppress(ConnectionError):
                    closed += await reader.read(1) == b""
            assert closed == len(idle)
        finally:
            for _, writer in idle:
                writer.close()
