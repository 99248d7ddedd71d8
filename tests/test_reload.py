"""SIGHUP reload: in-process through the reload entry point, and against a real process."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import re
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from mailroom.config import Config, load_config, parse_config
from mailroom.delivery.dispatch import Dispatcher
from mailroom.envelope import Envelope, Outcome
from mailroom.kinds import KINDS
from mailroom.runtime import supervisor
from tests.helpers import Process, config_dict, mailbox_dict, message, wait_until
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.redis import RedisServer
from tests.servers.webhook import WebhookReceiver


class Reloadable:
    """mailroom in this event loop, whose config a test replaces and reloads."""

    def __init__(self, data: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
        self.data = data
        self.caplog = caplog
        self.stop = asyncio.Event()
        self.reload_requested = asyncio.Event()

    def load(self) -> Any:
        return parse_config(copy.deepcopy(self.data), env={})

    def count(self, text: str) -> int:
        return sum(text in record.getMessage() for record in self.caplog.records)

    def request(self, data: dict[str, Any]) -> None:
        """Replace the config and ask for a reload (what SIGHUP does)."""
        self.data = data
        self.reload_requested.set()

    async def logged(self, expect: str, count: int) -> str:
        """Wait for the ``count``-th log line containing ``expect``; return it."""

        async def done() -> bool:
            return self.count(expect) >= count

        await wait_until(done, timeout=30, what=f"{expect!r} logged")
        return [r.getMessage() for r in self.caplog.records if expect in r.getMessage()][-1]


@contextlib.asynccontextmanager
async def reloadable(
    data: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Reloadable]:
    caplog.set_level(logging.INFO, logger="mailroom")
    mailroom = Reloadable(data, caplog)
    task = asyncio.create_task(
        supervisor.run(
            mailroom.load(),
            mailroom.stop,
            kinds=KINDS,
            load=mailroom.load,
            reload=mailroom.reload_requested,
        )
    )
    try:
        yield mailroom
    finally:
        mailroom.stop.set()
        async with asyncio.timeout(30):
            assert await task == 0


def logins(dovecot: Dovecot, account: Account) -> list[str]:
    """Dovecot's view: the session ids of the user's TLS logins (mailroom's; the test's own
    imaplib connections use the plain port)."""
    pattern = re.compile(rf"Login: user=<{re.escape(account.user)}>.* TLS.*session=<([^>]+)>")
    return pattern.findall(dovecot.log_file.read_text(errors="replace"))


def logged_out(dovecot: Dovecot, account: Account, session: str) -> bool:
    text = dovecot.log_file.read_text(errors="replace")
    return (
        f"imap({account.user})" in text
        and re.search(rf"<{re.escape(session)}>: Info: Disconnected: Logged out", text) is not None
    )


async def logged_in(dovecot: Dovecot, account: Account, count: int) -> bool:
    return len(logins(dovecot, account)) == count


async def seen(dovecot: Dovecot, account: Account) -> list[bool]:
    return ["\\Seen" in m.flags for m in await dovecot.amessages(account)]


@pytest.mark.slow
async def test_reload_keeps_untouched_restarts_changed_starts_new_stops_removed(
    dovecot_factory: Any, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    server: Dovecot = dovecot_factory()
    kept, changed, removed, added = (server.add_user() for _ in range(4))
    boxes = {a.user: mailbox_dict(server, a) for a in (kept, changed, removed)}
    data = config_dict(list(boxes.values()), webhook.url)
    async with reloadable(data, caplog) as mailroom, WebhookReceiver() as second:
        for account in (kept, changed, removed):
            await wait_until(lambda: logged_in(server, account, 1), what="3 logins")  # noqa: B023
        # A delivery of the removed mailbox is in flight at the reload: it must finish and
        # settle before that mailbox logs out.
        webhook.stall()
        await server.aappend(removed, message(1))
        await webhook.wait_for(1)

        new = copy.deepcopy(data)
        new["mailboxes"] = [
            boxes[kept.user],
            {**boxes[changed.user], "idle_timeout": 30},
            mailbox_dict(server, added),
        ]
        new["webhook"]["url"] = second.url  # a dispatch-only change: no reconnect for it
        mailroom.request(new)
        await wait_until(
            lambda: mailroom.count(f"{removed.user}: connected → stopping") == 1,
            what="the removed mailbox stopping",
        )
        assert await seen(server, removed) == [False]
        assert logins(server, removed) and not logged_out(
            server, removed, logins(server, removed)[0]
        )
        webhook.release()
        line = await mailroom.logged("config reloaded", 1)
        assert line == (
            "config reloaded: 1 mailbox(es) started, 1 restarted, 1 stopped, 1 unchanged"
        )
        assert await seen(server, removed) == [True]  # settled, then LOGOUT
        assert logged_out(server, removed, logins(server, removed)[0])

        await wait_until(lambda: logged_in(server, added, 1), what="added login")
        await wait_until(lambda: logged_in(server, changed, 2), what="changed relogin")
        assert len(logins(server, kept)) == 1  # the same connection all along
        for n, account in enumerate((kept, changed, added, removed), start=2):
            await server.aappend(account, message(n))
        received = await second.wait_for(3)
        assert sorted(r.headers["X-Mailroom-Mailbox"] for r in received) == sorted(
            [kept.user, changed.user, added.user]
        )
        assert len(webhook.requests) == 1  # the old webhook got nothing new
    assert len(second.requests) == 3  # the removed mailbox's new message was not fetched
    assert await seen(server, removed) == [True, False]
    assert len(logins(server, kept)) == 1


async def test_a_stop_during_a_reload_still_closes_the_mailbox_the_reload_was_stopping(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    data = config_dict([mailbox_dict(dovecot, account)], webhook.url)
    async with reloadable(data, caplog) as mailroom:
        await wait_until(lambda: logged_in(dovecot, account, 1), what="login")
        webhook.stall()  # the reload's drain of the changed mailbox waits for this delivery
        await dovecot.aappend(account, message(1))
        await webhook.wait_for(1)
        new = copy.deepcopy(data)
        new["mailboxes"] = [mailbox_dict(dovecot, account, idle_timeout=30)]
        mailroom.request(new)
        await mailroom.logged(f"{account.user}: connected → stopping", 1)
        mailroom.stop.set()
        await mailroom.logged("reload interrupted by the stop", 1)
        webhook.release()
    # run() returned: the shutdown drained the delivery, settled it and logged the mailbox out
    # (the reload's stop, cancelled halfway, no longer leaves its source waiting forever).
    assert await seen(dovecot, account) == [True]
    assert len(webhook.requests) == 1
    assert logged_out(dovecot, account, logins(dovecot, account)[0])


@pytest.mark.slow
async def test_with_replicas_a_reload_stops_a_removed_mailbox_before_it_is_done(
    dovecot: Dovecot,
    redis_server: RedisServer,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kept, removed = dovecot.add_user(), dovecot.add_user()
    data = config_dict([mailbox_dict(dovecot, a) for a in (kept, removed)], webhook.url)
    data["arbitration"] = {"method": "redis", "url": redis_server.url, "lease_ttl": 3}
    async with reloadable(data, caplog) as mailroom:
        for account in (kept, removed):
            await wait_until(lambda: logged_in(dovecot, account, 1), what="2 logins")  # noqa: B023
        new = copy.deepcopy(data)
        new["mailboxes"] = [mailbox_dict(dovecot, kept)]
        mailroom.request(new)
        line = await mailroom.logged("config reloaded", 1)
        assert line == (
            "config reloaded: 0 mailbox(es) started, 0 restarted, 1 stopped, 1 unchanged"
        )
        # Stopped by the reload itself, not later by the lease's handover: meanwhile the
        # dispatcher, on the new config, would have been handed mail it knows nothing of.
        assert logged_out(dovecot, removed, logins(dovecot, removed)[0])
        for n, account in enumerate((removed, kept), start=1):
            await dovecot.aappend(account, message(n))
        received = await webhook.wait_for(1)
        assert [r.headers["X-Mailroom-Mailbox"] for r in received] == [kept.user]
    assert len(webhook.requests) == 1
    assert await seen(dovecot, removed) == [False]
    assert len(logins(dovecot, removed)) == 1


@pytest.mark.slow
async def test_with_replicas_a_lease_lost_while_a_reload_restarts_its_mailbox_stays_lost(
    dovecot: Dovecot,
    account: Account,
    redis_server: RedisServer,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = config_dict([mailbox_dict(dovecot, account)], webhook.url)
    data["arbitration"] = {"method": "redis", "url": redis_server.url, "lease_ttl": 3}
    key = f"mailroom:lease:{account.user}"
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        async with reloadable(data, caplog) as mailroom:
            await wait_until(lambda: logged_in(dovecot, account, 1), what="login")
            webhook.stall()  # the reload's stop of the changed mailbox waits for this delivery
            await dovecot.aappend(account, message(1))
            await webhook.wait_for(1)
            new = copy.deepcopy(data)
            new["mailboxes"] = [mailbox_dict(dovecot, account, idle_timeout=30)]
            mailroom.request(new)
            await mailroom.logged(f"{account.user}: connected → stopping", 1)
            # Meanwhile another replica holds the lease (as after a partition).
            await client.set(key, "other-replica 999", px=60_000)
            await mailroom.logged("the lease is no longer ours", 1)
            webhook.release()
            line = await mailroom.logged("config reloaded", 1)
            assert line == (
                "config reloaded: 0 mailbox(es) started, 0 restarted, 0 stopped, 0 unchanged"
            )
            assert mailroom.count(f"{account.user}: not restarted: its lease was given up") == 1
            # The other replica leaves; this one takes the lease again and starts one source.
            await client.delete(key)
            await mailroom.logged(f"{account.user}: lease taken", 2)
            await wait_until(lambda: len(logins(dovecot, account)) >= 2, what="second login")
            await dovecot.aappend(account, message(2))
            received = await webhook.wait_for(2)
            assert [r.headers["X-Mailroom-Mailbox"] for r in received] == [account.user] * 2
            # Not restarted by the reload without its lease: the second login is the lease's.
            assert len(logins(dovecot, account)) == 2
    finally:
        await client.aclose()
    assert await seen(dovecot, account) == [True, True]


async def test_an_invalid_config_is_refused_and_the_old_one_keeps_running(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    data = config_dict([mailbox_dict(dovecot, account)], webhook.url)
    async with reloadable(data, caplog) as mailroom:
        await wait_until(lambda: logged_in(dovecot, account, 1), what="login")
        bad = copy.deepcopy(data)
        bad["mailboxes"][0]["port"] = "imap"
        mailroom.request(bad)
        line = await mailroom.logged("reload refused", 1)
        assert line == (
            "reload refused, the running config stays: config error: "
            "mailboxes[0].port: expected a whole number, got 'imap'"
        )
        await dovecot.aappend(account, message(1))
        (request,) = await webhook.wait_for(1)
        assert request.json()["subject"] == "test 1"
        assert len(logins(dovecot, account)) == 1


# -- a real process ------------------------------------------------------------------------------


@pytest.fixture
def process(tmp_path: Path) -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for each in started:
        each.kill()


@pytest.mark.slow
async def test_sighup_reloads_a_real_process_and_refuses_a_broken_file(
    dovecot: Dovecot, webhook: WebhookReceiver, process: list[Process], tmp_path: Path
) -> None:
    first, second = dovecot.add_user(), dovecot.add_user()
    port = free_port()
    data = config_dict([mailbox_dict(dovecot, first)], webhook.url)
    data["health"] = {"listen": f"127.0.0.1:{port}"}
    mailroom = Process(data, tmp_path)
    process.append(mailroom)
    mailroom.start()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

        async def ready_with(*users: str) -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    body = await response.json()
            except aiohttp.ClientConnectionError:
                return False
            return response.status == 200 and sorted(body["mailboxes"]) == sorted(users)

        await wait_until(lambda: ready_with(first.user), timeout=20, what="ready")
        data["mailboxes"].append(mailbox_dict(dovecot, second))
        mailroom.path.write_text(yaml.safe_dump(data))
        mailroom.signal(signal.SIGHUP)
        await wait_until(lambda: ready_with(first.user, second.user), what="both ready")
        assert "config reloaded: 1 mailbox(es) started, 0 restarted, 0 stopped, 1 unchanged" in (
            mailroom.output()
        )

        mailroom.path.write_text("mailboxes: [\n")  # broken YAML
        mailroom.signal(signal.SIGHUP)
        await wait_until(lambda: "reload refused" in mailroom.output(), what="the refusal logged")
        assert "fix the YAML syntax" in mailroom.output()
        await dovecot.aappend(second, message(1))
        (request,) = await webhook.wait_for(1)
        assert request.headers["X-Mailroom-Mailbox"] == second.user
        assert await ready_with(first.user, second.user)
    assert len(logins(dovecot, first)) == 1
    mailroom.signal(signal.SIGTERM)
    assert await mailroom.wait() == 0


async def test_reload_watch_follows_a_kubernetes_configmap_swap(
    dovecot: Dovecot, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A ConfigMap volume: mailroom.yml → ..data/mailroom.yml, and the kubelet swaps ..data
    to a new directory atomically. Nobody sends SIGHUP; reload.watch notices."""
    caplog.set_level(logging.INFO, logger="mailroom")
    first, second = dovecot.add_user(), dovecot.add_user()

    def version(name: str, accounts: list[Account]) -> None:
        data = config_dict([mailbox_dict(dovecot, a) for a in accounts], webhook.url)
        data["reload"] = {"watch": True, "interval": 0.1}
        (tmp_path / name).mkdir()
        (tmp_path / name / "mailroom.yml").write_text(yaml.safe_dump(data))
        link = tmp_path / "..data_tmp"
        link.symlink_to(name)
        link.replace(tmp_path / "..data")  # atomic, like the kubelet's rename

    version("..v1", [first])
    config_file = tmp_path / "mailroom.yml"
    config_file.symlink_to("..data/mailroom.yml")

    def load() -> Config:
        return load_config(config_file)

    stop = asyncio.Event()
    task = asyncio.create_task(
        supervisor.run(load(), stop, kinds=KINDS, load=load, watch=[config_file])
    )
    try:
        await wait_until(lambda: _logged(caplog, "connected to"), what="the first mailbox")
        version("..v2", [first, second])
        await wait_until(lambda: _logged(caplog, "config reloaded"), what="the reload")
        await dovecot.aappend(second, message(1))
        await webhook.wait_for(1)
    finally:
        stop.set()
        async with asyncio.timeout(30):
            assert await task == 0
    assert sum("reloading (reload.watch)" in r.getMessage() for r in caplog.records) == 1
    assert webhook.requests[0].headers["X-Mailroom-Mailbox"] == second.user


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


