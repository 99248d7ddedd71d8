"""Replicas, piece by piece: the arbitration config, and the Redis store against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailroom.arbitration.store import RedisStore
from mailroom.config import ArbitrationConfig, ConfigError, ImapMailboxConfig, parse_config
from mailroom.errors import ArbitrationError
from mailroom.sources.imap import webhook_id
from tests.helpers import config_dict, logged, mailbox_dict, message, running, wait_until
from tests.servers import tls
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.redis import RedisServer, Sentinel
from tests.servers.webhook import WebhookReceiver

KEY = "5ca1ab1e" * 8  # a mailbox key (identity.mailbox_key)

BOX = {"address": "a+%{key}@example.com", "host": "h", "user": "u", "password": "p"}


def arbitration(block: dict[str, Any], tmp_path: Path | None = None) -> ArbitrationConfig:
    data = config_dict([BOX], "http://127.0.0.1:1/")
    data["arbitration"] = block
    return parse_config(data, env={}, base_dir=tmp_path).arbitration


# -- config ------------------------------------------------------------------------------------


def test_redis_arbitration_config() -> None:
    config = arbitration(
        {"method": "redis", "url": "redis://redis.internal:6380/2", "password": "s3cret"}
    )
    assert (config.enabled, config.url, config.db, config.tls) == (
        True,
        "redis://redis.internal:6380/2",
        2,
        False,
    )
    assert config.lease_ttl_s == 15 and config.marker_ttl_s == 7 * 86400
    assert config.namespace == "mailroom"
    assert "s3cret" not in repr(config)
    assert arbitration({"method": "none"}) == ArbitrationConfig()
    assert arbitration({"method": "redis", "url": "unix:///run/redis.sock"}).url == (
        "unix:///run/redis.sock"
    )
    sentinel = arbitration(
        {
            "method": "redis",
            "sentinels": [{"host": "s1", "port": 26379}, {"host": "s2"}],
            "master_name": "gitlab-redis",
        }
    )
    assert sentinel.sentinels == (("s1", 26379), ("s2", 26379))
    assert sentinel.describe() == "master gitlab-redis via sentinels s1:26379,s2:26379"


@pytest.mark.parametrize(
    ("block", "error"),
    [
        ({"method": "redis"}, "arbitration.url: is required"),
        ({"method": "redis", "url": "http://h:6379"}, "arbitration.url: is not a Redis URL; write"),
        ({"method": "redis", "url": "redis://h:99999"}, "the port is not a number"),
        (
            {"method": "redis", "url": "redis://:hunter2@h:6379/0"},
            "must not carry user:password@; give username and password",
        ),
        ({"method": "redis", "url": "redis://h/zero"}, "the path must be the database number"),
        ({"method": "redis", "url": "unix:relative.sock"}, "unix:///path/to/redis.socket"),
        ({"method": "redis", "url": "redis://h", "ca_file": "x"}, "arbitration.ca_file"),
        ({"method": "redis", "url": "redis://h", "lease_ttl": 0.5}, "arbitration.lease_ttl: 0.5"),
        ({"method": "consul"}, "arbitration.method: 'consul' is not one of: none, redis"),
        (
            {"method": "redis", "url": "redis://h", "sentinels": [{"host": "s"}]},
            "give either url or sentinels",
        ),
        ({"method": "redis", "sentinels": [{"host": "s"}]}, "arbitration.master_name: is req"),
        ({"method": "redis", "url": "redis://h", "lease": 3}, "did you mean lease_ttl?"),
    ],
)
def test_bad_arbitration_config_is_named(block: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        arbitration(block)
    assert error in str(caught.value)
    assert "hunter2" not in str(caught.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(
            ["method", "url", "db", "password", "lease_ttl", "sentinels", "master_name", "tls"]
        ),
        st.one_of(
            st.text(max_size=30),
            st.integers(-5, 10**6),
            st.booleans(),
            st.none(),
            st.lists(st.dictionaries(st.sampled_from(["host", "port"]), st.text(max_size=5))),
        ),
    )
)
def test_any_arbitration_block_loads_or_is_a_config_error(block: dict[str, Any]) -> None:
    try:
        arbitration({"method": "redis", **block} if "method" not in block else block)
    except ConfigError as exc:
        assert str(exc).startswith("arbitration")


# -- the store, on a real Redis ----------------------------------------------------------------


def store_config(server: RedisServer, **overrides: Any) -> ArbitrationConfig:
    block: dict[str, Any] = {"method": "redis", "url": server.url, "lease_ttl": 3}
    block.update(overrides)
    return arbitration(block)


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[Callable[[str], RedisStore]]:
    made: list[RedisStore] = []

    def make(replica: str) -> RedisStore:
        store = RedisStore(store_config(redis_server), replica=replica)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


async def test_a_lease_is_taken_once_renewed_only_by_its_holder_and_released(
    stores: Callable[[str], RedisStore],
) -> None:
    a, b = stores("a"), stores("b")
    lease = await a.acquire("box", 3, KEY)
    assert lease is not None and (lease.replica, lease.fence) == ("a", 1)
    assert await b.acquire("box", 3, KEY) is None
    assert await b.holders(["box", "other"]) == {"box": lease, "other": None}
    assert await a.renew([lease], 3) == [True]
    await b.release([type(lease)("box", "b 1")])  # not b's: nothing happens
    assert (await a.holders(["box"]))["box"] == lease
    await a.release([lease])
    again = await b.acquire("box", 3, KEY)
    assert again is not None and again.fence == 2  # fencing numbers only grow
    assert await a.renew([lease], 3) == [False]  # b holds it now: renew says so


async def test_a_lease_whose_key_vanished_is_taken_again(
    redis_server: RedisServer, stores: Callable[[str], RedisStore]
) -> None:
    a = stores("a")
    lease = await a.acquire("box", 30, KEY)
    assert lease is not None
    redis_server.stop()  # no persistence: Redis comes back empty
    redis_server.start()
    renewed = None
    for _ in range(2):  # the first try may meet the old, dead connection
        with contextlib.suppress(ArbitrationError):
            renewed = await a.renew([lease], 30)
            break
    assert renewed == [True]
    assert (await a.holders(["box"]))["box"] == lease


async def test_a_lease_lapses_by_itself(stores: Callable[[str], RedisStore]) -> None:
    a, b = stores("a"), stores("b")
    assert await a.acquire("box", 0.2, KEY) is not None
    lease = None
    async with asyncio.timeout(10):
        while lease is None:  # Redis expires it after 200 ms
            lease = await b.acquire("box", 3, KEY)
            await asyncio.sleep(0.05)
    assert lease.replica == "b"


async def test_heartbeats_count_live_replicas(stores: Callable[[str], RedisStore]) -> None:
    a, b = stores("a"), stores("b")
    assert await a.heartbeat(3) == 1
    assert await b.heartbeat(3) == 2
    assert await a.heartbeat(0) == 1  # a leaves
    assert await b.heartbeat(0.1) == 1
    await asyncio.sleep(0.2)  # b's heartbeat runs out (Redis's clock)
    assert await a.heartbeat(3) == 1


async def test_markers_and_the_shared_notice_limit(stores: Callable[[str], RedisStore]) -> None:
    a, b = stores("a"), stores("b")
    assert await b.delivered("msg_1") is None
    await a.record("msg_1", "delivered")
    assert await b.delivered("msg_1") == "delivered"
    assert await a.allow_notice("Bob@Example.com", "unknown", 60) is True
    assert await b.allow_notice("bob@example.com", "unknown", 60) is False  # any replica
    assert await b.allow_notice("bob@example.com", "too large", 60) is True


async def test_a_wrong_password_is_a_clear_misconfiguration(
    redis_factory: Callable[..., RedisServer],
) -> None:
    server = redis_factory(password="right-one")
    store = RedisStore(store_config(server, password="wrong-one"), replica="a")
    with pytest.raises(ArbitrationError) as error:
        await store.ping()
    await store.close()
    assert error.value.misconfigured
    assert "refused the password" in str(error.value) and "wrong-one" not in str(error.value)
    good = RedisStore(store_config(server, password="right-one"), replica="a")
    await good.ping()
    await good.close()


async def test_an_unreachable_redis_says_where() -> None:
    port = free_port()
    config = arbitration({"method": "redis", "url": f"redis://127.0.0.1:{port}/0"})
    store = RedisStore(config, replica="a")
    with pytest.raises(ArbitrationError) as error:
        await store.heartbeat(3)
    await store.close()
    assert f"redis://127.0.0.1:{port}/0" in str(error.value)
    assert not error.value.misconfigured


async def test_rediss_trusts_the_ca_file(
    redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = redis_factory(use_tls=True)
    trusted = RedisStore(store_config(server, ca_file=str(tls.ca_file())), replica="a")
    assert await trusted.heartbeat(3) == 1
    await trusted.close()
    untrusted = RedisStore(store_config(server), replica="b")
    with pytest.raises(ArbitrationError, match=r"certificate verify failed|CERTIFICATE"):
        await untrusted.heartbeat(3)
    await untrusted.close()


async def test_through_sentinel(redis_server: RedisServer) -> None:
    sentinel = Sentinel(redis_server)
    sentinel.start()
    try:
        config = arbitration(
            {
                "method": "redis",
                "sentinels": [{"host": "127.0.0.1", "port": sentinel.port}],
                "master_name": sentinel.name,
            }
        )
        store = RedisStore(config, replica="a")
        lease = await store.acquire("box", 3, KEY)
        await store.close()
    finally:
        sentinel.close()
    assert lease is not None and lease.fence == 1


# -- the coordinator: leases start and stop sources ---------------------------------------------


class Sources:
    """What the coordinator drives, recorded: which mailboxes run here, and when they stopped."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.stops: list[tuple[str, float, float]] = []  # mailbox, timeout, time.monotonic()
        self.aborts: list[str] = []
        self.changed = asyncio.Event()

    def start(self, configs: list[Any]) -> None:
        self.running.update(c.id for c in configs)
        self.changed.set()

    async def stop(self, mailbox: str, timeout_s: float) -> None:
        self.stops.append((mailbox, timeout_s, asyncio.get_running_loop().time()))
        self.running.discard(mailbox)
        self.changed.set()

    def abort(self, mailbox: str) -> None:
        self.aborts.append(mailbox)
        self.running.discard(mailbox)
        self.changed.set()


