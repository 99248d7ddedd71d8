"""IMAP → webhook end to end, against a real Dovecot and a real aiohttp receiver."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import time
from asyncio.sslproto import SSLProtocol
from importlib.metadata import version
from typing import Any

import jwt
import pytest
from standardwebhooks.webhooks import Webhook

from mailroom.config import parse_config
from mailroom.delivery.posting import SLICED_BODY_BYTES
from mailroom.sources.imap import webhook_id
from mailroom.trust import tls
from tests.helpers import (
    WHSEC,
    config_dict,
    mailbox_dict,
    make_config,
    message,
    running,
    wait_until,
)
from tests.servers.dovecot import Account, Dovecot
from tests.servers.proxy import TcpRelay
from tests.servers.webhook import WebhookReceiver

PUSH_ONLY_S = 1740  # idle_timeout: no periodic sweep within a test, only IDLE pushes


async def flags_of(dovecot: Dovecot, account: Account, mailbox: str = "INBOX") -> list[set[str]]:
    return [set(m.flags) for m in await dovecot.amessages(account, mailbox)]


async def all_seen(dovecot: Dovecot, account: Account, count: int) -> bool:
    flags = await flags_of(dovecot, account)
    return len(flags) == count and all("\\Seen" in f for f in flags)


async def test_backlog_at_start_is_delivered_once_signed_and_marked_seen(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    raws = [message(n) for n in range(25)]
    uids = await dovecot.aappend_many(account, raws)
    config = make_config(dovecot, account, webhook.url)
    async with running(config):
        received = await webhook.wait_for(25)
        await wait_until(lambda: all_seen(dovecot, account, 25), what="25 messages \\Seen")
    assert len(webhook.requests) == 25
    verifier = Webhook(WHSEC)
    by_raw = {}
    for request in received:
        payload = verifier.verify(request.body, dict(request.headers))
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["webhook-id"] == payload["id"]
        assert request.headers["X-Mailroom-Mailbox"] == account.user
        assert request.headers["User-Agent"] == f"mailroom/{version('mailroom-incoming')}"
        by_raw[base64.b64decode(payload["raw"])] = (request, payload)
    assert set(by_raw) == set(raws)  # byte-exact, each exactly once
    stored = {m.raw: m.uid for m in await dovecot.amessages(account)}
    request, payload = by_raw[raws[7]]
    # The mailbox's server identity and the message's bytes (mailroom.identity), not its UID.
    assert payload["id"] == webhook_id(config.mailboxes[0], raws[7])  # type: ignore[arg-type]
    assert stored[raws[7]] == uids[7]
    assert request.headers["X-Mailroom-Key"] == "key7"
    assert {k: payload[k] for k in ("key", "matched_header", "subject", "size")} == {
        "key": "key7",
        "matched_header": "To",
        "subject": "test 7",
        "size": len(raws[7]),
    }
    assert payload["from"] == {"name": "Sender 7", "address": "sender7@example.org"}
    assert payload["to"] == [{"name": "", "address": "incoming+key7@example.com"}]
    assert payload["text"] == "Message number 7.\n"
    assert payload["date"] == "2026-11-22T10:00:00+00:00"


async def test_a_large_message_is_posted_whole_in_slices(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over TLS with the service's read buffers (cli.main sets them), restored afterwards.
    monkeypatch.setattr(SSLProtocol, "max_size", SSLProtocol.max_size)
    monkeypatch.setattr(SSLProtocol, "get_buffer", SSLProtocol.get_buffer)
    tls.small_read_buffers()
    raw = message(1, size=SLICED_BODY_BYTES + 100_000)
    await dovecot.aappend(account, raw)
    async with running(make_config(dovecot, account, webhook.url)):
        (request,) = await webhook.wait_for(1)
        await wait_until(lambda: all_seen(dovecot, account, 1), what="delivered and seen")
    payload = Webhook(WHSEC).verify(request.body, dict(request.headers))  # signed unsliced
    assert base64.b64decode(payload["raw"]) == raw
    assert payload["text"].startswith("Message number 1.\n")
    assert request.headers["Content-Length"] == str(len(request.body))  # not chunked


async def test_tls_connections_share_one_read_buffer_and_each_reads_its_own(
    dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23: one read buffer per thread, not per connection (16 MiB for 1,000 idle TLS
    mailboxes). Forty connections talk at once; each gets its own answers, whole."""
    monkeypatch.setattr(SSLProtocol, "max_size", SSLProtocol.max_size)
    monkeypatch.setattr(SSLProtocol, "get_buffer", SSLProtocol.get_buffer)
    tls.small_read_buffers()
    views: set[int] = set()
    shared = SSLProtocol.get_buffer

    def recording(self: SSLProtocol, n: int) -> memoryview:
        view: memoryview = shared(self, n)
        views.add(id(view))
        return view

    monkeypatch.setattr(SSLProtocol, "get_buffer", recording)
    context = tls.client_context(ca_file=str(dovecot.ca_file))
    accounts = [dovecot.add_user() for _ in range(8)]

    async def session(n: int) -> bytes:
        account = accounts[n % len(accounts)]
        reader, writer = await asyncio.open_connection(
            dovecot.host, dovecot.tls_port, ssl=context, server_hostname=dovecot.host
        )
        sent = b""
        for k in range(5):  # tagged round trips, each answered on this connection only
            tag = f"c{n}x{k}".encode()
            if k == 0:
                command = f'LOGIN "{account.user}" "{account.password}"'.encode()
            else:
                command = f"NOOP {'z' * (n * 37 % 3000)}".encode() if k == 2 else b"NOOP"
            writer.write(tag + b" " + command + b"\r\n")
            sent += tag
            async with asyncio.timeout(30):
                while not (line := await reader.readline()).startswith(tag):
                    assert line.startswith(b"* ") and tag not in line, line
            assert line.startswith(tag + b" "), line
        writer.write(b"z LOGOUT\r\n")
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        return sent

    await asyncio.gather(*(session(n) for n in range(40)))
    assert len(views) == 1  # one buffer for the whole loop


