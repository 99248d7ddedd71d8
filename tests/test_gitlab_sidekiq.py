"""GitLab's ``delivery_method: sidekiq`` (its default, deprecated since 16.0): the job MailRoom
pushes, into GitLab's queues Redis, settled only after the LPUSH."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from mailroom import cli
from mailroom.config import ArbitrationConfig, SidekiqConfig
from mailroom.delivery.sidekiq import job, utf8_text
from mailroom.gitlab import load_gitlab
from tests.helpers import message, running, wait_until
from tests.servers.dovecot import Dovecot
from tests.servers.redis import RedisServer

CONFIG = SidekiqConfig(
    redis=ArbitrationConfig(method="redis", url="redis://127.0.0.1:6379"),
    worker="EmailReceiverWorker",
)


def test_the_job_is_the_one_mailroom_gem_pushes() -> None:
    raw = message(1).replace(b"Message number", "Nachricht Nummer über".encode())
    text = job(CONFIG, raw, now=1715000000.25)
    item = json.loads(text)
    assert list(item) == ["class", "args", "queue", "jid", "retry", "enqueued_at"]
    assert item["class"] == "EmailReceiverWorker" and item["queue"] == "default"
    assert item["args"] == [raw.decode()] and item["retry"] is False
    assert re.fullmatch(r"[0-9a-f]{24}", item["jid"]) and item["enqueued_at"] == 1715000000.25
    assert "über" in text and '"],"queue":"default","jid":' in text  # as Ruby's JSON.generate
    assert CONFIG.key == "queue:default"
    assert SidekiqConfig(redis=CONFIG.redis, worker="W", namespace="resque:gitlab").key == (
        "resque:gitlab:queue:default"
    )


def test_mail_that_is_not_utf8_becomes_utf8_text() -> None:
    latin1 = "Grüße aus Köln, äöü ÄÖÜ ß, à bientôt, señor.\r\n" * 4
    raw = b"Subject: x\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\n" + latin1.encode(
        "latin-1"
    )
    assert utf8_text(raw).endswith(latin1)  # detected and converted, as MailRoom converts
    binary = bytes(range(256)) * 4
    assert len(utf8_text(binary).encode("utf-8")) >= len(binary)  # never dropped


def self_compiled(
    tmp_path: Path, dovecot: Dovecot, account: Any, redis: RedisServer
) -> tuple[Path, Path]:
    """A self-compiled GitLab's config/gitlab.yml as its gitlab.yml.example has it (no
    delivery_method) and config/resque.yml (database 1)."""
    root = tmp_path / "home" / "git" / "gitlab"
    (root / "config").mkdir(parents=True)
    (root / "log").mkdir()
    incoming = {
        "enabled": True,
        "address": "gitlab-incoming+%{key}@gmail.com",
        "user": account.user,
        "password": account.password,
        "host": dovecot.host,
        "port": dovecot.tls_port,
        "ssl": True,
        "start_tls": False,
        "mailbox": "inbox",
        "idle_timeout": 60,
        "log_path": "log/mail_room_json.log",
        "expunge_deleted": False,
    }
    document = {
        "production": {"gitlab": {"host": "gitlab.example.com"}, "incoming_email": incoming}
    }
    (root / "config" / "gitlab.yml").write_text(yaml.safe_dump(document))
    resque = {"production": {"url": f"redis://127.0.0.1:{redis.port}/1"}}
    (root / "config" / "resque.yml").write_text(yaml.safe_dump(resque))
    overlay = tmp_path / "mailroom.yml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "shutdown_timeout": 5,
                "webhook": {"retry": {"initial": 0.05, "max": 0.2}},
                # One process: the outage below is the Sidekiq Redis's alone (replicas on a
                # Redis that goes away are tests/test_replicas.py's)
                "arbitration": {"method": "none"},
                "mailboxes": {"incoming_email": {"ca_file": str(dovecot.ca_file)}},
            }
        )
    )
    return root / "config" / "gitlab.yml", overlay


async def test_a_self_compiled_gitlab_yml_without_delivery_method(
    redis_server: RedisServer, dovecot: Dovecot, tmp_path: Path
) -> None:
    """GitLab's default is sidekiq: each message is the job in GitLab's queues Redis (its
    database from resque.yml), the message settled after the LPUSH; a Redis outage is waited
    out like a webhook outage."""
    account = dovecot.add_user()
    gitlab_yml, overlay = self_compiled(tmp_path, dovecot, account, redis_server)
    config = load_gitlab(gitlab_yml, mailroom_config=overlay, env={})
    (box,) = config.mailboxes
    assert box.webhook.sidekiq is not None and box.webhook.sidekiq.redis.db == 1
    assert any("delivery_method: sidekiq (GitLab's default" in w for w in config.warnings)
    assert [f.path for f in config.log.files] == [
        str(gitlab_yml.parent.parent / "log" / "mail_room_json.log")
    ]
    client = aioredis.Redis(port=redis_server.port, db=1)
    raw = message(1)
    try:
        async with running(config):
            await dovecot.aappend(account, raw)
            popped = await client.brpop(["queue:default"], timeout=30)
            assert popped is not None
            item = json.loads(popped[1])
            assert item["class"] == "EmailReceiverWorker" and item["args"] == [raw.decode()]
            assert abs(item["enqueued_at"] - time.time()) < 300

            async def deleted() -> bool:
                stored = await dovecot.amessages(account)
                return [("\\Deleted" in m.flags) for m in stored] == [True]

            await wait_until(deleted, what="settled after the LPUSH")
            redis_server.stop()  # GitLab's Redis down: the message waits, unsettled
            second = message(2)
            await dovecot.aappend(account, second)

            async def attempted() -> bool:
                stored = await dovecot.amessages(account)
                return len(stored) == 2

            await wait_until(attempted, what="the second message")
            stored = await dovecot.amessages(account)
            assert "\\Deleted" not in stored[1].flags
            redis_server.start()
            popped = await client.brpop(["queue:default"], timeout=30)
            assert popped is not None and json.loads(popped[1])["args"] == [second.decode()]
            await wait_until(lambda: _all_deleted(dovecot, account), what="the second one settled")
    finally:
        await client.aclose()


async def _all_deleted(dovecot: Dovecot, account: Any) -> bool:
    stored = await dovecot.amessages(account)
    return bool(stored) and all("\\Deleted" in m.flags for m in stored)


@pytest.mark.usefixtures("restore_logging")
def test_check_asks_the_sidekiq_queue(
    redis_server: RedisServer, dovecot: Dovecot, tmp_path: Path, capsys: Any
) -> None:
    account = dovecot.add_user()
    gitlab_yml, overlay = self_compiled(tmp_path, dovecot, account, redis_server)
    assert cli.main(["check", "--gitlab-config", str(gitlab_yml), "-c", str(overlay)]) == 0
    out = capsys.readouterr().out
    assert "OK   webhook[sidekiq queue:default at redis://127.0.0.1:" in out
    assert "sidekiq: Redis answers; 0 job(s) waiting in queue:default" in out
    assert "gitlab[incoming_email]" not in out  # no JWT, no internal API with sidekiq