def shared_config(server: RedisServer, mailboxes: int, ttl: float = 1.5) -> Any:
    boxes = [{**BOX, "id": f"box{i}"} for i in range(mailboxes)]
    data = config_dict(boxes, "http://127.0.0.1:1/")
    data["arbitration"] = {"method": "redis", "url": server.url, "lease_ttl": ttl}
    return parse_config(data, env={})


async def until(check: Callable[[], bool], sources: list[Sources], what: str) -> None:
    async with asyncio.timeout(30):
        while not check():
            waiters = [asyncio.ensure_future(s.changed.wait()) for s in sources]
            for s in sources:
                s.changed.clear()
            _, pending = await asyncio.wait(waiters, timeout=0.5, return_when="FIRST_COMPLETED")
            for waiter in pending:
                waiter.cancel()
    assert check(), what


@pytest.mark.slow
async def test_two_replicas_share_the_mailboxes_evenly_and_exactly_once(
    redis_server: RedisServer,
) -> None:
    from mailroom.arbitration import Coordinator  # noqa: PLC0415

    config = shared_config(redis_server, 7, ttl=3)
    sides = [Sources(), Sources()]
    done = asyncio.Event()
    stores = [RedisStore(config.arbitration, replica=f"r{i}") for i in range(2)]
    first = Coordinator(config, stores[0], start=sides[0].start, stop=sides[0].stop,
                        abort=sides[0].abort)  # fmt: skip
    task = asyncio.create_task(first.run(done))
    await until(lambda: len(sides[0].running) == 7, sides, "the first takes all 7")
    second = Coordinator(config, stores[1], start=sides[1].start, stop=sides[1].stop,
                         abort=sides[1].abort)  # fmt: skip
    task2 = asyncio.create_task(second.run(done))

    def even() -> bool:
        a, b = sides[0].running, sides[1].running
        return {len(a), len(b)} == {3, 4} and not a & b and len(a | b) == 7

    await until(even, sides, "4 and 3, none twice")
    assert sides[0].aborts == [] and len(sides[0].stops) == 3  # handed over, not dropped
    done.set()
    for coordinator in (first, second):
        await coordinator.release_all()
    await asyncio.gather(task, task2)
    assert await stores[0].holders([f"box{i}" for i in range(7)]) == {
        f"box{i}": None for i in range(7)
    }
    for store in stores:
        await store.close()


