"""The LMTP listener end to end: ``smtplib.LMTP`` (and a raw client where the bytes matter)
against the real listener in the supervisor, posting to the real webhook receiver.

Each accepted recipient is one delivery with its own webhook event, key and webhook-id, and its
own reply after DATA, in RCPT order: 250 once the webhook took it, 5xx when refused for good,
451 while the webhook cannot take it (the MTA's queue retries, under the same webhook-id).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import logging
import os
import re
import signal
import smtplib
import socket
import ssl
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mailroom import check
from mailroom.check import route
from mailroom.config import Config, ConfigError, parse_config
from mailroom.kinds import KINDS
from mailroom.runtime import supervisor
from tests.helpers import ROOT, Process, config_dict, message, wait_until
from tests.lmtp import (
    Raw,
    Sent,
    address,
    dotted,
    greets,
    listening,
    lmtp_box,
    lmtp_config,
    send,
    transaction,
)
from tests.servers import tls
from tests.servers.dovecot import free_port
from tests.servers.gitlab import GitLabInternalApi
from tests.servers.redis import RedisServer
from tests.servers.webhook import WebhookReceiver

REJECT = b'{"reject": "no such project"}'
JSON = {"Content-Type": "application/json"}


async def deliver(port: int | str, recipients: list[str], raw: bytes, **kw: Any) -> Sent:
    """``tests.lmtp.send`` in a thread: mailroom runs in this event loop."""
    return await asyncio.to_thread(send, port, recipients, raw, **kw)


def raw_of(request: Any) -> bytes:
    return base64.b64decode(request.json()["raw"])


async def test_lhlo_offers_what_lmtp_needs_and_no_auth(webhook: WebhookReceiver) -> None:
    port = free_port()
    async with listening(lmtp_config(webhook.url, f"127.0.0.1:{port}"), port):
        client = await Raw.open(port)
        await client.send(b"LHLO client.example.org\r\n")
        lines = [await client.line() for _ in range(6)]
        await client.send(b"AUTH PLAIN AGFhAGI=\r\nHELO x\r\nNOOP\r\nQUIT\r\n")
        after = await client.replies(4)
        await client.close()
    assert lines == [
        "250-mx.example.com",
        "250-PIPELINING",
        "250-ENHANCEDSTATUSCODES",
        "250-SIZE 26214400",
        "250-8BITMIME",
        "250 SMTPUTF8",  # RFC 2034 §3: no enhanced code in LHLO's reply; no STARTTLS, no AUTH
    ]
    assert after[0].startswith("500 5.5.2 ") and "AUTH" in after[0]
    assert after[1].startswith("500 5.5.2 ") and "HELO" in after[1]
    assert after[2:] == ["250 2.0.0 OK", "221 2.0.0 Bye"]


async def test_each_recipient_is_a_delivery_with_its_own_reply_in_rcpt_order(
    webhook: WebhookReceiver,
) -> None:
    """Mixed outcomes in one transaction: delivered, refused by the application (422 → 550,
    the reason in the reply), refused for good (400 → 554), unknown at RCPT (550 5.1.1), a
    repeated recipient answered like its first."""
    webhook.respond_for("k2", 422, REJECT, JSON)
    webhook.respond_for("k3", 400, b"bad request")
    port = free_port()
    raw = message(1)
    recipients = [address("k1"), address("k2"), "stranger@example.com", address("k3")]
    async with listening(lmtp_config(webhook.url, f"127.0.0.1:{port}"), port):
        sent = await deliver(port, [*recipients, address("k1")], raw)
        requests = await webhook.wait_for(3)
    assert [code for code, _ in sent.rcpt] == [250, 250, 550, 250, 250]
    assert sent.rcpt[2][1] == "5.1.1 <stranger@example.com>: no such recipient here"
    by_key = {r.headers["X-Mailroom-Key"]: r for r in requests}
    assert sorted(by_key) == ["k1", "k2", "k3"] and len(requests) == 3
    ids = {key: r.headers["webhook-id"] for key, r in by_key.items()}
    assert len(set(ids.values())) == 3
    assert sent.data == [
        (250, f"2.0.0 {ids['k1']} delivered"),
        (550, "5.7.1 no such project"),
        (554, "5.3.0 the webhook refused it for good: HTTP 400"),
        (250, f"2.0.0 {ids['k1']} delivered"),
    ]
    for key, request in by_key.items():
        body = request.json()
        assert body["key"] == key and body["matched_header"] == "Delivered-To"
        assert raw_of(request) == (
            f"Return-Path: <sender@example.org>\r\nDelivered-To: {address(key)}\r\n".encode() + raw
        )


async def test_the_key_comes_from_the_recipient_not_the_headers(webhook: WebhookReceiver) -> None:
    """Mail to two keys at once (both in To): each delivery carries its recipient's key."""
    port = free_port()
    raw = message(2, to=f"{address('a')}, {address('b')}")
    async with listening(lmtp_config(webhook.url, f"127.0.0.1:{port}"), port):
        sent = await deliver(port, [address("b"), address("a")], raw)
        requests = await webhook.wait_for(2)
    assert [code for code, _ in sent.data] == [250, 250]
    assert sorted(r.json()["key"] for r in requests) == ["a", "b"]


