"""Self-tests of the test infrastructure (Dovecot, TLS, webhook receiver, demo receiver)."""

from __future__ import annotations

import asyncio
import imaplib
import importlib.util
import ssl
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook

from tests.servers import tls
from tests.servers.dovecot import Account, Dovecot
from tests.servers.webhook import WebhookReceiver

RAW = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
    b"Message-ID: <1@example.org>\r\n\r\nHi Bob,\r\n\xc3\xa9 8-bit line\r\n"
)


# -- Dovecot ---------------------------------------------------------------------------------


def test_plain_login_without_tls(dovecot: Dovecot, account: Account) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.port, timeout=5) as conn:
        assert "STARTTLS" in conn.capabilities
        typ, _ = conn.login(account.user, account.password)
        assert typ == "OK"


def test_starttls(dovecot: Dovecot, account: Account) -> None:
    with imaplib.IMAP4(dovecot.host, dovecot.port, timeout=5) as conn:
        conn.starttls(ssl_context=tls.client_ssl_context())
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert conn.login(account.user, account.password)[0] == "OK"


def test_implicit_tls_trusts_only_the_test_ca(dovecot: Dovecot, account: Account) -> None:
    with dovecot.imap(account, implicit_tls=True) as conn:
        assert isinstance(conn.sock, ssl.SSLSocket)
        assert conn.noop()[0] == "OK"
    ctx = ssl.create_default_context(cafile=str(dovecot.ca_file))
    with imaplib.IMAP4_SSL("localhost", dovecot.tls_port, ssl_context=ctx, timeout=5) as conn:
        assert conn.login(account.user, account.password)[0] == "OK"
    with pytest.raises(ssl.SSLCertVerificationError):  # system CAs do not know the test CA
        ctx = ssl.create_default_context()
        imaplib.IMAP4_SSL(dovecot.host, dovecot.tls_port, ssl_context=ctx, timeout=5)


def test_append_messages_round_trip(dovecot: Dovecot, account: Account) -> None:
    assert dovecot.messages(account) == []
    first = dovecot.append(account, RAW)
    second = dovecot.append(account, RAW.replace(b"hello", b"again"), flags="\\Flagged")
    assert second > first
    for _ in range(2):  # reading (BODY.PEEK, EXAMINE) changes no flags
        stored = dovecot.messages(account)
        assert [(m.uid, m.flags, m.raw) for m in stored] == [
            (first, frozenset(), RAW),
            (second, frozenset({"\\Flagged"}), RAW.replace(b"hello", b"again")),
        ]


def test_mailboxes(dovecot: Dovecot, account: Account) -> None:
    assert dovecot.mailboxes(account) == ["INBOX"]
    dovecot.create_mailbox(account, "Archive/Entwürfe & Co")
    assert set(dovecot.mailboxes(account)) == {"INBOX", "Archive", "Archive/Entwürfe & Co"}
    uid = dovecot.append(account, RAW, mailbox="Archive/Entwürfe & Co", flags="\\Seen")
    stored = dovecot.messages(account, "Archive/Entwürfe & Co")
    assert [(m.uid, m.flags) for m in stored] == [(uid, frozenset({"\\Seen"}))]
    assert dovecot.messages(account) == []


def test_accounts_are_isolated_and_new_users_log_in_at_once(dovecot: Dovecot) -> None:
    alice = dovecot.add_user()
    dovecot.append(alice, RAW)
    bob = dovecot.add_user()  # the passwd-file changed after alice's lookups
    assert dovecot.messages(bob) == []
    assert len(dovecot.messages(alice)) == 1
    with pytest.raises(imaplib.IMAP4.error), dovecot.imap(Account(alice.user, bob.password)):
        pass


def test_append_many(dovecot: Dovecot, account: Account) -> None:
    raws = [RAW.replace(b"hello", b"msg %d" % i) for i in range(1000)]
    uids = dovecot.append_many(account, raws)  # one connection, MULTIAPPEND: about 0.2 s
    assert len(uids) == len(set(uids)) == 1000
    stored = dovecot.messages(account)
    assert [m.uid for m in stored] == uids
    assert stored[-1].raw == raws[-1]


async def test_async_wrappers(dovecot: Dovecot, account: Account) -> None:
    uid = await dovecot.aappend(account, RAW)
    assert await dovecot.aappend_many(account, [RAW, RAW]) == [uid + 1, uid + 2]
    assert [m.uid for m in await dovecot.amessages(account)] == [uid, uid + 1, uid + 2]


