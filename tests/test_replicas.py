"""Replicas as real processes on one Redis and one Dovecot: each mailbox watched once, each
message posted once, across kills, stops, joins and a Redis outage."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailroom import cli
from mailroom.arbitration.store import RedisStore
from mailroom.config import parse_config
from tests.helpers import Process, config_dict, mailbox_dict, message, wait_until
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.redis import RedisServer
from tests.servers.webhook import WebhookReceiver

pytestmark = pytest.mark.slow  # replicas as real processes: the longest tests

TTL_S = 3.0  # short leases: failovers within seconds


class Replica(Process):
    """One ``python -m mailroom`` of a set, with its own health port."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        super().__init__({**config, "health": {"listen": f"127.0.0.1:{self.port}"}}, workdir)

    async def _get(self, path: str) -> tuple[int, str]:
        """The status and body of ``path`` on the health port; 0 while nothing listens
        (starting, or gone)."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(f"http://127.0.0.1:{self.port}{path}") as response,
            ):
                return response.status, await response.text()
        except aiohttp.ClientError:
            return 0, ""

    async def metric(self, name: str) -> float | None:
        status, text = await self._get("/metrics")
        if status == 0:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return float(sample.value)
        return None

    async def ready(self) -> int:
        """/readyz's status; 0 while nothing listens (starting, or gone)."""
        return (await self._get("/readyz"))[0]


async def leases_held(replicas: list[Replica]) -> list[float | None]:
    return [await r.metric("mailroom_leases_held") for r in replicas]


Replicas = Callable[[dict[str, Any]], Replica]


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    started: list[Replica] = []

    def start(config: dict[str, Any]) -> Replica:
        replica = Replica(config, tmp_path / f"replica{len(started)}")
        started.append(replica)
        replica.start()
        return replica

    yield start
    for replica in started:
        replica.kill()


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    """The test's own view of the leases."""
    data = shared(config_dict([], "http://127.0.0.1:1/"), redis_server)
    data["mailboxes"] = [{"address": "a+%{key}@example.com", "host": "h", "user": "u",
                          "password": "p"}]  # fmt: skip
    view = RedisStore(parse_config(data, env={}).arbitration, replica="test")
    yield view
    await view.close()


def shared(config: dict[str, Any], redis: RedisServer) -> dict[str, Any]:
    config["arbitration"] = {"method": "redis", "url": redis.url, "lease_ttl": TTL_S}
    return config


Setup = Callable[[int], tuple[Dovecot, list[Account], dict[str, Any]]]


@pytest.fixture
def setup(
    dovecot_factory: Callable[[], Dovecot], webhook: WebhookReceiver, redis_server: RedisServer
) -> Setup:
    """``setup(count)``: a Dovecot of its own with ``count`` accounts, and the replicas' config
    (one mailbox each, posting to ``webhook``, sharing ``redis_server``)."""

    def make(count: int) -> tuple[Dovecot, list[Account], dict[str, Any]]:
        dovecot = dovecot_factory()
        accounts = [dovecot.add_user() for _ in range(count)]
        boxes = [mailbox_dict(dovecot, a) for a in accounts]
        return dovecot, accounts, shared(config_dict(boxes, webhook.url), redis_server)

    return make


def idle_sessions(dovecot: Dovecot) -> Counter[str]:
    return Counter(user for user, command in dovecot.sessions() if command == "IDLE")


async def each_idle_once(dovecot: Dovecot, accounts: list[Account]) -> bool:
    return idle_sessions(dovecot) == Counter({a.user: 1 for a in accounts})