async def test_webhook_down_is_451_then_the_mtas_retry_is_delivered_with_the_same_id(
    webhook: WebhookReceiver,
) -> None:
    port = free_port()
    config = lmtp_config(webhook.url, f"127.0.0.1:{port}", reply_within=2)
    raw = message(3)
    webhook.respond(503)
    async with listening(config, port):
        started = time.monotonic()
        first = await deliver(port, [address("k1")], raw)
        waited = time.monotonic() - started
        failed = {r.headers["webhook-id"] for r in webhook.requests}
        webhook.respond(200, b"{}", JSON)
        retries = []
        for _ in range(50):  # as the MTA does: again later, until it is taken
            retries.append(await deliver(port, [address("k1")], raw))
            if retries[-1].data[0][0] != 451:
                break
            await asyncio.sleep(0.1)  # the circuit's next probe is due within 0.2 s
    code, text = first.data[0]
    assert code == 451 and text.startswith("4.3.0 ")
    assert waited < 10  # reply_within (2 s) and the margin: the MTA is not held
    assert retries[-1].data[0][0] == 250
    assert webhook.delivered() == [*failed] and len(failed) == 1


async def test_an_open_circuit_is_answered_451_at_once(webhook: WebhookReceiver) -> None:
    """Once the webhook's circuit opens, messages do not wait out reply_within: 451 at once."""
    port = free_port()
    config = lmtp_config(webhook.url, f"127.0.0.1:{port}", reply_within=30)
    webhook.respond(503)
    async with listening(config, port):
        for n in range(5):  # five failures in a row open the circuit
            if len(webhook.requests) >= 5:
                break
            await deliver(port, [address(f"k{n}")], message(n))
        await wait_until(lambda: len(webhook.requests) >= 5, what="five failed requests")
        started = time.monotonic()
        sent = await deliver(port, [address("late")], message(9))
        took = time.monotonic() - started
    assert sent.data[0][0] == 451
    assert took < 5  # not the 30 s of reply_within


async def test_auto_generated_mail_and_bounces_are_250_and_not_posted(
    webhook: WebhookReceiver,
) -> None:
    port = free_port()
    auto = message(4).replace(b"Subject:", b"Auto-Submitted: auto-replied\r\nSubject:", 1)
    async with listening(lmtp_config(webhook.url, f"127.0.0.1:{port}"), port):
        ignored = await deliver(port, [address("k1")], auto)
        bounce = await deliver(port, [address("k2")], message(5), sender="<>")
        posted = await deliver(port, [address("k3")], message(6))
        await webhook.wait_for(1)
    assert ignored.data[0][0] == 250 and "auto-generated (auto_submitted)" in ignored.data[0][1]
    assert bounce.data[0][0] == 250 and "auto-generated (null_sender)" in bounce.data[0][1]
    assert posted.data[0][0] == 250
    assert [r.headers["X-Mailroom-Key"] for r in webhook.requests] == ["k3"]


async def test_pipelining_every_command_in_one_write(webhook: WebhookReceiver) -> None:
    port = free_port()
    raw = message(7).replace(b"Message number", b".Message number with a leading dot", 1)
    async with listening(lmtp_config(webhook.url, f"127.0.0.1:{port}"), port):
        client = await Raw.open(port)
        await client.send(
            b"LHLO client.example.org\r\n"
            b"MAIL FROM:<sender@example.org> BODY=8BITMIME SIZE=1000\r\n"
            + f"RCPT TO:<{address('p1')}>\r\n".encode()
            + b"RCPT TO:<nobody@example.com>\r\n"
            + f"RCPT TO:<{address('p2')}>\r\n".encode()
            + b"DATA\r\n"
        )
        before = await client.replies(6)
        await client.send(dotted(raw) + b"MAIL FROM:<x@example.org>\r\nRSET\r\nQUIT\r\n")
        after = await client.replies(5)
        await client.close()
        requests = await webhook.wait_for(2)
    assert [line[:3] for line in before] == ["250", "250", "250", "550", "250", "354"]
    assert [line[:9] for line in after] == [
        "250 2.0.0",
        "250 2.0.0",
        "250 2.1.0",
        "250 2.0.0",
        "221 2.0.0",
    ]
    for request in requests:  # dot-stuffing undone: the bytes as written
        assert raw_of(request).endswith(raw)


