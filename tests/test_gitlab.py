"""GitLab mode end to end: a real Dovecot, GitLab's internal API stand-in, mailroom started from
gitlab.yml the way GitLab's MailRoom would be."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mailroom import cli
from mailroom.gitlab import load_gitlab
from tests.helpers import message, running, wait_until
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.gitlab import GitLabInternalApi
from tests.servers.proxy import HttpProxy
from tests.servers.redis import RedisServer
from tests.servers.webhook import WebhookReceiver

SECRET = bytes(range(32))
GITLAB_HOST = "gitlab.example.com"


@pytest.fixture(autouse=True)
def queues_redis(redis_server: RedisServer) -> RedisServer:
    """GitLab's queues Redis: GitLab mode shares the mailboxes through it, as MailRoom does."""
    return redis_server


def gitlab_files(
    tmp_path: Path,
    dovecot: Dovecot,
    gitlab_url: str,
    accounts: dict[str, Account],
    *,
    redis: RedisServer,
    **overlay: Any,
) -> tuple[Path, Path]:
    """A Rails root with config/gitlab.yml, config/redis.queues.yml and the secret files, and
    a small mailroom YAML (what gitlab.yml cannot say: the test CA, short retries and
    shutdown)."""
    root = tmp_path / "gitlab"
    (root / "config").mkdir(parents=True)
    queues = {"production": {"url": f"redis://127.0.0.1:{redis.port}"}}
    (root / "config" / "redis.queues.yml").write_text(yaml.safe_dump(queues))
    production: dict[str, Any] = {"gitlab": {"host": GITLAB_HOST}}
    for kind, account in accounts.items():
        (root / f".gitlab_{kind}_secret").write_text(base64.b64encode(SECRET).decode() + "\n")
        production[kind] = {
            "enabled": True,
            "address": f"{kind}+%{{key}}@example.com",
            "user": account.user,
            "password": account.password,
            "host": dovecot.host,
            "port": dovecot.tls_port,
            "ssl": True,
            "delivery_method": "webhook",
            "gitlab_url": gitlab_url,
            "secret_file": f".gitlab_{kind}_secret",
        }
    gitlab_yml = root / "config" / "gitlab.yml"
    gitlab_yml.write_text(yaml.safe_dump({"production": production}))
    small = {
        "shutdown_timeout": 5,
        "webhook": {"retry": {"initial": 0.05, "max": 0.2}, "timeout": 5},
        "mailboxes": {kind: {"ca_file": str(dovecot.ca_file)} for kind in accounts},
        **overlay,
    }
    mailroom_yml = tmp_path / "mailroom.yml"
    mailroom_yml.write_text(yaml.safe_dump(small))
    return gitlab_yml, mailroom_yml


async def deleted(dovecot: Dovecot, account: Account) -> bool:
    """Every message flagged \\Deleted: GitLab's delete_after_delivery without expunge_deleted."""
    stored = await dovecot.amessages(account)
    return bool(stored) and all("\\Deleted" in m.flags for m in stored)


async def test_both_mailbox_types_are_delivered_byte_exact(
    queues_redis: RedisServer, dovecot: Dovecot, tmp_path: Path
) -> None:
    incoming, desk = dovecot.add_user(), dovecot.add_user()
    to_key = message(1, to="incoming_email+abc123@example.com")
    custom = message(2, to="support@custom.example.org")  # a Service Desk custom address
    auto = message(3).replace(b"Subject:", b"Auto-Submitted: auto-replied\r\nSubject:", 1)
    await dovecot.aappend(incoming, to_key)
    await dovecot.aappend(desk, custom)
    await dovecot.aappend(desk, auto)
    async with GitLabInternalApi({"incoming_email": SECRET, "service_desk_email": SECRET}) as api:
        files = gitlab_files(
            tmp_path,
            dovecot,
            api.url,
            {"incoming_email": incoming, "service_desk_email": desk},
            redis=queues_redis,
        )
        config = load_gitlab(files[0], mailroom_config=files[1], env={})
        async with running(config):
            await api.wait_for(3)
            await wait_until(lambda: deleted(dovecot, incoming), what="incoming deleted")
            await wait_until(lambda: deleted(dovecot, desk), what="service desk deleted")
    assert [r.status for r in api.requests] == [200, 200, 200]
    bodies = {(r.mailbox_type, r.body) for r in api.delivered}
    assert bodies == {
        ("incoming_email", to_key),
        ("service_desk_email", custom),
        ("service_desk_email", auto),  # GitLab decides about auto-replies, as behind MailRoom
    }
    assert {r.headers["Content-Type"] for r in api.delivered} == {"text/plain"}