class Overlaps:
    """Samples Dovecot's sessions all along: a mailbox with two IDLE sessions at once (two
    replicas watching it) is recorded."""

    def __init__(self, dovecot: Dovecot) -> None:
        self.dovecot = dovecot
        self.seen: list[dict[str, int]] = []
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        for _ in range(100_000):
            counts = await asyncio.to_thread(idle_sessions, self.dovecot)
            self.samples += 1
            twice = {user: n for user, n in counts.items() if n > 1}
            if twice:
                self.seen.append(twice)
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> Overlaps:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.mark.timeout(180)
async def test_three_replicas_watch_each_of_30_mailboxes_once_ten_each(
    setup: Setup, webhook: WebhookReceiver, replicas: Replicas, store: RedisStore
) -> None:
    dovecot, accounts, config = setup(30)
    started = [replicas(config) for _ in range(3)]

    async def balanced() -> bool:
        held = await leases_held(started)
        return None not in held and sorted(held) == [10, 10, 10]  # type: ignore[type-var]

    async with Overlaps(dovecot) as overlaps:
        await wait_until(balanced, timeout=60, what="10 leases each")
        await wait_until(lambda: each_idle_once(dovecot, accounts), timeout=60, what="30 IDLE")
        holders = await store.holders([a.user for a in accounts])
    assert overlaps.samples > 10 and overlaps.seen == []
    assert all(lease is not None for lease in holders.values())
    assert len({lease.replica for lease in holders.values() if lease}) == 3
    for account in accounts[:3]:
        await dovecot.aappend(account, message(1))
    await webhook.wait_for(3)
    assert [await r.ready() for r in started] == [200, 200, 200]


@pytest.mark.timeout(240)
async def test_a_killed_replica_is_replaced_and_only_its_in_flight_messages_come_twice(
    setup: Setup, webhook: WebhookReceiver, replicas: Replicas, store: RedisStore
) -> None:
    dovecot, accounts, config = setup(10)
    for account in accounts:
        await dovecot.aappend_many(account, [message(n) for n in range(100)])
    config["webhook"]["concurrency"] = 4
    first, second = replicas(config), replicas(config)
    await webhook.wait_for(200, timeout=60)
    held = {r: await r.metric("mailroom_leases_held") or 0 for r in (first, second)}
    victim = max(held, key=held.__getitem__)
    survivor = second if victim is first else first
    victim.signal(signal.SIGKILL)
    assert await victim.wait() == -signal.SIGKILL
    at_kill = len(webhook.delivered())
    assert at_kill < 1000, "the backlog finished before the kill; nothing was tested"

    async def all_delivered() -> bool:
        return len(set(webhook.delivered())) == 1000

    await wait_until(all_delivered, timeout=120, what="all 1000 delivered")
    await wait_until(lambda: each_idle_once(dovecot, accounts), timeout=30, what="all watched")
    twice = [i for i, n in Counter(webhook.delivered()).items() if n > 1]
    # Only what the victim had in flight at the kill: its requests under way (concurrency)
    # and answers received but not yet marked.
    assert len(twice) <= 4 * 2, twice
    assert await survivor.metric("mailroom_leases_held") == 10
    holders = await store.holders([a.user for a in accounts])
    assert {lease.replica for lease in holders.values() if lease} == {
        next(iter(holders.values())).replica  # type: ignore[union-attr]
    }


@pytest.mark.timeout(180)
async def test_sigterm_hands_the_leases_over_at_once(
    setup: Setup, replicas: Replicas, store: RedisStore
) -> None:
    dovecot, accounts, config = setup(8)
    first, second = replicas(config), replicas(config)

    async def four_each() -> bool:
        return await leases_held([first, second]) == [4, 4]

    await wait_until(four_each, timeout=60, what="4 leases each")
    before = await store.holders([a.user for a in accounts])
    leaving = {m for m, lease in before.items() if lease and lease.replica != _replica_of(second)}
    first.signal(signal.SIGTERM)
    assert await first.wait() == 0
    after = await store.holders(sorted(leaving))
    # Released on the way out (not left to lapse): free, or already the other replica's.
    assert all(lease is None or lease.fence > before[m].fence for m, lease in after.items())  # type: ignore[union-attr]
    assert "lease(s) released" in first.output()
    await wait_until(lambda: each_idle_once(dovecot, accounts), timeout=30, what="all 8 watched")
    assert await second.metric("mailroom_leases_held") == 8