async def test_size_declared_too_large_is_refused_at_mail(webhook: WebhookReceiver) -> None:
    port = free_port()
    config = lmtp_config(webhook.url, f"127.0.0.1:{port}", max_message_bytes=4096)
    async with listening(config, port):
        client = await Raw.open(port)
        await client.send(b"LHLO c\r\nMAIL FROM:<a@example.org> SIZE=5000\r\n")
        lines = [await client.line() for _ in range(7)]
        await client.close()
    assert "250-SIZE 4096" in lines
    assert lines[-1].startswith("552 5.3.4 ")


async def test_a_message_over_the_limit_gets_552_per_recipient_and_the_session_goes_on(
    webhook: WebhookReceiver,
) -> None:
    port = free_port()
    config = lmtp_config(webhook.url, f"127.0.0.1:{port}", max_message_bytes=4096)
    async with listening(config, port):
        too_big = await deliver(port, [address("a"), address("b")], message(8, size=10_000))
        fits = await deliver(port, [address("c")], message(9, size=2000))
        await webhook.wait_for(1)
    assert too_big.data == [
        (552, "5.3.4 message larger than max_message_bytes (4096 bytes)"),
        (552, "5.3.4 message larger than max_message_bytes (4096 bytes)"),
    ]
    assert fits.data[0][0] == 250
    assert [r.headers["X-Mailroom-Key"] for r in webhook.requests] == ["c"]


async def test_too_many_recipients_are_452_at_rcpt(webhook: WebhookReceiver) -> None:
    port = free_port()
    config = lmtp_config(webhook.url, f"127.0.0.1:{port}", max_recipients=2)
    async with listening(config, port):
        sent = await deliver(port, [address("a"), address("b"), address("c")], message(10))
        await webhook.wait_for(2)
    assert [code for code, _ in sent.rcpt] == [250, 250, 452]
    assert sent.rcpt[2][1].startswith("4.5.3 ")
    assert [code for code, _ in sent.data] == [250, 250]


async def test_a_client_that_stalls_mid_data_is_closed_and_nothing_is_posted(
    webhook: WebhookReceiver,
) -> None:
    port = free_port()
    config = lmtp_config(webhook.url, f"127.0.0.1:{port}", idle_timeout=1, reply_within=0.5)
    async with listening(config, port):
        stalled = await Raw.open(port)
        await stalled.send(
            f"LHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<{address('s')}>\r\n".encode()
        )
        await stalled.send(b"DATA\r\n")
        assert [line[:3] for line in await stalled.replies(4)] == ["250", "250", "250", "354"]
        await stalled.send(message(11)[:100])  # and nothing more
        assert await stalled.closed() == []  # closed by the server, without a reply
        await stalled.close()
        after = await deliver(port, [address("t")], message(12))  # the listener serves on
    assert after.data[0][0] == 250
    assert [r.headers["X-Mailroom-Key"] for r in webhook.requests] == ["t"]