@pytest.mark.slow
async def test_without_redis_sources_stop_before_their_leases_lapse_and_come_back(
    redis_server: RedisServer,
) -> None:
    from mailroom.arbitration import Coordinator  # noqa: PLC0415

    ttl = 1.5
    config = shared_config(redis_server, 3, ttl)
    side = Sources()
    done = asyncio.Event()
    store = RedisStore(config.arbitration, replica="r0")
    coordinator = Coordinator(config, store, start=side.start, stop=side.stop, abort=side.abort)
    task = asyncio.create_task(coordinator.run(done))
    await until(lambda: len(side.running) == 3, [side], "all 3 taken")
    renewed = max(h.valid_until for h in coordinator.held.values()) - ttl
    redis_server.stop()
    await until(lambda: not side.running, [side], "all stopped")
    assert coordinator.healthy is False
    # Every source was stopped gracefully before its lease could lapse (it lapses ttl after
    # the last renewal was sent), with the stop bounded to end before that.
    for _, timeout_s, at in side.stops:
        assert at + timeout_s < renewed + ttl
    assert side.aborts == [] or all(m in {"box0", "box1", "box2"} for m in side.aborts)
    redis_server.start()  # empty: the leases are free again
    await until(lambda: len(side.running) == 3, [side], "all 3 taken again")
    assert coordinator.healthy is True
    done.set()
    await coordinator.release_all()
    await task
    await store.close()