async def test_a_bursts_outcomes_are_settled_in_one_command_without_idling_between(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    """Issue 23: each outcome used to end an IDLE (DONE), go out alone (UID STORE) and IDLE
    again; now the watcher awaits the outcomes of what it handed out without IDLE, and
    settles them together, the IDLE that follows in the same write as the UID STORE
    (``store_then_idle``: one round trip where there were two)."""
    await dovecot.aappend_many(account, [message(n) for n in range(10)])
    webhook.stall()  # the deliveries wait, as behind a slow webhook
    async with TcpRelay(dovecot.host, dovecot.port) as relay:
        box = mailbox_dict(dovecot, account, port=relay.port, ssl=False, ca_file=None)
        async with running(parse_config(config_dict([box], webhook.url), env={})):
            await webhook.wait_for(8)  # webhook.concurrency: eight wait on the webhook
            fetched = bytes(relay.sent).count(b"BODY.PEEK[]")
            webhook.release()
            await webhook.wait_for(10)
            await wait_until(lambda: all_seen(dovecot, account, 10), what="delivered and seen")
            await wait_until(
                lambda: bytes(relay.sent).count(b" IDLE\r\n") >= 1, what="idling again"
            )
    sent = bytes(relay.sent)
    assert fetched == 1, sent  # the ten in one UID FETCH
    before_outcomes, _, after = sent.partition(b" UID STORE ")
    assert b" IDLE\r\n" not in before_outcomes, sent  # not while the outcomes were due
    assert after.count(b" UID STORE ") <= 1, sent  # one, two on a slow machine
    turns = [bytes(data) for client, data in relay.turns if client]
    last_store = next(turn for turn in reversed(turns) if b" UID STORE " in turn)
    assert last_store.split(b" UID STORE ")[-1].endswith(b" IDLE\r\n"), turns  # before its OK


async def test_in_a_backlog_a_settlement_and_the_next_fetch_window_go_in_one_round_trip(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    """Issue 23: with this mailbox's in-flight cap full, the watcher sent UID STORE, waited for
    its answer, then sent the next UID FETCH: two round trips a window (1.1 s for 1,000
    messages at a 50 ms round trip). Now the FETCH goes with the STORE, reserved in the room
    the STORE frees; every message is still posted once and settled."""
    from mailroom.sources.imap import MAX_IN_FLIGHT  # noqa: PLC0415

    count = MAX_IN_FLIGHT + 100
    await dovecot.aappend_many(account, [message(n) for n in range(count)])
    async with TcpRelay(dovecot.host, dovecot.port) as relay:
        box = mailbox_dict(dovecot, account, port=relay.port, ssl=False, ca_file=None)
        async with running(parse_config(config_dict([box], webhook.url), env={})):
            await webhook.wait_for(count, timeout=60)
            await wait_until(
                lambda: all_seen(dovecot, account, count), what="delivered and seen", timeout=60
            )
    assert len({r.headers["webhook-id"] for r in webhook.requests}) == count
    turns = [bytes(data) for client, data in relay.turns if client]
    together = [
        turn
        for turn in turns
        if b" UID STORE " in turn and b" UID FETCH " in turn.split(b" UID STORE ")[1]
    ]
    assert together, turns  # sent before the STORE's answer came
    assert all(b"BODY.PEEK[]" in turn for turn in together), together


async def test_mail_during_idle_arrives_by_push(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    """Only an IDLE push can bring each message before the next sweep, 29 minutes away. (Its
    latency, Dovecot's 0.5 s push delay and a few ms: bench/imap_latency.py.)"""
    caplog.set_level(logging.INFO, logger="mailroom")
    config = make_config(dovecot, account, webhook.url, idle_timeout=PUSH_ONLY_S)
    async with running(config):
        await wait_until(lambda: _logged(caplog, "connected to"), what="the watcher to connect")
        for n in range(3):
            await dovecot.aappend(account, message(n))
            await webhook.wait_for(n + 1, timeout=60)
    assert len(webhook.requests) == 3


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


@pytest.mark.slow
async def test_arrival_race_hundreds_of_single_appends_none_waits(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    """Each APPEND is its own command and connection-free of the watcher: no nudges at the end.

    The reference MailRoom leaves a message that lands between its SEARCH and its next IDLE
    until another one arrives; here the last of 300 must arrive without any further mail.
    """
    count = 300
    config = make_config(dovecot, account, webhook.url, idle_timeout=PUSH_ONLY_S)
    async with running(config):

        def append_one_by_one() -> None:
            with dovecot.imap(account) as conn:
                for n in range(count):
                    typ, _ = conn.append("INBOX", None, None, message(n))
                    assert typ == "OK"

        await asyncio.to_thread(append_one_by_one)
        await webhook.wait_for(count, timeout=60)  # long before the next sweep
        await wait_until(lambda: all_seen(dovecot, account, count), what="all \\Seen")
    ids = [r.headers["webhook-id"] for r in webhook.requests]
    assert len(ids) == len(set(ids)) == count


@pytest.mark.parametrize("mode", ["ssl", "start_tls", "plain"])
async def test_tls_starttls_and_plain(
    mode: str, dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    modes: dict[str, dict[str, Any]] = {
        "ssl": {"port": dovecot.tls_port, "ssl": True},
        "start_tls": {"port": dovecot.port, "ssl": False, "start_tls": True},
        "plain": {"port": dovecot.port, "ssl": False, "ca_file": None},
    }
    settings = modes[mode]
    await dovecot.aappend(account, message(1))
    async with running(make_config(dovecot, account, webhook.url, **settings)):
        (request,) = await webhook.wait_for(1)
        await wait_until(lambda: all_seen(dovecot, account, 1), what="\\Seen")
    assert request.json()["subject"] == "test 1"


async def test_untrusted_certificate_is_refused_and_said_clearly(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    await dovecot.aappend(account, message(1))
    config = make_config(dovecot, account, webhook.url, ca_file=None)
    async with running(config):
        await wait_until(
            lambda: _logged(caplog, "not trusted"), what="the certificate error to be logged"
        )
    assert webhook.requests == []
    assert "set ca_file to the CA that signed it" in caplog.text
    assert await flags_of(dovecot, account) == [set()]


async def test_webhook_5xx_then_2xx_keeps_message_unsettled_and_the_same_id(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    await dovecot.aappend(account, message(1))
    webhook.stall()  # hold the first attempt to look at the server meanwhile
    webhook.fail_next(2, status=503, headers={"Retry-After": "0"})
    async with running(make_config(dovecot, account, webhook.url)):
        await webhook.wait_for(1)
        assert await flags_of(dovecot, account) == [set()]  # nothing settled yet
        webhook.release()
        received = await webhook.wait_for(3)
        await wait_until(lambda: all_seen(dovecot, account, 1), what="\\Seen after 2xx")
    assert len({r.headers["webhook-id"] for r in received}) == 1
    assert len(webhook.requests) == 3


async def test_webhook_down_then_up(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    await webhook.stop()
    await dovecot.aappend(account, message(1))
    async with running(make_config(dovecot, account, webhook.url)):
        await wait_until(
            lambda: _logged(caplog, "webhook attempt 2 failed"), what="two failed attempts"
        )
        assert await flags_of(dovecot, account) == [set()]
        await webhook.start()
        await webhook.wait_for(1)
        await wait_until(lambda: all_seen(dovecot, account, 1), what="\\Seen")
    assert "ClientConnectorError" in caplog.text


async def test_dropped_connection_is_retried(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    webhook.drop_next(1)
    await dovecot.aappend(account, message(1))
    async with running(make_config(dovecot, account, webhook.url)):
        await webhook.wait_for(2)
        await wait_until(lambda: all_seen(dovecot, account, 1), what="\\Seen")


@pytest.mark.parametrize("failed_folder", [None, "Failed/Mailroom"])
async def test_permanent_4xx_dead_letters_once(
    failed_folder: str | None, dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    webhook.respond(400, b"bad")
    await dovecot.aappend(account, message(1))
    config = make_config(dovecot, account, webhook.url, failed_folder=failed_folder)
    async with running(config):
        await webhook.wait_for(1)
        if failed_folder is None:
            await wait_until(
                lambda: _flags_are(dovecot, account, [{"$MailroomFailed", "\\Seen"}]),
                what="$MailroomFailed",
            )
        else:
            await wait_until(
                lambda: _count(dovecot, account, failed_folder, 1), what="moved to failed_folder"
            )
            assert await dovecot.amessages(account) == []
    assert len(webhook.requests) == 1


async def _flags_are(dovecot: Dovecot, account: Account, expected: list[set[str]]) -> bool:
    return await flags_of(dovecot, account) == expected


async def _count(dovecot: Dovecot, account: Account, mailbox: str, count: int) -> bool:
    if mailbox not in await asyncio.to_thread(dovecot.mailboxes, account):
        return False
    return len(await dovecot.amessages(account, mailbox)) == count


async def test_delete_and_expunge_after_delivery(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    await dovecot.aappend_many(account, [message(n) for n in range(3)])
    config = make_config(
        dovecot, account, webhook.url, delete_after_delivery=True, expunge_deleted=True
    )
    async with running(config):
        await webhook.wait_for(3)
        await wait_until(lambda: _count(dovecot, account, "INBOX", 0), what="expunged")


async def test_delete_without_expunge_leaves_deleted_and_seen(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    await dovecot.aappend(account, message(1))
    config = make_config(dovecot, account, webhook.url, delete_after_delivery=True)
    async with running(config):
        await webhook.wait_for(1)
        await wait_until(
            lambda: _flags_are(dovecot, account, [{"\\Deleted", "\\Seen"}]), what="\\Deleted"
        )


async def test_too_large_is_not_fetched_and_dead_lettered(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    await dovecot.aappend(account, message(1, size=5000))
    await dovecot.aappend(account, message(2))
    config = make_config(dovecot, account, webhook.url, max_message_bytes=2048)
    async with running(config):
        (request,) = await webhook.wait_for(1)
        await wait_until(
            lambda: _flags_are(dovecot, account, [{"$MailroomFailed", "\\Seen"}, {"\\Seen"}]),
            what="the large one flagged, the small one seen",
        )
    assert request.json()["subject"] == "test 2"
    assert "over max_message_bytes (2048)" in caplog.text


async def test_unknown_recipient_is_settled_without_a_post(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    await dovecot.aappend(account, message(1, to="someone-else@example.net"))
    await dovecot.aappend(account, message(2))
    async with running(make_config(dovecot, account, webhook.url)):
        (request,) = await webhook.wait_for(1)
        await wait_until(lambda: all_seen(dovecot, account, 2), what="both settled")
    assert request.json()["key"] == "key2"


async def test_raw_format_with_bearer_token_and_jwt(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, tmp_path: Any
) -> None:
    raw = message(1)
    await dovecot.aappend(account, raw)
    (tmp_path / "jwt").write_text("jwt-secret-0123456789abcdef-0123456789\n")
    hook = {
        "format": "raw",
        "token": "t0ken",
        "jwt": {"secret_file": str(tmp_path / "jwt")},
    }
    async with running(make_config(dovecot, account, webhook.url, webhook=hook)):
        (request,) = await webhook.wait_for(1)
    assert request.body == raw
    assert request.headers["Content-Type"] == "message/rfc822"
    assert request.headers["Authorization"] == "Bearer t0ken"
    Webhook(WHSEC).verify(request.body, dict(request.headers), json_parse=False)
    claims = jwt.decode(
        request.headers["Gitlab-Mailroom-Api-Request"],
        "jwt-secret-0123456789abcdef-0123456789",
        algorithms=["HS256"],
        issuer="gitlab-mailroom",
    )
    assert abs(claims["iat"] - time.time()) < 60


async def test_basic_auth(dovecot: Dovecot, account: Account, webhook: WebhookReceiver) -> None:
    await dovecot.aappend(account, message(1))
    hook = {"basic": {"user": "app", "password": "s3cret"}}
    async with running(make_config(dovecot, account, webhook.url, webhook=hook)):
        (request,) = await webhook.wait_for(1)
    expected = "Basic " + base64.b64encode(b"app:s3cret").decode()
    assert request.headers["Authorization"] == expected


async def test_one_failing_mailbox_never_stops_the_others(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    other = dovecot.add_user()
    await dovecot.aappend(account, message(1))
    await dovecot.aappend(other, message(2))
    config = parse_config(
        config_dict(
            [
                mailbox_dict(dovecot, account, password="wrong"),
                mailbox_dict(dovecot, other),
                mailbox_dict(dovecot, other, id="down", port=1, ssl=False, ca_file=None),
            ],
            webhook.url,
        ),
        env={},
    )
    async with running(config):
        (request,) = await webhook.wait_for(1)
        await wait_until(
            lambda: _logged(caplog, f"login as {account.user} refused"), what="login error"
        )
        await wait_until(lambda: _logged(caplog, "cannot connect to 127.0.0.1:1"), what="down")
    assert request.json()["subject"] == "test 2"
    assert "wrong" not in caplog.text.replace("wrong password", "")


@pytest.mark.slow
async def test_dovecot_restarted_under_an_idling_watcher(
    dovecot_factory: Any, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    server: Dovecot = dovecot_factory()
    account = server.add_user()
    async with running(make_config(server, account, webhook.url)):
        await wait_until(lambda: _logged(caplog, "connected to"), what="connected")
        await asyncio.to_thread(server.restart)
        await server.aappend(account, message(1))
        await webhook.wait_for(1, timeout=15)
        await wait_until(lambda: all_seen(server, account, 1), what="\\Seen")
    connects = [r for r in caplog.records if "connected to" in r.getMessage()]
    assert len(connects) == 2
    assert "reconnecting in" in caplog.text


async def test_an_internal_error_dead_letters_instead_of_looping(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in routing")

    monkeypatch.setattr("mailroom.delivery.dispatch.decide", broken)
    await dovecot.aappend(account, message(1))
    async with running(make_config(dovecot, account, webhook.url)):
        await wait_until(
            lambda: _flags_are(dovecot, account, [{"$MailroomFailed", "\\Seen"}]),
            what="dead-lettered",
        )
    assert webhook.requests == []
    assert "internal error; dead-lettering the message to keep it" in caplog.text
    assert "RuntimeError: a bug in routing" in caplog.text