async def test_a_unix_socket_with_its_mode_replacing_a_stale_one(
    webhook: WebhookReceiver, tmp_path: Path
) -> None:
    path = tmp_path / "lmtp.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # left by a run that died: nothing listens on it
    config = lmtp_config(webhook.url, f"unix:{path}", socket_mode="0600")
    async with listening(config, path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        sent = await deliver(str(path), [address("u")], message(13))
    assert mode == 0o600
    assert sent.data[0][0] == 250
    assert not path.exists()  # removed when the socket was closed


@pytest.mark.slow  # a real process, or a thousand connections
async def test_a_thousand_idle_connections_and_the_next_one_gets_421(
    webhook: WebhookReceiver,
) -> None:
    """1,000 sessions opened and left idle: the listener still delivers at once, the one past
    max_connections is turned away with 421, and the count comes back to 0 when they go."""
    port, health = free_port(), free_port()
    config = lmtp_config(webhook.url, f"127.0.0.1:{port}", health_port=health, max_connections=1001)
    clients: list[Raw] = []
    try:
        async with listening(config, port):
            for _ in range(1000):
                clients.append(await Raw.open(port))
            sent = await deliver(port, [address("busy")], message(20))  # the 1,001st session
            for _ in range(2):  # the 1,001st again (the last one ended), then one too many
                clients.append(await Raw.open(port, greet=False))
            greetings = [(await c.line())[:9] for c in clients[-2:]]
            status = await readyz(health)
            for client in clients:
                await client.close()
            await wait_until(
                lambda: sessions_open(health, 0), what="every session closed", timeout=30
            )
    finally:
        for client in clients:
            client.writer.close()
    assert sent.data[0][0] == 250
    assert greetings == ["220 mx.ex", "421 4.3.2"]
    assert status["mailboxes"]["mx"]["sessions"] == 1001


async def readyz(port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/readyz"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body: dict[str, Any] = await response.json()
        return body


async def metrics(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


async def sessions_open(port: int, count: int) -> bool:
    return f'mailroom_lmtp_sessions_open{{mailbox="mx"}} {float(count)}' in await metrics(port)


async def test_health_and_metrics_per_listener(webhook: WebhookReceiver) -> None:
    port, health = free_port(), free_port()
    webhook.respond_for("no", 422, REJECT, JSON)
    async with listening(lmtp_config(webhook.url, f"127.0.0.1:{port}", health_port=health), port):
        status = await readyz(health)
        await deliver(port, [address("yes"), address("no"), "x@elsewhere.example"], message(21))
        text = await metrics(health)
    assert status["ready"] and status["mailboxes"]["mx"]["kind"] == "lmtp"
    assert status["mailboxes"]["mx"]["state"] == "connected"
    for line in (
        'mailroom_lmtp_transactions_total{mailbox="mx"} 1.0',
        'mailroom_lmtp_replies_total{code="250",mailbox="mx"} 1.0',
        'mailroom_lmtp_replies_total{code="550",mailbox="mx"} 2.0',  # one at RCPT, one after
        'mailroom_lmtp_replies_total{code="451",mailbox="mx"} 0.0',
        'mailroom_lmtp_reply_seconds_count{mailbox="mx"} 2.0',
    ):
        assert line in text, line
    assert 'mailroom_lmtp_sessions_total{mailbox="mx"}' in text


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


def start_process(
    processes: list[Process], webhook: WebhookReceiver, workdir: Path, port: int, **box: Any
) -> Process:
    shutdown_timeout = box.pop("shutdown_timeout", 10)
    data = config_dict([lmtp_box(f"127.0.0.1:{port}", **box)], webhook.url)
    data["shutdown_timeout"] = shutdown_timeout
    process = Process(data, workdir)
    processes.append(process)
    process.start()
    return process


@pytest.mark.slow  # a real process, or a thousand connections
async def test_sigterm_mid_transaction(
    webhook: WebhookReceiver, processes: list[Process], tmp_path: Path
) -> None:
    """SIGTERM: 421 to new sessions and idle ones; a delivery in flight and a transaction in
    the middle of its DATA both finish and get their 250; then exit 0."""
    port = free_port()
    process = start_process(processes, webhook, tmp_path, port)
    await wait_until(lambda: greets(port), what="the listener")
    webhook.stall()
    in_flight = asyncio.create_task(deliver(port, [address("a")], message(30)))
    await webhook.wait_for(1)
    mid_data = await Raw.open(port)
    raw = dotted(message(31))
    await mid_data.send(
        f"LHLO c\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<{address('b')}>\r\nDATA\r\n".encode()
        + raw[:60]
    )
    assert (await mid_data.replies(4))[-1].startswith("354 ")
    idle = await Raw.open(port)
    await idle.send(b"LHLO c\r\n")
    await idle.replies(1)

    process.signal(signal.SIGTERM)
    assert (await idle.closed())[-1].startswith("421 4.3.2 ")
    late = await Raw.open(port, greet=False)
    assert (await late.closed()) == ["421 4.3.2 mailroom is shutting down; try again later"]
    await mid_data.send(raw[60:])  # the rest of an open transaction is taken
    await webhook.wait_for(2)
    webhook.release()
    after_data = await mid_data.closed()
    sent = await in_flight
    assert await process.wait() == 0
    for client in (mid_data, idle, late):
        await client.close()
    assert sent.data == [(250, f"2.0.0 {webhook.requests[0].headers['webhook-id']} delivered")]
    assert [line[:3] for line in after_data] == ["250", "421"]
    assert '"msg": "stopped (0 deliveries abandoned)"' in process.output()


@pytest.mark.slow  # a real process, or a thousand connections
async def test_sigterm_with_the_webhook_stalled_past_the_bound_answers_451(
    webhook: WebhookReceiver, processes: list[Process], tmp_path: Path
) -> None:
    port = free_port()
    process = start_process(processes, webhook, tmp_path, port, shutdown_timeout=1)
    await wait_until(lambda: greets(port), what="the listener")
    webhook.stall()
    in_flight = asyncio.create_task(deliver(port, [address("a")], message(32)))
    await webhook.wait_for(1)
    process.signal(signal.SIGTERM)
    sent = await in_flight
    assert await process.wait() == 0
    webhook.release()
    assert sent.data[0][0] == 451  # the MTA keeps it, and delivers it again later
    assert "1 deliveries did not finish within" in process.output()


async def test_reload_keeps_the_socket_unless_listen_changed(
    webhook: WebhookReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGHUP: a changed max_recipients restarts the listener on the same socket (the same
    socket file); a changed listen moves it; a listen that cannot be bound refuses the reload."""
    first, second = tmp_path / "a.sock", tmp_path / "b.sock"
    data = config_dict([lmtp_box(f"unix:{first}")], webhook.url)
    stop, reload = asyncio.Event(), asyncio.Event()
    current = [data]

    def load() -> Config:
        return parse_config(copy.deepcopy(current[0]), env={})

    async def reloaded(change: dict[str, Any], count: int) -> None:
        box = {**current[0]["mailboxes"][0], **change}
        current[0] = {**current[0], "mailboxes": [box]}
        reload.set()
        await wait_until(
            lambda: (
                sum("config reloaded" in r.getMessage() for r in caplog.records) >= count
                or sum("reload refused" in r.getMessage() for r in caplog.records) >= 1
            ),
            what="the reload",
        )

    caplog.set_level(logging.INFO, logger="mailroom")
    task = asyncio.create_task(supervisor.run(load(), stop, kinds=KINDS, load=load, reload=reload))
    try:
        await wait_until(lambda: greets(first), what="the listener")
        inode = os.stat(first).st_ino
        await reloaded({"max_recipients": 1}, 1)
        await wait_until(lambda: greets(first), what="the listener again")
        kept = os.stat(first).st_ino
        narrowed = await deliver(str(first), [address("a"), address("b")], message(40))
        await reloaded({"listen": f"unix:{second}"}, 2)
        await wait_until(lambda: greets(second), what="the listener on the new socket")
        moved = await deliver(str(second), [address("c")], message(41))
        old_gone = not first.exists()
        blocker = tmp_path / "not-a-socket"
        blocker.write_text("x")
        await reloaded({"listen": f"unix:{blocker}"}, 3)
        still = await deliver(str(second), [address("d")], message(42))
    finally:
        stop.set()
        async with asyncio.timeout(30):
            assert await task == 0
    assert kept == inode
    assert [code for code, _ in narrowed.rcpt] == [250, 452]
    assert moved.data[0][0] == 250 and old_gone
    assert still.data[0][0] == 250
    refused = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert refused == [
        "reload refused, the running config stays: ConfigError: mailboxes[mx].listen: "
        f"{blocker} exists and is not a socket; remove it, or choose another path"
    ]


async def test_starttls_where_a_certificate_is_configured(
    webhook: WebhookReceiver, tmp_path: Path
) -> None:
    files = tls.write_server_cert(tmp_path)
    port = free_port()
    config = lmtp_config(
        webhook.url,
        f"127.0.0.1:{port}",
        tls_cert_file=str(files.cert),
        tls_key_file=str(files.key),
    )

    def over_tls() -> tuple[bool, bool, Sent]:
        client = smtplib.LMTP("127.0.0.1", port, timeout=30)
        try:
            client.ehlo("client.example.org")
            offered = client.has_extn("starttls")
            context = ssl.create_default_context(cafile=str(tls.ca_file()))
            client.starttls(context=context)  # verified against the test CA, as 127.0.0.1
            client.ehlo("client.example.org")
            again = client.has_extn("starttls")
            return offered, again, transaction(client, "s@example.org", [address("t")], message(50))
        finally:
            client.quit()

    async with listening(config, port):
        offered, again, sent = await asyncio.to_thread(over_tls)
    assert offered and not again  # offered before TLS, not inside it
    assert sent.data[0][0] == 250


async def test_mailroom_check_speaks_lhlo_and_tries_recipients(
    webhook: WebhookReceiver, tmp_path: Path
) -> None:
    port = free_port()
    config = lmtp_config(webhook.url, f"127.0.0.1:{port}")
    before: list[str] = []
    await check.run(
        config, path="x.yml", send_test=False, report=check.Report(before.append), kinds=KINDS
    )
    during: list[str] = []
    async with listening(config, port):
        ok = await check.run(
            config, path="x.yml", send_test=False, report=check.Report(during.append), kinds=KINDS
        )
    lmtp_lines = [line for line in during if "lmtp[mx]" in line]
    assert ok
    assert (
        lmtp_lines[0]
        == f"OK   lmtp[mx] listen: 127.0.0.1:{port} greets: mx.example.com mailroom LMTP"
    )
    assert lmtp_lines[1] == (
        "OK   lmtp[mx] lhlo: LHLO: PIPELINING, ENHANCEDSTATUSCODES, SIZE, 8BITMIME, SMTPUTF8"
    )
    assert re.fullmatch(
        r"OK   lmtp\[mx\] recipient: <incoming\+([0-9a-f]{32})@example.com> 250, routed to key "
        r"\1 \(Delivered-To\); other addresses 550 at RCPT",
        lmtp_lines[2],
    ), lmtp_lines[2]
    assert f"WARN lmtp[mx] listen: nothing listens on 127.0.0.1:{port} yet (is mailroom " in (
        "\n".join(before)
    )
    assert webhook.requests == []  # nothing was delivered


@pytest.mark.parametrize(
    ("box", "error"),
    [
        (
            {"listen": "0.0.0.0:2424"},
            "mailboxes[0].listen: '0.0.0.0' is not a loopback address, and the listener takes "
            "mail from whoever connects",
        ),
        ({"listen": "example.com:24"}, "'example.com' is not a loopback address"),
        ({"listen": "2424"}, "mailboxes[0].listen: '2424' is not host:port"),
        ({"listen": "::1:24"}, "'::1:24' is not host:port"),
        ({"listen": "127.0.0.1:99999"}, "listen: port 99999 is out of range; use a value from 0"),
        ({"listen": "unix:run/lmtp.sock"}, "is not an absolute path"),
        ({"listen": "127.0.0.1:24", "socket_mode": "0660"}, "socket_mode: is for a unix socket"),
        ({"host": "imap.example.com"}, "mailboxes[0].host: is a setting of a mailbox on a server"),
        ({"reply_within": 400}, "reply_within: must be shorter than idle_timeout (300s)"),
        ({"tls_cert_file": "/etc/hostname"}, "tls_key_file: is required with the other"),
        ({"max_recipients": 0}, "max_recipients: 0 is out of range"),
        ({"hostname": "bad host"}, "hostname: a text of 8 characters is not a host name"),
    ],
)
def test_config_errors_name_the_key_and_what_to_do(box: dict[str, Any], error: str) -> None:
    data = config_dict([lmtp_box(box.pop("listen", "127.0.0.1:2424"), **box)], "http://h/")
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={})
    assert error in str(caught.value)


def test_a_remote_listen_takes_allow_remote_and_advises_tls() -> None:
    data = config_dict([lmtp_box("0.0.0.0:2424", allow_remote=True)], "http://h/")
    config = parse_config(data, env={})
    assert config.warnings == (
        "mailboxes[0].allow_remote: mail crosses the network in clear text; set tls_cert_file "
        "and tls_key_file so the MTA can use STARTTLS",
    )


def test_two_listeners_on_one_address_is_an_error() -> None:
    data = config_dict([lmtp_box("127.0.0.1:24"), lmtp_box("127.0.0.1:24", id="b")], "http://h/")
    with pytest.raises(ConfigError, match=r"mailboxes\[1\].listen: 127.0.0.1:24 is mailboxes"):
        parse_config(data, env={})


async def test_a_listen_address_in_use_fails_the_start(webhook: WebhookReceiver) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = lmtp_config(webhook.url, f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=r"mailboxes\[mx\]\.listen: cannot listen on"):
            await supervisor.run(config, asyncio.Event(), kinds=KINDS)


async def test_the_gitlab_recipe_posts_to_gitlabs_internal_api(tmp_path: Path) -> None:
    """examples/gitlab/lmtp.yml: an LMTP listener delivering to GitLab's internal API (a
    stand-in that verifies the JWT as GitLab does), no IMAP mailbox anywhere."""
    key = os.urandom(32)
    secret_file = tmp_path / "gitlab_incoming_email_secret"
    secret_file.write_text(base64.b64encode(key).decode() + "\n")
    async with GitLabInternalApi({"incoming_email": key}) as gitlab:
        data = yaml.safe_load((ROOT / "examples" / "gitlab" / "lmtp.yml").read_text())
        port = free_port()
        data["mailboxes"][0]["listen"] = f"127.0.0.1:{port}"
        del data["mailboxes"][0]["socket_mode"]
        hook = data["webhook"]
        hook["url"] = hook["url"].replace("https://gitlab.example.com", gitlab.url)
        hook["jwt"]["secret_file"] = str(secret_file)
        config = parse_config(data, env={})
        raw = message(70, to="someone@example.org")  # the key is only in the envelope (Bcc)
        recipient = "incoming+gitlab-key-1@incoming.gitlab.example.com"
        async with listening(config, port):
            sent = await deliver(port, [recipient, "anything@incoming.gitlab.example.com"], raw)
            await gitlab.wait_for(2)
    assert [code for code, _ in sent.rcpt] == [250, 250]  # forward_all: GitLab decides
    assert [code for code, _ in sent.data] == [250, 250]
    first = gitlab.delivered[0]
    assert first.mailbox_type == "incoming_email"
    assert first.headers["Content-Type"] == "text/plain"
    # The message itself, with the Delivered-To line GitLab's receiver reads a key from.
    assert first.body == (
        f"Return-Path: <sender@example.org>\r\nDelivered-To: {recipient}\r\n".encode() + raw
    )


HEAD = b"From: a@example.org\r\nSubject: shapes\r\n\r\n"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"end of a sentence.\r\n",
        b".hidden\r\n..two\r\n.\r\n",  # lines that start with dots (and one that is a dot)
        b"a" * 100_000 + b"\r\nlast.\r\n",  # a long line
        (b"x" * 70 + b"\r\n") * 1000 + b"no dot line\r\n",  # 71 KB without a dot-CRLF
        b"ends with a dot.\r\n.\r\n.x\r\n",
    ],
)
async def test_data_comes_through_byte_for_byte(webhook: WebhookReceiver, body: bytes) -> None:
    port = free_port()
    config = lmtp_config(webhook.url, f"127.0.0.1:{port}")
    raw = HEAD + body
    async with listening(config, port):
        client = await Raw.open(port)
        await client.send(
            f"LHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<{address('s')}>\r\n".encode()
        )
        await client.send(b"DATA\r\n")
        assert (await client.replies(4))[-1].startswith("354")
        await client.send(dotted(raw) + b"QUIT\r\n")  # the next command right behind the dot
        replies = await client.replies(2)
        await client.close()
        (request,) = await webhook.wait_for(1)
    assert replies[0].startswith("250 2.0.0 msg_") and replies[1].startswith("221")
    assert raw_of(request).split(b"\r\n", 2)[2] == raw


async def test_with_replicas_every_replica_listens_without_a_lease(
    webhook: WebhookReceiver, redis_server: RedisServer
) -> None:
    """A listener is not leased: each replica listens (the MTA picks one) and counts it as
    ready; no lease is taken for it."""
    ports = [free_port(), free_port()]
    healths = [free_port(), free_port()]
    stops = [asyncio.Event(), asyncio.Event()]
    tasks = []
    for port, health, stop in zip(ports, healths, stops, strict=True):
        data = config_dict([lmtp_box(f"127.0.0.1:{port}")], webhook.url)
        data["health"] = {"listen": f"127.0.0.1:{health}"}
        data["arbitration"] = {"method": "redis", "url": redis_server.url, "lease_ttl": 3}
        config = parse_config(data, env={})
        tasks.append(asyncio.create_task(supervisor.run(config, stop, kinds=KINDS)))
    try:
        for port in ports:
            await wait_until(functools.partial(greets, port), what="each replica's listener")
        sent = [await deliver(port, [address(f"r{port}")], message(port)) for port in ports]

        async def both_ready() -> bool:
            bodies = [await readyz(health) for health in healths]
            return all(b["ready"] and b["mailboxes_ready"] == 1 for b in bodies)

        await wait_until(both_ready, what="both replicas ready")
        bodies = [await readyz(health) for health in healths]
    finally:
        for stop in stops:
            stop.set()
        async with asyncio.timeout(30):
            assert await asyncio.gather(*tasks) == [0, 0]
    assert [s.data[0][0] for s in sent] == [250, 250]
    assert all(b["arbitration"]["leases"] == 0 for b in bodies)


def test_mailroom_route_works_unchanged_and_names_the_bounce() -> None:
    config = lmtp_config("http://127.0.0.1:1/", "127.0.0.1:2424")
    (mailbox,) = config.mailboxes
    delivered = route.describe(message(80, to=address("k80")), mailbox, config)
    refused = route.describe(message(81, to="nobody@example.com"), mailbox, config)
    assert delivered[1:3] == ["matched:  To", "key:      k80"]
    assert refused[-2:] == [
        "decision: reject: unknown incoming email",
        "notice:   none: mailroom answers the sending MTA 5xx, and its bounce tells the sender",
    ]


async def test_copies_of_a_large_message_stay_within_the_budget(webhook: WebhookReceiver) -> None:
    """A copy per recipient: no more than limits.in_flight_bytes holds in one transaction. With
    SIZE declared the rest get 452 4.5.3 at RCPT; without, 452 4.3.1 after DATA; the MTA sends
    them again in its next transaction."""
    port = free_port()
    data = config_dict([lmtp_box(f"127.0.0.1:{port}")], webhook.url)
    data["limits"] = {"in_flight_bytes": 1 << 20}  # 1 MiB: two copies of 400 KB
    config = parse_config(data, env={})
    raw = message(95, size=400_000)
    to = [address("c1"), address("c2"), address("c3")]
    async with listening(config, port):
        declared = await deliver(port, to, raw, options=[f"SIZE={len(raw)}"])
        undeclared = await deliver(port, to, raw)
        await webhook.wait_for(4)
    assert [code for code, _ in declared.rcpt] == [250, 250, 452]
    assert declared.rcpt[2][1].startswith("4.5.3 ")
    assert [code for code, _ in declared.data] == [250, 250]
    assert [code for code, _ in undeclared.rcpt] == [250, 250, 250]
    assert [code for code, _ in undeclared.data] == [250, 250, 452]
    assert sorted(r.json()["key"] for r in webhook.requests) == ["c1", "c1", "c2", "c2"]


async def test_a_unix_socket_something_listens_on_is_not_taken_over(
    webhook: WebhookReceiver, tmp_path: Path
) -> None:
    path = tmp_path / "lmtp.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen()  # another mailroom, say
        config = lmtp_config(webhook.url, f"unix:{path}")
        with pytest.raises(ConfigError) as caught:
            await supervisor.run(config, asyncio.Event(), kinds=KINDS)
        assert path.exists()
    assert str(caught.value) == (
        f"mailboxes[mx].listen: something already listens on unix:{path} (another "
        "mailroom?); stop it, or choose another path"
    )


async def test_the_by_hand_script_prints_every_recipients_reply(webhook: WebhookReceiver) -> None:
    """examples/lmtp/send.py (docs/lmtp.md, "Try it by hand"): where smtplib.LMTP's sendmail
    reads only the first reply after DATA, it prints one per recipient, and its exit status
    says whether all were taken; the envelope sender defaults to the message's From."""
    webhook.respond_for("k2", 422, REJECT, JSON)
    port = free_port()
    script = str(ROOT / "examples" / "lmtp" / "send.py")
    raw = message(1)  # the same bytes twice: the same webhook-id for k1

    async def run(*args: str) -> tuple[int, list[str]]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            script,
            f"127.0.0.1:{port}",
            "-",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            out, _ = await process.communicate(raw)
        return await process.wait(), out.decode().splitlines()

    async with listening(lmtp_config(webhook.url, f"127.0.0.1:{port}"), port):
        status, lines = await run("--to", address("k1"))
        assert status == 0
        mixed, more = await run(
            "--to", address("k1"), "--to", "stranger@example.com", "--to", address("k2")
        )
    webhook_id = webhook.requests[0].headers["webhook-id"]
    assert lines == [
        f"RCPT <{address('k1')}>: 250 2.1.5 recipient ok",
        f"DATA <{address('k1')}>: 250 2.0.0 {webhook_id} delivered",
    ]
    assert webhook.requests[0].json()["from"]["address"] == "sender1@example.org"
    assert raw_of(webhook.requests[0]).startswith(b"Return-Path: <sender1@example.org>\r\n")
    assert mixed == 1
    assert more == [
        f"RCPT <{address('k1')}>: 250 2.1.5 recipient ok",
        "RCPT <stranger@example.com>: 550 5.1.1 <stranger@example.com>: no such recipient here",
        f"RCPT <{address('k2')}>: 250 2.1.5 recipient ok",
        f"DATA <{address('k1')}>: 250 2.0.0 {webhook_id} delivered",
        f"DATA <{address('k2')}>: 550 5.7.1 no such project",
    ]