async def test_a_reload_that_fixes_the_webhook_url_takes_the_messages_waiting_to_retry() -> None:
    """The newcomer's mistake: a wrong webhook.url (404, "retrying until fixed"), fixed by a
    reload. Messages waiting for their next attempt, or for the open circuit, go to the new
    URL at once, under the same webhook-id, not to the old one until a restart; those of a
    mailbox the reload removed are left for the next run."""
    box = {
        "id": "incoming",
        "address": "incoming+%{key}@example.com",
        "host": "127.0.0.1",
        "user": "incoming",
        "password": "secret",
    }
    async with WebhookReceiver() as wrong, WebhookReceiver() as right:
        wrong.respond(404)
        gone = {**box, "id": "gone", "user": "gone", "webhook": {"url": f"{wrong.url}gone"}}
        data = config_dict([box, gone], wrong.url)
        data["webhook"]["retry"] = {"initial": 600, "max": 600}  # no retry comes by itself
        settled: dict[str, asyncio.Future[Outcome]] = {}
        released: list[bool] = []

        def envelope(mailbox: str, n: int) -> Envelope:
            done = settled[f"msg_{n:032x}"] = asyncio.get_running_loop().create_future()

            async def settle(outcome: Outcome, why: str) -> None:
                done.set_result(outcome)

            raw = message(n)
            return Envelope(
                mailbox=mailbox,
                ref=f"uid {n}",
                idempotency_key=f"msg_{n:032x}",
                raw=raw,
                size=len(raw),
                _settle=settle,
                _release=released.append,
            )

        async with Dispatcher(parse_config(copy.deepcopy(data), env={})) as dispatcher:
            # Five failures in a row open the circuit: the first messages wait out their retry
            # delay (600 s), the others the circuit's next probe.
            for n in range(1, 7):
                dispatcher.submit(envelope("incoming", n))
            dispatcher.submit(envelope("gone", 7))
            await wrong.wait_for(7)
            fixed = copy.deepcopy(data)
            fixed["webhook"]["url"] = right.url
            fixed["mailboxes"] = [box]
            dispatcher.apply(dispatcher.prepare(parse_config(fixed, env={})))
            async with asyncio.timeout(30):
                outcomes = await asyncio.gather(*list(settled.values())[:6])
            assert await dispatcher.drain(30) == 0
        assert outcomes == [Outcome.DELIVERED] * 6
        assert sorted(right.delivered()) == sorted(settled)[:6]  # each once, under its own id
        assert len(wrong.requests) == 7
        assert released == [False] and not settled[f"msg_{7:032x}"].done()
