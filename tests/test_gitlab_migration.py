"""A migration from GitLab's MailRoom: both watch the same mailbox, neither posts what the other
took (MailRoom's claims, ``arbitration.mail_room_claims``)."""

from __future__ import annotations

import asyncio
import contextlib
import email
import logging
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from mailroom.arbitration.store import MAIL_ROOM_CLAIM_S, RedisStore
from mailroom.config import ArbitrationConfig
from mailroom.delivery.claims import Claim, Claims
from mailroom.envelope import Envelope
from mailroom.gitlab import load_gitlab
from tests.helpers import logged, message, running, wait_until
from tests.servers.dovecot import Dovecot
from tests.servers.gitlab import GitLabInternalApi
from tests.servers.mail_room import MailRoom
from tests.servers.redis import RedisServer
from tests.test_gitlab import SECRET, gitlab_files

MESSAGES = 300
NAMESPACE = "mail_room:gitlab"  # Gitlab::Redis::Queues::MAILROOM_NAMESPACE


def message_id(raw: bytes) -> str:
    return str(email.message_from_bytes(raw)["Message-ID"])


@pytest.mark.slow
async def test_mailroom_and_mailroom_gem_side_by_side_post_each_message_once(
    redis_server: RedisServer, dovecot: Dovecot, tmp_path: Path
) -> None:
    account = dovecot.add_user()
    raws = [message(n, to="incoming+key{n}@example.com") for n in range(MESSAGES)]
    await dovecot.aappend_many(account, raws[: MESSAGES // 2])
    async with GitLabInternalApi({"incoming_email": SECRET}) as api:
        files = gitlab_files(
            tmp_path, dovecot, api.url, {"incoming_email": account}, redis=redis_server
        )
        config = load_gitlab(files[0], mailroom_config=files[1], env={})
        assert config.arbitration.mail_room_claims
        assert config.arbitration.mail_room_key("7") == f"{NAMESPACE}:delivered:7"
        gem = MailRoom(
            dovecot,
            account,
            redis_url=redis_server.url,
            namespace=NAMESPACE,
            gitlab_url=api.url,
            kind="incoming_email",
            secret=SECRET,
        )
        async with running(config):
            gem.start()
            try:
                await dovecot.aappend_many(account, raws[MESSAGES // 2 :])
                await api.wait_for(MESSAGES, timeout=120)

                async def all_settled() -> bool:  # no repeat can come after this
                    stored = await dovecot.amessages(account)
                    return len(stored) == MESSAGES and all("\\Deleted" in m.flags for m in stored)

                await wait_until(all_settled, timeout=60, what="every message settled")
            finally:
                await asyncio.to_thread(gem.stop)
    posted = [message_id(r.body) for r in api.delivered]
    assert sorted(posted) == sorted(message_id(raw) for raw in raws)  # each one, once
    assert len(api.requests) == MESSAGES
    by_mailroom = [r for r in api.delivered if "X-Mailroom-Mailbox" in r.headers]
    assert by_mailroom and len(gem.posted) == MESSAGES - len(by_mailroom)
    assert gem.posted, "the MailRoom stand-in took none: the race was not run"


def envelope(mailbox: str, uid: int) -> Envelope:
    async def settle(_: object) -> None:
        raise AssertionError("not settled here")

    return Envelope(
        mailbox=mailbox,
        ref=f"uid {uid}",
        idempotency_key=f"msg_{mailbox}{uid}",
        raw=b"",
        size=0,
        native_id=str(uid),
        _settle=settle,
    )


async def test_only_mailroom_gems_own_claims_count_as_taken(redis_server: RedisServer) -> None:
    """MailRoom's key names only the UID: an incoming and a Service Desk message with the same
    UID share it. mailroom's own claims say whose they are and never block another mailroom."""
    config = ArbitrationConfig(
        method="redis", url=redis_server.url, namespace=NAMESPACE, mail_room_claims=True
    )
    store = RedisStore(config, replica="a")
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        claims = Claims(store)
        async with claims.held(envelope("incoming_email", 5), {}) as claim:
            assert claim is Claim.OURS
        key = f"{NAMESPACE}:delivered:5"
        assert await client.get(key) == "mailroom incoming_email msg_incoming_email5"
        assert 0 < await client.ttl(key) <= MAIL_ROOM_CLAIM_S
        # Another mailroom (a Service Desk message with UID 5): not MailRoom's, so not taken
        async with claims.held(envelope("service_desk_email", 5), {}) as claim:
            assert claim is Claim.OURS
        await client.set(f"{NAMESPACE}:delivered:6", 1, nx=True, ex=600)  # as MailRoom does
        async with claims.held(envelope("service_desk_email", 6), {}) as claim:
            assert claim is Claim.TAKEN
        redis_server.stop()
        async with claims.held(envelope("incoming_email", 7), {}) as claim:
            assert claim is Claim.UNKNOWN
        async with Claims(None).held(envelope("incoming_email", 8), {}) as claim:
            assert claim is Claim.OURS  # claims off
    finally:
        await client.aclose()
        await store.close()


@pytest.mark.slow
async def test_a_message_mailroom_gem_claimed_is_left_to_it(
    redis_server: RedisServer, dovecot: Dovecot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    account = dovecot.add_user()
    uid = await dovecot.aappend(account, message(1))
    client = aioredis.Redis.from_url(redis_server.url)
    await client.set(f"{NAMESPACE}:delivered:{uid}", 1, nx=True, ex=600)
    async with GitLabInternalApi({"incoming_email": SECRET}) as api, contextlib.aclosing(client):
        sweeps = {"incoming_email": {"ca_file": str(dovecot.ca_file), "idle_timeout": 1}}
        files = gitlab_files(
            tmp_path,
            dovecot,
            api.url,
            {"incoming_email": account},
            redis=redis_server,
            mailboxes=sweeps,
        )
        config = load_gitlab(files[0], mailroom_config=files[1], env={})
        async with running(config):
            await wait_until(
                lambda: bool(logged(caplog, "a MailRoom process claimed it")), what="the claim"
            )
            assert api.requests == []  # MailRoom has it
            await client.delete(f"{NAMESPACE}:delivered:{uid}")  # MailRoom died; claim expired
            await api.wait_for(1)
    stored = await dovecot.amessages(account)
    assert [("\\Deleted" in m.flags) for m in stored] == [True]
