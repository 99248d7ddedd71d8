"""What Cyrus and Courier showed that Dovecot did not (issue 21), on the real servers: folder
names against the server's hierarchy (item 3), 8-bit credentials (item 4), IDLE that does not
push (item 2), a push's round trips without SEARCHRES (item 5), and Cyrus's cap on keywords
(item 1)."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from mailroom.config import ImapMailboxConfig, parse_config
from mailroom.sources import imap
from mailroom.sources.imap_session import ImapSession
from mailroom.sources.imap_wire import FetchedMessage
from tests.helpers import config_dict, mailbox_dict, message, running, wait_until
from tests.servers.dovecot import free_port
from tests.servers.imap import Account, ImapServer
from tests.servers.proxy import TcpRelay
from tests.servers.webhook import WebhookReceiver
from tests.test_check import run_check
from tests.test_health import Probe, value, with_health
from tests.test_redrive import cli

SEEN = frozenset({"\\Seen"})
SEEN_FAILED = frozenset({"$MailroomFailed", "\\Seen"})


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        yield client


async def flags_are(
    server: ImapServer, account: Account, expected: list[frozenset[str]], mailbox: str = "INBOX"
) -> bool:
    """The messages in ``mailbox`` have these flags (a dead letter's $MailroomId_ aside)."""
    flags = await server.aflags(account, mailbox)
    return [{f for f in each if not f.startswith("$MailroomId_")} for each in flags] == expected


# -- item 3: folder names against the server's hierarchy ----------------------------------------


@pytest.mark.parametrize("failed_folder", ["INBOX/Failed", "INBOX.Failed", "Failed/Mailroom"])
async def test_failed_folder_means_what_the_user_meant_on_every_server(
    failed_folder: str, imap_server: ImapServer, imap_account: Account, webhook: WebhookReceiver
) -> None:
    webhook.respond(400)
    await imap_server.aappend(imap_account, message(1))
    box = mailbox_dict(imap_server, imap_account, failed_folder=failed_folder)
    # INBOX/Failed and INBOX.Failed: under INBOX everywhere; Failed/Mailroom: a folder Failed
    # of the user's own, with Mailroom in it (INBOX.Failed.Mailroom on Cyrus and Courier).
    where = imap_server.folder(failed_folder.replace(".", "/"))
    async with running(parse_config(config_dict([box], webhook.url), env={})):
        await webhook.wait_for(1, timeout=30)
        await wait_until(lambda: flags_are(imap_server, imap_account, [frozenset()], where),
                         what=f"moved to {where}")  # fmt: skip
    assert await imap_server.aflags(imap_account) == []
    assert len(webhook.requests) == 1


# A folder each server refuses to create: a name Dovecot forbids; another user's folder on Cyrus
# (its "user." namespace: permission denied); the shared namespace on Courier (ACL "c" needed).
REFUSED = {"dovecot": "~Failed", "cyrus": "user.someone-else.Failed", "courier": "#shared.Failed"}


@pytest.mark.slow  # mailroom redrive as a process
async def test_a_failed_folder_refused_for_good_keeps_dead_letters_in_place_not_ready(
    imap_server: ImapServer,
    imap_account: Account,
    webhook: WebhookReceiver,
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    folder = REFUSED[imap_server.name]
    port = free_port()
    probe = Probe(session, port)
    box = mailbox_dict(imap_server, imap_account, failed_folder=folder, idle_timeout=2)
    document = with_health(config_dict([box], webhook.url), port)
    webhook.respond(400)
    await imap_server.aappend(imap_account, message(1))
    async with running(parse_config(document, env={})):
        await webhook.wait_for(1, timeout=30)
        await wait_until(lambda: flags_are(imap_server, imap_account, [SEEN_FAILED]),
                         what="flagged $MailroomFailed in place")  # fmt: skip
        await wait_until(probe.not_ready, what="/readyz 503")
        _, body = await probe.get("/readyz")
        refused = body["mailboxes"][imap_account.user]["failed_folder_refused"]
        assert refused.startswith(f"failed_folder {folder!r} refused: ")
        assert "dead letters are flagged $MailroomFailed in INBOX instead" in refused
        assert value(
            await probe.metrics(), "mailroom_dead_letters_kept_in_place_total",
            mailbox=imap_account.user,
        ) == 1  # fmt: skip
        # Sweeps every 2 s (idle_timeout) find it no more: it is never posted again.
        await imap_server.aappend(imap_account, message(2))
        await webhook.wait_for(2, timeout=30)
        await wait_until(lambda: flags_are(imap_server, imap_account, [SEEN_FAILED] * 2),
                         what="the second one flagged too")  # fmt: skip
        code, out, _ = await cli(document, tmp_path, "--dry-run")
        assert code == 0 and "2 dead letter(s) would be redriven under their webhook-ids" in out
    assert [r.json()["subject"] for r in webhook.requests] == ["test 1", "test 2"]


# -- item 4: 8-bit credentials ------------------------------------------------------------------


@pytest.mark.parametrize(
    "password",
    [
        'p"a\\ss wörd',  # 8-bit: AUTHENTICATE PLAIN (Dovecot, Cyrus), a literal (Courier)
        'p"a\\ss w0rd',  # printable ASCII: a quoted string with its quotes escaped
        "日本語のパスワード",
    ],
)
async def test_a_password_is_sent_as_the_rfc_allows_and_logs_in(
    password: str, imap_server: ImapServer, webhook: WebhookReceiver
) -> None:
    # Implicit TLS, and STARTTLS on the plain port (Courier offers AUTH=PLAIN only over TLS).
    for tls_mode in ({"ssl": True}, {"ssl": False, "start_tls": True, "port": imap_server.port}):
        account = imap_server.add_user(password=password)
        await imap_server.aappend(account, message(1))
        box = mailbox_dict(imap_server, account, **tls_mode)
        async with running(parse_config(config_dict([box], webhook.url), env={})):
            delivered = functools.partial(flags_are, imap_server, account, [SEEN])
            await wait_until(delivered, what="delivered")
    assert len(webhook.requests) == 2


_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n")


def outside_literals(stream: bytes) -> bytes:
    """What an IMAP client sent, without the contents of its literals (RFC 3501 §4.3)."""
    out, position = bytearray(), 0
    while (found := _LITERAL.search(stream, position)) is not None:
        out += stream[position : found.end()]
        position = found.end() + int(found.group(1))
    return bytes(out + stream[position:])


async def test_8_bit_credentials_never_go_in_a_quoted_string(
    imap_server: ImapServer, webhook: WebhookReceiver
) -> None:
    password = 'pä\\ss "wörd"'
    account = imap_server.add_user(password=password)
    await imap_server.aappend(account, message(1))
    async with TcpRelay(imap_server.host, imap_server.port) as relay:
        box = mailbox_dict(imap_server, account, port=relay.port, ssl=False, ca_file=None)
        async with running(parse_config(config_dict([box], webhook.url), env={})):
            await wait_until(lambda: flags_are(imap_server, account, [SEEN]), what="delivered")
    sent = bytes(relay.sent)
    assert outside_literals(sent).isascii(), sent
    if imap_server.name != "courier":  # AUTH=PLAIN and SASL-IR
        plain = base64.b64encode(f"\0{account.user}\0{password}".encode())
        assert b" AUTHENTICATE PLAIN " + plain + b"\r\n" in sent
    else:  # Courier without TLS: LOGIN, the password a literal (no LITERAL+: synchronising)
        encoded = password.encode()
        assert f' LOGIN "{account.user}" {{{len(encoded)}}}\r\n'.encode() + encoded in sent


# -- item 2: IDLE without push ------------------------------------------------------------------

NO_PUSH = "the server advertises IDLE but did not push"


@pytest.mark.slow  # a whole idle_timeout, 12 s
@pytest.mark.parametrize("name", ["cyrus", "courier"])
async def test_idle_without_push_is_noticed_once_counted_and_asked_for(
    name: str,
    *,
    server_factory: Callable[..., ImapServer],
    webhook: WebhookReceiver,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stock Cyrus (no idled) and Courier (IMAP_ENHANCEDIDLE=0) advertise IDLE and never push:
    the periodic sweep finds the mail, the watcher warns once, counts it, and asks for new mail
    at every NO_PUSH_POLL_S from then on."""
    monkeypatch.setattr(imap, "PUSH_GRACE_S", 2.0)  # mail 2 s old at a sweep waited (not 10 s)
    monkeypatch.setattr(imap, "NO_PUSH_POLL_S", 1.0)
    server = server_factory(name, push=False)
    account = server.add_user()
    port = free_port()
    probe = Probe(session, port)
    idle_timeout = 12
    box = mailbox_dict(server, account, idle_timeout=idle_timeout)
    document = with_health(config_dict([box], webhook.url), port)
    async with running(parse_config(document, env={})):
        for n in range(3):  # until one lands in a quiet IDLE, not during a command
            await server.aappend(account, message(n))
            await webhook.wait_for(n + 1, timeout=idle_timeout + 15)
            seen = functools.partial(flags_are, server, account, [SEEN] * (n + 1))
            await wait_until(seen, what="seen")
            if logged(caplog, NO_PUSH):
                break
        (warning,) = logged(caplog, NO_PUSH)
        assert "Turn push on in the server (Cyrus: run idled; Courier: IMAP_ENHANCEDIDLE=1)" in (
            warning
        )
        metrics = await probe.metrics()
        assert value(metrics, "mailroom_idle_without_push_total", mailbox=account.user) == 1
        # Asked for every second now: well before the next periodic sweep (11-12 s away).
        for n in (10, 11):
            count = len(webhook.requests)
            await server.aappend(account, message(n))
            await webhook.wait_for(count + 1, timeout=idle_timeout / 2)
    assert len(logged(caplog, NO_PUSH)) == 1  # warned once


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.slow  # waits for a periodic sweep, 5 s
async def test_pushing_servers_are_not_taken_for_silent_ones(
    imap_server: ImapServer,
    imap_account: Account,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailroom.imap")
    monkeypatch.setattr(imap, "PUSH_GRACE_S", 2.0)
    box = mailbox_dict(imap_server, imap_account, idle_timeout=5)
    async with running(parse_config(config_dict([box], webhook.url), env={})):
        for n in range(3):
            await imap_server.aappend(imap_account, message(n))
            await webhook.wait_for(n + 1, timeout=30)
        sweeps = len(logged(caplog, "sweeping the whole mailbox"))
        await wait_until(
            lambda: len(logged(caplog, "sweeping the whole mailbox")) > sweeps,
            what="a periodic sweep after the pushes",
        )
    assert logged(caplog, NO_PUSH) == []


@pytest.mark.parametrize(
    ("name", "push", "status", "detail"),
    [
        ("courier", False, "WARN", "IDLE advertised, but Courier looks for new mail during IDLE"),
        ("courier", True, "OK", "IDLE advertised, and new mail is pushed (Courier's enhanced"),
        ("cyrus", False, "OK", "IDLE advertised (whether the server pushes is seen at run time"),
    ],
)
async def test_check_says_what_it_can_know_of_push_without_writing(
    name: str,
    push: bool,
    *,
    status: str,
    detail: str,
    server_factory: Callable[..., ImapServer],
    webhook: WebhookReceiver,
) -> None:
    server = server_factory(name, push=push)
    account = server.add_user()
    await server.aappend(account, message(1))
    before = await server.amessages(account)
    config = parse_config(
        config_dict([mailbox_dict(server, account, failed_folder="Failed")], webhook.url), env={}
    )
    results = await run_check(config)
    idle = results[f"imap[{account.user}]", "idle"]
    assert (idle.status, idle.detail[: len(detail)]) == (status, detail)
    folder = results[f"imap[{account.user}]", "failed_folder"]
    assert folder.detail == "'Failed' (INBOX.Failed on this server) did not exist; created it " + (
        "(as the first dead letter would)"
    )
    assert await server.amessages(account) == before  # nothing changed, not even \Recent


# -- item 5: a push in one round trip without SEARCHRES ----------------------------------------


async def test_pushed_mail_comes_with_its_body_in_one_round_trip_on_every_server(
    imap_server: ImapServer, imap_account: Account
) -> None:
    """DONE, the search over the new sequence numbers and their bodies, pipelined: with
    SEARCHRES (Dovecot) by ``$``, without it (Cyrus, Courier) by the sequence numbers EXISTS
    announced; a new message the search does not match is not handed out."""
    box = mailbox_dict(imap_server, imap_account)
    config = parse_config(config_dict([box], "http://127.0.0.1:9/"), env={}).mailboxes[0]
    assert isinstance(config, ImapMailboxConfig)
    session = await ImapSession.open(config, timeout_s=10)
    try:
        assert ("SEARCHRES" in session.capabilities) == (imap_server.name == "dovecot")
        seen, unseen = message(1), message(2, size=3000)
        await imap_server.aappend(imap_account, seen, flags="\\Seen")
        await imap_server.aappend(imap_account, unseen)
        found: list[FetchedMessage] = []
        for _ in range(2):  # the two may be announced in one push or in two
            assert await session.idle([asyncio.Event()], timeout_s=10) is False, "no push"
            session.new_mail.clear()
            pushed = await session.fetch_pushed("UNSEEN", max_count=8, body_bytes=2**20)
            assert pushed is not None
            found += pushed
            if session.exists == 2:
                break
        assert [(m.uid, m.size, m.body) for m in found] == [(2, len(unseen), unseen)]
        assert [m.uid for m in await session.search_sizes("ALL")] == [1, 2]
    finally:
        await session.logout()


# -- item 1: Cyrus's cap on keywords: no keyword per message ------------------------------------

DEAD_LETTERS = 300  # Cyrus lets clients create 100 user flags per mailbox


@pytest.mark.slow  # 600 posts and redrive as a process
async def test_300_dead_letters_on_cyrus_are_redriven_under_their_original_ids(
    cyrus: ImapServer, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    account = cyrus.add_user()
    box = mailbox_dict(cyrus, account, failed_folder="Failed", idle_timeout=600)
    document = config_dict([box], webhook.url)
    webhook.respond(400)
    await cyrus.aappend_many(account, [message(n) for n in range(DEAD_LETTERS)])
    failed = cyrus.folder("Failed")
    async with running(parse_config(document, env={})):
        first = await webhook.wait_for(DEAD_LETTERS, timeout=120)
        await wait_until(
            lambda: _count(cyrus, account, failed, DEAD_LETTERS), timeout=60, what="all moved"
        )
        ids = {r.json()["message_id"]: r.headers["webhook-id"] for r in first}
        webhook.respond(200)
        code, out, err = await cli(document, tmp_path)
        assert code == 0, out + err
        assert f"{DEAD_LETTERS} dead letter(s) redriven under their webhook-ids" in out
        again = (await webhook.wait_for(2 * DEAD_LETTERS, timeout=120))[DEAD_LETTERS:]
        await wait_until(
            lambda: _count(cyrus, account, "INBOX", DEAD_LETTERS), timeout=60, what="all back"
        )
    assert {r.json()["message_id"]: r.headers["webhook-id"] for r in again} == ids
    # The watched INBOX still takes a keyword from any other client (mail clients, Sieve).
    with cyrus.imap(account) as conn:
        conn.select("INBOX")
        typ, data = conn.uid("STORE", "1:*", "+FLAGS.SILENT", "($Label1)")
        assert typ == "OK", data


async def _count(server: ImapServer, account: Account, mailbox: str, count: int) -> bool:
    return len(await server.aflags(account, mailbox)) == count
