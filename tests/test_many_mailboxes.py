"""Many mailboxes in one process: isolation, shared limits, no herds (real Dovecot, real HTTP)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailroom.config import ConfigError, ImapMailboxConfig, parse_config
from mailroom.redact import origin
from tests.helpers import config_dict, mailbox_dict, message, running, wait_until
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.proxy import TcpServer, pump
from tests.servers.webhook import WebhookReceiver
from tests.test_reload import reloadable

pytestmark = pytest.mark.slow  # hundreds of mailboxes, or many at once


async def metrics(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(value for (metric, _), value in found.items() if metric == name)


async def all_seen(dovecot: Dovecot, account: Account, count: int) -> bool:
    stored = await dovecot.amessages(account)
    return len(stored) == count and all("\\Seen" in m.flags for m in stored)


# -- isolation --------------------------------------------------------------------------------


def test_a_ca_file_that_is_not_pem_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("this is not a certificate\n")
    box = {"address": "a+%{key}@example.com", "host": "h", "user": "u", "password": "p",
           "ssl": True, "ca_file": str(bad)}  # fmt: skip
    for where, data in (
        ("mailboxes[0].ca_file", config_dict([box], "http://127.0.0.1:1/")),
        (
            "webhook.ca_file",
            config_dict([{**box, "ca_file": None}], "https://h/", ca_file=str(bad)),
        ),
    ):
        with pytest.raises(ConfigError) as error:
            parse_config(data, env={})
        assert error.value.path == where
        assert "the file it names holds no PEM certificates" in str(error.value)
        assert "-----BEGIN CERTIFICATE-----" in str(error.value)
        assert str(bad) not in str(error.value)  # a *_file key's value is never printed


async def test_a_ca_file_broken_while_running_stops_only_its_own_mailbox(
    dovecot_factory: Callable[[], Dovecot],
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    healthy, broken = dovecot_factory(), dovecot_factory()
    good_account, bad_account = healthy.add_user(), broken.add_user()
    ca_copy = tmp_path / "ca.pem"
    ca_copy.write_bytes(broken.ca_file.read_bytes())
    port = free_port()
    config = config_dict(
        [
            mailbox_dict(healthy, good_account, id="good"),
            mailbox_dict(broken, bad_account, id="bad", ca_file=str(ca_copy)),
        ],
        webhook.url,
    )
    config["health"] = {"listen": f"127.0.0.1:{port}"}
    async with running(parse_config(config, env={})):
        await wait_until(lambda: _logged(caplog, "good: connected to"), what="good connected")
        await wait_until(lambda: _logged(caplog, "bad: connected to"), what="bad connected")
        ca_copy.write_text("overwritten by mistake\n")
        await asyncio.to_thread(broken.restart)  # the next connect needs the CA file again
        await wait_until(lambda: _logged(caplog, "bad: TlsConfigError"), what="the error")
        await healthy.aappend(good_account, message(1))
        await webhook.wait_for(1)
        await wait_until(lambda: all_seen(healthy, good_account, 1), what="good delivered")
        found = await metrics(port)
        assert found[("mailroom_source_restarts_total", frozenset({("mailbox", "bad")}))] >= 1
        assert found[("mailroom_source_restarts_total", frozenset({("mailbox", "good")}))] == 0
        assert found[("mailroom_mailbox_ready", frozenset({("mailbox", "good")}))] == 1
        assert found[("mailroom_mailbox_ready", frozenset({("mailbox", "bad")}))] == 0
        ca_copy.write_bytes(broken.ca_file.read_bytes())  # fixed: it recovers by itself
        await broken.aappend(bad_account, message(2))
        await webhook.wait_for(2, timeout=30)
    error = next(r for r in caplog.records if "bad: TlsConfigError" in r.getMessage())
    assert error.levelno == logging.ERROR and error.exc_info  # a traceback: it was unexpected
    assert "restarting in" in error.getMessage()
    assert [r.headers["X-Mailroom-Mailbox"] for r in webhook.requests] == ["good", "bad"]


async def test_a_reload_with_a_bad_ca_file_is_refused_and_the_old_config_keeps_delivering(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not PEM\n")
    data = config_dict([mailbox_dict(dovecot, account)], webhook.url)
    async with reloadable(data, caplog) as mailroom:
        await mailroom.logged("connected to", 1)
        mailroom.request(
            config_dict([mailbox_dict(dovecot, account, ca_file=str(bad))], webhook.url)
        )
        line = await mailroom.logged("reload refused", 1)
        assert "mailboxes[0].ca_file" in line and "cannot be used as a CA bundle" in line
        await dovecot.aappend(account, message(1))
        await webhook.wait_for(1)
        await wait_until(lambda: all_seen(dovecot, account, 1), what="delivered and seen")
    assert mailroom.count("connected to") == 1  # the running mailbox was never touched


# -- many at once -----------------------------------------------------------------------------


class CountingProxy(TcpServer):
    """A TCP proxy in front of Dovecot's plain port that counts the connections still logging
    in (from accept until the server confirms the SELECT) at the same time, and the IDLE
    commands the clients send."""

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port
        self.opening = 0
        self.most_opening = 0
        self.accepted = 0
        self.idles = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.opening += 1
        self.most_opening = max(self.most_opening, self.opening)
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        tail = [b"", b""]  # the end of the last chunk; "done" once the SELECT is confirmed

        def watch(data: bytes) -> None:
            if tail[1] != b"done" and b"[READ-WRITE]" in tail[0] + data:
                tail[1] = b"done"
                self.opening -= 1
            tail[0] = data[-16:]

        sent = [b""]  # the end of the client's last chunk

        def count(data: bytes) -> None:
            self.idles += (sent[0] + data).count(b" IDLE\r\n") - sent[0].count(b" IDLE\r\n")
            sent[0] = data[-16:]

        self.spawn(pump(reader, upstream_writer, count))
        self.spawn(pump(upstream_reader, writer, watch))


async def test_200_mailboxes_start_together_all_idle_without_a_connect_storm(
    dovecot_factory: Callable[[], Dovecot], webhook: WebhookReceiver
) -> None:
    server = dovecot_factory()
    accounts = [server.add_user() for _ in range(200)]
    async with CountingProxy(server.port) as proxy:
        boxes = [
            mailbox_dict(server, a, port=proxy.port, ssl=False, ca_file=None) for a in accounts
        ]
        config = config_dict(boxes, webhook.url)
        config["limits"] = {"connects": 4}
        async with running(parse_config(config, env={})):

            async def all_idle() -> bool:
                idle = {user for user, command in server.sessions() if command == "IDLE"}
                return idle == {a.user for a in accounts}

            await wait_until(all_idle, timeout=60, what="200 sessions in IDLE")
            assert proxy.accepted == 200  # one connection each, none retried
            assert 1 <= proxy.most_opening <= 4
            # Every mailbox works: one message to a few of them arrives.
            for account in accounts[::50]:
                await server.aappend(account, message(1))
            await webhook.wait_for(4)
    assert sorted(r.headers["X-Mailroom-Mailbox"] for r in webhook.requests) == sorted(
        a.user for a in accounts[::50]
    )


async def test_the_in_flight_budget_holds_across_mailboxes_during_a_webhook_outage(
    dovecot: Dovecot, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    accounts = [dovecot.add_user() for _ in range(5)]
    for account in accounts:
        await dovecot.aappend_many(account, [message(n) for n in range(10)])
    port = free_port()
    config = config_dict([mailbox_dict(dovecot, a) for a in accounts], webhook.url)
    config["limits"] = {"in_flight_messages": 12}
    config["health"] = {"listen": f"127.0.0.1:{port}"}
    webhook.respond(503)
    async with running(parse_config(config, env={})):

        async def held() -> bool:
            try:
                found = await metrics(port)
            except aiohttp.ClientConnectionError:  # not listening yet
                return False
            return total(found, "mailroom_fetched_total") == 12

        await wait_until(held, what="12 messages fetched")
        await wait_until(lambda: _logged(caplog, "failures in a row"), what="circuit open")
        during = len(webhook.requests)
        found = await metrics(port)
        assert total(found, "mailroom_in_flight_messages") == 12
        assert total(found, "mailroom_budget_waiting") >= 1
        assert (
            found[("mailroom_webhook_circuit_open", frozenset({("webhook", origin(webhook.url))}))]
            == 1
        )
        webhook.respond(200)

        async def everything_seen() -> bool:
            return all([await all_seen(dovecot, a, 10) for a in accounts])

        await wait_until(everything_seen, timeout=30, what="all 50 seen")
    delivered = webhook.delivered()
    assert len(delivered) == len(set(delivered)) == 50  # every message, none twice
    assert len(webhook.requests) - during <= 50 + 12  # the in-flight ones, then each once
    outage = [r.getMessage() for r in caplog.records if "failures in a row" in r.getMessage()]
    assert len(outage) == 1  # one line for the outage, not one per attempt
    assert sum("webhook attempt" in r.getMessage() for r in caplog.records) <= 5
    assert sum("answering again" in r.getMessage() for r in caplog.records) == 1


async def test_a_backlog_waiting_for_room_keeps_its_idle_instead_of_restarting_it(
    dovecot: Dovecot, webhook: WebhookReceiver
) -> None:
    # While the budget has no room, new mail (here: the periodic sweep every idle_timeout)
    # cannot be swept before the backlog; waking for it only restarted the IDLE, round trip
    # after round trip, until room came.
    account = dovecot.add_user()
    await dovecot.aappend_many(account, [message(n) for n in range(3)])
    webhook.stall()
    async with CountingProxy(dovecot.port) as proxy:
        box = mailbox_dict(dovecot, account, port=proxy.port, ssl=False, ca_file=None)
        config = config_dict([{**box, "idle_timeout": 1}], webhook.url)
        config["limits"] = {"in_flight_messages": 1}
        async with running(parse_config(config, env={})):
            await webhook.wait_for(1)  # it holds all the room; the other two wait for it
            idles = proxy.idles
            await asyncio.sleep(3)  # three idle_timeouts: the time is what is measured here
            idles = proxy.idles - idles
            webhook.release()
            await webhook.wait_for(3)
            await wait_until(lambda: all_seen(dovecot, account, 3), what="all three seen")
    assert idles <= 6  # one per idle_timeout; it was thousands


# -- semantics --------------------------------------------------------------------------------


async def test_409_means_the_receiver_already_has_it(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    webhook.respond(409, b'{"error": "duplicate webhook-id"}')
    await dovecot.aappend(account, message(1))
    async with running(
        parse_config(config_dict([mailbox_dict(dovecot, account)], webhook.url), env={})
    ):
        await webhook.wait_for(1)
        await wait_until(lambda: all_seen(dovecot, account, 1), what="settled as delivered")
    stored = await dovecot.amessages(account)
    assert "$MailroomFailed" not in stored[0].flags
    assert len(webhook.requests) == 1


async def test_search_command_all_does_not_post_settled_mail_again(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    await dovecot.aappend(account, message(1))
    box = mailbox_dict(dovecot, account, search_command="ALL", delete_after_delivery=False)
    async with running(parse_config(config_dict([box], webhook.url), env={})):
        await webhook.wait_for(1)
        await wait_until(lambda: all_seen(dovecot, account, 1), what="seen")
        await asyncio.to_thread(dovecot.restart)  # a reconnect sweeps the whole mailbox again
        await dovecot.aappend(account, message(2))  # found by a sweep after the reconnect
        await webhook.wait_for(2)
        await wait_until(lambda: all_seen(dovecot, account, 2), what="both seen")
    subjects = [r.json()["subject"] for r in webhook.requests]
    assert subjects == ["test 1", "test 2"]


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("mailbox", "failed_folder", "refused"),
    [("INBOX", "inbox", True), ("INBOX", "INBOX", True), ("Support", "support", False),
     ("Support", "Support", True)],
)  # fmt: skip
def test_a_failed_folder_may_not_be_the_watched_folder(
    mailbox: str, failed_folder: str, refused: bool
) -> None:
    box = {"address": "a+%{key}@example.com", "host": "h", "user": "u", "password": "p",
           "mailbox": mailbox, "failed_folder": failed_folder}  # fmt: skip
    data = config_dict([box], "http://127.0.0.1:1/")
    if not refused:  # IMAP names other than INBOX are case-sensitive: another folder
        parsed = parse_config(data, env={}).mailboxes[0]
        assert isinstance(parsed, ImapMailboxConfig) and parsed.failed_folder == failed_folder
        return
    with pytest.raises(ConfigError, match=r"failed_folder: is the folder this mailbox watches"):
        parse_config(data, env={})


@pytest.mark.parametrize(
    ("limits", "error"),
    [
        ({"connects": 1.5}, "limits.connects: expected a whole number, got 1.5"),
        ({"in_flight_bytes": 10}, "10 is out of range; use a value from 1048576 to 1099511627776"),
    ],
)
def test_limits_are_whole_numbers_said_plainly(limits: dict[str, Any], error: str) -> None:
    box = {"address": "a+%{key}@example.com", "host": "h", "user": "u", "password": "p"}
    data = config_dict([box], "http://127.0.0.1:1/")
    data["limits"] = limits
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={})
    assert error in str(caught.value)