async def test_leases_taken_before_redis_failed_halfway_are_watched(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailroom.arbitration import Coordinator  # noqa: PLC0415

    config = shared_config(redis_server, 3, ttl=3)
    side = Sources()
    done = asyncio.Event()
    store = RedisStore(config.arbitration, replica="r0")
    acquire = store.acquire
    calls = 0

    async def fail_the_second(mailbox: str, ttl_s: float, key: str) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            monkeypatch.setattr(store, "acquire", acquire)
            raise ArbitrationError("Redis at test: connection lost")
        return await acquire(mailbox, ttl_s, key)

    monkeypatch.setattr(store, "acquire", fail_the_second)
    coordinator = Coordinator(config, store, start=side.start, stop=side.stop, abort=side.abort)
    task = asyncio.create_task(coordinator.run(done))
    await until(lambda: len(side.running) >= 1, [side], "the first lease's source started")
    # The lease taken before the failure has its source: none is held and left unwatched.
    assert calls == 2 and set(coordinator.held) == side.running
    await until(lambda: len(side.running) == 3, [side], "all 3 taken after all")
    assert set(coordinator.held) == side.running
    done.set()
    await coordinator.release_all()
    await task
    await store.close()


@pytest.mark.slow
async def test_a_hanging_redis_does_not_delay_the_stops_past_the_leases(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailroom.arbitration import Coordinator  # noqa: PLC0415

    ttl = 3.0  # renewed every second; stopped gracefully with less than a second left
    config = shared_config(redis_server, 3, ttl)
    side = Sources()
    done = asyncio.Event()
    store = RedisStore(config.arbitration, replica="r0")
    coordinator = Coordinator(config, store, start=side.start, stop=side.stop, abort=side.abort)
    task = asyncio.create_task(coordinator.run(done))
    await until(lambda: len(side.running) == 3, [side], "all 3 taken")
    lapse: dict[str, float] = {}
    renew = store.renew

    async def hang_from_this_renewal_on(leases: Any, ttl_s: float) -> list[bool]:
        lapse.update({m: h.valid_until for m, h in coordinator.held.items()})
        if min(lapse.values()) - time.monotonic() > 2:  # one just after taking them
            return await renew(leases, ttl_s)
        monkeypatch.setattr(store, "renew", renew)
        redis_server.pause()  # this call and every next one wait for the socket timeout
        return await renew(leases, ttl_s)

    monkeypatch.setattr(store, "renew", hang_from_this_renewal_on)
    try:
        await until(lambda: not side.running, [side], "all stopped")
    finally:
        redis_server.resume()
    assert sorted(lapse) == ["box0", "box1", "box2"]
    assert side.aborts == []  # each stopped gracefully, none dropped at (or after) the lapse
    for mailbox, timeout_s, at in side.stops:
        assert at + timeout_s < lapse[mailbox]
    done.set()
    await coordinator.release_all()
    await task
    await store.close()


@pytest.mark.slow
async def test_while_shutting_down_the_leases_held_are_renewed_until_released(
    redis_server: RedisServer,
) -> None:
    from mailroom.arbitration import Coordinator  # noqa: PLC0415

    ttl = 1.5
    ids = ["box0", "box1", "box2"]
    config = shared_config(redis_server, 3, ttl)
    side = Sources()
    done = asyncio.Event()
    store = RedisStore(config.arbitration, replica="r0")
    coordinator = Coordinator(config, store, start=side.start, stop=side.stop, abort=side.abort)
    task = asyncio.create_task(coordinator.run(done))
    await until(lambda: len(side.running) == 3, [side], "all 3 taken")
    done.set()  # the shutdown drains: longer than a lease lives
    await asyncio.sleep(2 * ttl)
    holders = await store.holders(ids)
    assert {m: lease.replica if lease else None for m, lease in holders.items()} == dict.fromkeys(
        ids, "r0"
    )
    assert side.running == set(ids) and side.stops == [] and side.aborts == []
    await coordinator.release_all()
    await task
    assert await store.holders(ids) == dict.fromkeys(ids)
    await store.close()


# -- the dispatcher and the markers ------------------------------------------------------------


async def test_a_message_another_replica_delivered_is_settled_without_posting_it_again(
    dovecot: Dovecot,
    account: Account,
    redis_server: RedisServer,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its owner died after the 2xx and its marker, before settling: the new owner settles it
    from the marker, neither posting it nor writing the marker again."""
    caplog.set_level(logging.INFO, logger="mailroom")
    raw = message(1)
    await dovecot.aappend(account, raw)
    data = config_dict([mailbox_dict(dovecot, account)], webhook.url)
    mailbox = parse_config(data, env={}).mailboxes[0]
    assert isinstance(mailbox, ImapMailboxConfig)
    marker = f"mailroom:delivered:{webhook_id(mailbox, raw)}"
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.set(marker, "delivered", ex=600)  # what the dead owner recorded
        data = config_dict([mailbox_dict(dovecot, account)], webhook.url)
        data["arbitration"] = {"method": "redis", "url": redis_server.url, "lease_ttl": 3}
        async with running(parse_config(data, env={})):
            await dovecot.aappend(account, message(2))
            received = await webhook.wait_for(1)
            await wait_until(
                lambda: len(logged(caplog, "another replica already brought it")) == 1,
                what="the marker's message settled",
            )
        assert [r.json()["subject"] for r in received] == ["test 2"]
        assert await client.ttl(marker) <= 600  # not recorded again (that sets 7 days)
    finally:
        await client.aclose()
    assert len(webhook.requests) == 1
    assert ["\\Seen" in m.flags for m in await dovecot.amessages(account)] == [True, True]