async def test_a_reply_is_routed_by_its_reply_id(
    queues_redis: RedisServer, dovecot: Dovecot, tmp_path: Path
) -> None:
    account = dovecot.add_user()
    reply = message(1, to="someone@example.org").replace(
        b"Subject:", f"References: <reply-5f3e9a@{GITLAB_HOST}>\r\nSubject:".encode(), 1
    )
    await dovecot.aappend(account, reply)
    async with GitLabInternalApi({"incoming_email": SECRET}) as api:
        files = gitlab_files(
            tmp_path, dovecot, api.url, {"incoming_email": account}, redis=queues_redis
        )
        async with running(load_gitlab(files[0], mailroom_config=files[1], env={})):
            await api.wait_for(1)
    (request,) = api.delivered
    assert request.body == reply
    assert request.headers["X-Mailroom-Key"] == "5f3e9a"


@pytest.mark.slow
async def test_401_keeps_the_message_says_which_secret_file_and_is_not_ready(
    queues_redis: RedisServer, dovecot: Dovecot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    account = dovecot.add_user()
    await dovecot.aappend(account, message(1))
    port = free_port()
    health = {"health": {"listen": f"127.0.0.1:{port}", "stall_after": 1}, "shutdown_timeout": 0.5}
    async with (
        GitLabInternalApi({"incoming_email": bytes(range(1, 33))}) as api,
        aiohttp.ClientSession() as http,
    ):
        files = gitlab_files(
            tmp_path, dovecot, api.url, {"incoming_email": account}, **health, redis=queues_redis
        )
        async with running(load_gitlab(files[0], mailroom_config=files[1], env={})):
            await api.wait_for(2, status=401)

            async def not_ready() -> bool:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    return response.status == 503

            await wait_until(not_ready, what="/readyz 503")
            stored = await dovecot.amessages(account)
            assert len(stored) == 1 and "\\Seen" not in stored[0].flags
    secret_file = tmp_path / "gitlab" / ".gitlab_incoming_email_secret"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("HTTP 401" in line and str(secret_file) in line for line in lines), lines
    assert api.delivered == []


async def test_400_is_dead_lettered_with_gitlabs_message(
    queues_redis: RedisServer, dovecot: Dovecot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    account = dovecot.add_user()
    await dovecot.aappend(account, message(1))
    async with GitLabInternalApi({"incoming_email": SECRET}) as api:
        api.refuse_next("This email is too large (30 MB), the limit is 25 MB")
        files = gitlab_files(
            tmp_path, dovecot, api.url, {"incoming_email": account}, redis=queues_redis
        )
        async with running(load_gitlab(files[0], mailroom_config=files[1], env={})):
            await api.wait_for(1, status=400)

            async def dead_lettered() -> bool:
                stored = await dovecot.amessages(account)
                return [set(m.flags) for m in stored] == [{"$MailroomFailed", "\\Seen"}]

            await wait_until(dead_lettered, what="$MailroomFailed")
    assert [r.status for r in api.requests] == [400]  # posted once, never again
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("HTTP 400: This email is too large (30 MB)" in line for line in lines), lines


@pytest.mark.slow
async def test_nothing_is_lost_across_a_restart(
    queues_redis: RedisServer, dovecot: Dovecot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    account = dovecot.add_user()
    raw = message(1)
    await dovecot.aappend(account, raw)
    api = GitLabInternalApi({"incoming_email": SECRET})
    await api.start()
    try:
        files = gitlab_files(
            tmp_path,
            dovecot,
            api.url,
            {"incoming_email": account},
            shutdown_timeout=0.5,
            redis=queues_redis,
        )
        await api.stop()  # GitLab is down: connection refused, retried
        config = load_gitlab(files[0], mailroom_config=files[1], env={})
        async with running(config):

            async def refused_twice() -> bool:
                return any("webhook attempt 2 failed" in r.getMessage() for r in caplog.records)

            await wait_until(refused_twice, what="two refused attempts")
        stored = await dovecot.amessages(account)
        assert len(stored) == 1 and "\\Seen" not in stored[0].flags
        await api.start()  # same port
        async with running(load_gitlab(files[0], mailroom_config=files[1], env={})):
            await api.wait_for(1)
            await wait_until(lambda: deleted(dovecot, account), what="deleted")
    finally:
        await api.stop()
    assert [r.body for r in api.delivered] == [raw]


async def test_check_probes_gitlab_without_posting_a_message(
    queues_redis: RedisServer, dovecot: Dovecot, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    account = dovecot.add_user()
    async with GitLabInternalApi({"incoming_email": SECRET}) as api:
        gitlab_yml, small = gitlab_files(
            tmp_path, dovecot, api.url, {"incoming_email": account}, redis=queues_redis
        )
        argv = ["check", "--gitlab-config", str(gitlab_yml), "-c", str(small)]
        assert await asyncio.to_thread(cli.main, argv) == 0
    out = capsys.readouterr().out
    assert "OK   gitlab[incoming_email] secret: " in out
    assert "base64 of 32 bytes" in out
    assert "OK   gitlab[incoming_email] internal API: " in out and "answers 401" in out
    assert "OK   imap[incoming_email] login" in out
    assert [r.status for r in api.requests] == [401] and api.requests[0].body == b""


async def test_check_probes_gitlab_through_the_webhooks_proxy(
    queues_redis: RedisServer, dovecot: Dovecot, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    account = dovecot.add_user()
    async with GitLabInternalApi({"incoming_email": SECRET}) as api, HttpProxy() as proxy:
        gitlab_yml, small = gitlab_files(
            tmp_path,
            dovecot,
            api.url,
            {"incoming_email": account},
            redis=queues_redis,
            webhook={"proxy": proxy.url},
        )
        argv = ["check", "--gitlab-config", str(gitlab_yml), "-c", str(small)]
        assert await asyncio.to_thread(cli.main, argv) == 0
    assert "OK   gitlab[incoming_email] internal API: " in capsys.readouterr().out
    assert [r.status for r in api.requests] == [401]
    assert proxy.targets() == [api.url.removeprefix("http://").partition("/")[0]]


async def test_check_fails_where_gitlab_is_not(
    queues_redis: RedisServer,
    dovecot: Dovecot,
    tmp_path: Path,
    webhook: WebhookReceiver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    account = dovecot.add_user()
    gitlab_yml, small = gitlab_files(
        tmp_path,
        dovecot,
        webhook.url.rstrip("/"),
        {"incoming_email": account},
        redis=queues_redis,
    )
    (tmp_path / "gitlab" / ".gitlab_incoming_email_secret").write_text("c2hvcnQ=\n")
    argv = ["check", "--gitlab-config", str(gitlab_yml), "-c", str(small)]
    assert await asyncio.to_thread(cli.main, argv) == 1
    out = capsys.readouterr().out
    assert "FAIL gitlab[incoming_email] secret: " in out and "decodes to 5 bytes" in out
    assert "SKIP gitlab[incoming_email] internal API: skipped: secret failed" in out