def _replica_of(replica: Replica) -> str:
    """A replica's id, from its log's first arbitration line."""
    for line in replica.output().splitlines():
        if "arbitration: Redis at" in line and "replica " in line:
            return line.rsplit("replica ", 1)[1].split('"')[0].strip()
    raise AssertionError("no replica id logged")


@pytest.mark.timeout(240)
async def test_a_redis_outage_under_load_never_lets_two_replicas_watch_one_mailbox(
    setup: Setup,
    webhook: WebhookReceiver,
    redis_server: RedisServer,
    replicas: Replicas,
) -> None:
    dovecot, accounts, config = setup(6)
    started = [replicas(config), replicas(config)]

    async def three_each() -> bool:
        return await leases_held(started) == [3, 3]

    await wait_until(three_each, timeout=60, what="3 leases each")
    await wait_until(lambda: each_idle_once(dovecot, accounts), timeout=60, what="all watched")
    sent = 0
    async with Overlaps(dovecot) as overlaps:
        for n in range(3):  # mail before, during and after the outage
            for account in accounts:
                await dovecot.aappend(account, message(sent))
                sent += 1
            if n == 0:
                await asyncio.to_thread(redis_server.stop)

                async def not_ready() -> bool:
                    return [await r.ready() for r in started] == [503, 503]

                await wait_until(not_ready, timeout=30, what="not ready without Redis")
                await asyncio.sleep(20)  # the outage the issue names; leases lapse meanwhile
            elif n == 1:
                await asyncio.to_thread(redis_server.start)

        async def delivered_all() -> bool:
            return len(set(webhook.delivered())) == sent

        await wait_until(delivered_all, timeout=90, what="everything delivered")
        await wait_until(lambda: each_idle_once(dovecot, accounts), timeout=60, what="watched")
    assert overlaps.samples > 100 and overlaps.seen == []
    assert len(webhook.delivered()) == sent  # none twice
    for replica in started:
        assert "arbitration: Redis at" in replica.output()
        assert "the lease could not be renewed" in replica.output()


@pytest.mark.timeout(180)
async def test_a_joining_replica_gets_its_share(setup: Setup, replicas: Replicas) -> None:
    dovecot, accounts, config = setup(12)
    first = replicas(config)

    async def held(replica: Replica, count: int) -> bool:
        return await replica.metric("mailroom_leases_held") == count

    await wait_until(lambda: held(first, 12), timeout=60, what="all 12 on the first")
    second = replicas(config)
    await wait_until(lambda: held(second, 6), timeout=60, what="6 on the second")
    await wait_until(lambda: held(first, 6), timeout=30, what="6 left on the first")
    await wait_until(lambda: each_idle_once(dovecot, accounts), timeout=30, what="watched once")


def test_a_malformed_redis_url_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "mailroom.yml"
    config.write_text(
        "mailboxes: [{address: 'a+%{key}@example.com', host: h, user: u, password: p}]\n"
        "webhook: {url: 'http://127.0.0.1:1/'}\n"
        "arbitration: {method: redis, url: 'redis://:s3cret@[::1'}\n"
    )
    assert cli.main(["run", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "arbitration.url" in err and "s3cret" not in err


async def test_an_unreachable_redis_is_said_and_nothing_is_watched(
    dovecot: Dovecot,
    webhook: WebhookReceiver,
    replicas: Replicas,
    tmp_path: Path,
) -> None:
    account = dovecot.add_user()
    port = free_port()
    config = config_dict([mailbox_dict(dovecot, account)], webhook.url)
    config["arbitration"] = {"method": "redis", "url": f"redis://127.0.0.1:{port}/0"}
    replica = replicas(config)

    async def said() -> bool:
        return f"Redis at redis://127.0.0.1:{port}/0" in replica.output()

    await wait_until(said, timeout=30, what="the log line")
    assert await replica.ready() == 503
    assert replica.output().count("no new leases") == 1  # said once, not at every attempt
    assert idle_sessions(dovecot)[account.user] == 0
