"""Issue 18, item 7: two deployments sharing one Redis (the sample's mailbox id ``incoming`` and
the default namespace in both) neither lose each other's mail nor watch each other's mailbox.

The webhook-id and every Redis key derived from it name the mailbox on its server (host, port,
user, folder) and the message, not the configured id; a lease held for another mailbox under
the same id is refused: exit 2 at start, not ready after a reload.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from mailroom.config import parse_config
from mailroom.kinds import KINDS
from mailroom.runtime import supervisor
from tests.helpers import ROOT, Process, config_dict, mailbox_dict, wait_until
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.redis import RedisServer
from tests.servers.webhook import WebhookReceiver
from tests.test_replicas import Replica

pytestmark = pytest.mark.slow  # real processes and servers, seconds each

# The same bytes in both tenants' mailboxes: only the mailbox tells them apart.
SAME = [
    (
        f"From: a@example.org\r\nTo: incoming+key{n}@example.com\r\nSubject: shared {n}\r\n"
        f"Message-ID: <shared{n}@example.org>\r\n\r\nThe same bytes.\r\n"
    ).encode()
    for n in range(3)
]


def tenant(dovecot: Dovecot, account: Account, redis: RedisServer, url: str) -> dict[str, Any]:
    """A deployment of the sample's shape: mailbox id ``incoming``, the default namespace."""
    config = config_dict([mailbox_dict(dovecot, account, id="incoming")], url)
    config["arbitration"] = {"method": "redis", "url": redis.url, "lease_ttl": 3}
    return config


async def test_one_after_the_other_each_tenant_gets_its_own_mail(
    dovecot: Dovecot, redis_server: RedisServer, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    """The first tenant's delivered markers do not settle the second's mail unposted (before,
    all of it was marked ``\\Deleted \\Seen`` as "another replica already brought it")."""
    a, b = dovecot.add_user(), dovecot.add_user()
    for account in (a, b):
        await dovecot.aappend_many(account, SAME)
    for n, account in enumerate((a, b), start=1):
        (tmp_path / str(n)).mkdir()
        process = Process(tenant(dovecot, account, redis_server, webhook.url), tmp_path / str(n))
        process.start()
        try:
            await webhook.wait_for(3 * n, timeout=30)
        finally:
            process.signal(signal.SIGTERM)
            assert await process.wait() == 0
    ids = [r.headers["webhook-id"] for r in webhook.requests]
    assert len(ids) == len(set(ids)) == 6  # the same bytes, two mailboxes: six messages
    assert all(m.flags == {"\\Seen"} for account in (a, b) for m in dovecot.messages(account))


async def test_the_second_tenant_refuses_to_start_while_the_first_holds_the_id(
    dovecot: Dovecot,
    redis_server: RedisServer,
    webhook: WebhookReceiver,
    tmp_path: Path,
) -> None:
    a, b = dovecot.add_user(), dovecot.add_user()
    first = Replica(tenant(dovecot, a, redis_server, webhook.url), tmp_path / "a")
    first.start()
    try:
        # Ready is not enough: a replica is ready before it takes its first lease.
        await wait_until(lambda: _holds_its_lease(first), timeout=30, what="the first's lease")
        (tmp_path / "b").mkdir()
        second = Process(tenant(dovecot, b, redis_server, webhook.url), tmp_path / "b")
        second.start()
        assert await second.wait() == 2
        output = second.output()
        assert "arbitration.namespace: mailboxes[incoming]: its lease in the Redis namespace " in (
            output
        )
        assert "two deployments share the namespace" in output
        check = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailroom", "check", "-c", str(second.path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, _ = await check.communicate()
        lines = [line for line in out.decode().splitlines() if "another mailbox" in line]
        assert check.returncode == 1 and lines and "FAIL" in lines[0]
        await dovecot.aappend(a, SAME[0])
        await webhook.wait_for(1)
        assert await first.ready() == 200  # the first one never noticed
    finally:
        first.kill()


async def test_a_reload_onto_another_tenants_id_is_not_ready_and_says_why(
    dovecot: Dovecot, redis_server: RedisServer, webhook: WebhookReceiver
) -> None:
    """In process, tenant B reloads to a mailbox id tenant A holds: B's /readyz says why,
    and B never watches A's id (nor takes the lease)."""
    a, b = dovecot.add_user(), dovecot.add_user()
    holder = parse_config(tenant(dovecot, a, redis_server, webhook.url), env={})
    port = free_port()
    before = tenant(dovecot, b, redis_server, webhook.url)
    before["mailboxes"][0]["id"] = "other"
    before["health"] = {"listen": f"127.0.0.1:{port}"}
    after = {**before, "mailboxes": [{**before["mailboxes"][0], "id": "incoming"}]}
    stops = [asyncio.Event(), asyncio.Event()]
    reload = asyncio.Event()
    tasks = [
        asyncio.create_task(supervisor.run(holder, stops[0], kinds=KINDS)),
        asyncio.create_task(
            supervisor.run(
                parse_config(before, env={}),
                stops[1],
                kinds=KINDS,
                load=lambda: parse_config(after, env={}),
                reload=reload,
            )
        ),
    ]
    try:
        async with aiohttp.ClientSession() as http:

            async def readyz() -> tuple[int, Any]:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    return response.status, await response.json()

            await wait_until(lambda: _status(readyz, 200), timeout=30, what="B ready")
            await wait_until(lambda: _leased(redis_server), timeout=30, what="A's lease")
            reload.set()
            await wait_until(lambda: _conflict(readyz), timeout=30, what="B not ready")
            status, body = await readyz()
        assert status == 503
        conflicts = body["arbitration"]["conflicts"]
        assert list(conflicts) == ["incoming"]
        assert "held by replica" in conflicts["incoming"]
        assert "give each its own arbitration.namespace" in conflicts["incoming"]
        await dovecot.aappend(b, SAME[1])
        await dovecot.aappend(a, SAME[2])
        await webhook.wait_for(1)
        assert [r.json()["subject"] for r in webhook.requests] == ["shared 2"]  # A's, not B's
    finally:
        for stop in stops:
            stop.set()
        assert await asyncio.gather(*tasks) == [0, 0]


async def _leased(redis: RedisServer) -> bool:
    """Both tenants hold their leases: A ``incoming``, B ``other``."""
    client = aioredis.Redis.from_url(redis.url)
    try:
        return await client.exists("mailroom:lease:incoming", "mailroom:lease:other") == 2
    finally:
        await client.aclose()


async def _holds_its_lease(replica: Replica) -> bool:
    return await replica.ready() == 200 and await replica.metric("mailroom_leases_held") == 1


async def _conflict(readyz: Any) -> bool:
    status, body = await readyz()
    return bool(status == 503 and body.get("arbitration", {}).get("conflicts"))


async def _status(readyz: Any, expected: int) -> bool:
    try:
        status, _ = await readyz()
    except aiohttp.ClientError:
        return False
    return bool(status == expected)