@pytest.mark.slow
def test_restart_keeps_data_and_ports(dovecot_factory: Callable[[], Dovecot]) -> None:
    server = dovecot_factory()
    user = server.add_user()
    uid = server.append(user, RAW)
    ports = (server.port, server.tls_port)
    server.restart()
    assert (server.port, server.tls_port) == ports
    assert [(m.uid, m.raw) for m in server.messages(user)] == [(uid, RAW)]
    server.kill()
    assert not server.running
    with pytest.raises(ConnectionRefusedError):
        imaplib.IMAP4(server.host, server.port, timeout=5)
    server.start()
    assert [m.uid for m in server.messages(user)] == [uid]
    server.stop()
    server.stop()  # idempotent


# -- webhook receiver ------------------------------------------------------------------------


async def test_webhook_records(webhook: WebhookReceiver) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(webhook.url + "hook?x=1", json={"a": 1}, headers={"X-Y": "z"}) as r,
    ):
        assert r.status == 200
        assert await r.json() == {}
    [got] = await webhook.wait_for(1)
    assert (got.method, got.path, got.json()) == ("POST", "/hook?x=1", {"a": 1})
    assert got.headers["x-y"] == "z"
    assert got.at <= time.monotonic()
    webhook.respond(204)
    async with aiohttp.ClientSession() as http, http.post(webhook.url, data=b"x") as r:
        assert r.status == 204
    with pytest.raises(AssertionError, match=r"expected 3 request.*got 2"):
        await webhook.wait_for(3, timeout=0.05)


async def test_webhook_fail_next_and_drop_next(webhook: WebhookReceiver) -> None:
    webhook.fail_next(2, status=429, headers={"Retry-After": "1"})
    webhook.drop_next(1)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.post(webhook.url, data=b"1"):
                pass
        statuses = []
        for body in (b"2", b"3", b"4"):
            async with http.post(webhook.url, data=body) as r:
                statuses.append((r.status, r.headers.get("Retry-After")))
    assert statuses == [(429, "1"), (429, "1"), (200, None)]
    assert [r.body for r in await webhook.wait_for(4)] == [b"1", b"2", b"3", b"4"]


async def test_webhook_stall_and_release(webhook: WebhookReceiver) -> None:
    webhook.stall()
    async with aiohttp.ClientSession() as http:
        pending = asyncio.create_task(http.post(webhook.url, data=b"held"))
        await webhook.wait_for(1)  # recorded on arrival
        assert not pending.done()
        webhook.release()
        async with await pending as r:
            assert r.status == 200


async def test_webhook_stop_and_start_on_same_port(webhook: WebhookReceiver) -> None:
    url = webhook.url
    webhook.stall()
    async with aiohttp.ClientSession() as http:
        held = asyncio.create_task(http.post(url, data=b"held"))
        await webhook.wait_for(1)
        await webhook.stop()
        with pytest.raises(aiohttp.ClientConnectionError):  # in flight: no answer
            await held
        with pytest.raises(aiohttp.ClientConnectionError):  # down
            await http.post(url, data=b"down")
        await webhook.start()
        assert webhook.url == url
        async with http.post(url, data=b"up") as r:
            assert r.status == 200
    assert [r.body for r in await webhook.wait_for(2)] == [b"held", b"up"]


# -- examples/receiver.py --------------------------------------------------------------------


def _load_example() -> ModuleType:
    path = Path(__file__).parent.parent / "examples" / "receiver.py"
    spec = importlib.util.spec_from_file_location("example_receiver", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("example_receiver", module)
    spec.loader.exec_module(module)
    return module


def test_example_receiver_verifies_standard_webhooks_and_their_timestamp() -> None:
    receiver = _load_example()
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"id": "1", "subject": "hi"}'
    stamp = datetime.now(UTC)
    signature = Webhook(secret).sign("msg_1", stamp, body.decode())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(stamp.timestamp())),
        "webhook-signature": "v1,bogus " + signature,
    }
    assert receiver.verify(secret, headers, body)
    assert not receiver.verify(secret, headers, body + b" ")
    assert not receiver.verify("whsec_" + "AAAA" * 8, headers, body)
    now = stamp.timestamp()
    assert receiver.refusal(secret, headers, body, now) is None
    assert receiver.refusal(secret, headers, body, now + 299) is None
    assert receiver.refusal(secret, headers, body + b" ", now) == "bad signature"
    # A request recorded and replayed later, or stamped ahead, is refused though signed.
    for later in (now + 301, now - 301):
        assert "more than 300 s from now" in receiver.refusal(secret, headers, body, later)
    del headers["webhook-timestamp"]
    assert receiver.refusal(secret, headers, body, now) == "no webhook-timestamp"
