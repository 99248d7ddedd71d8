"""``mailroom redrive`` against Dovecot and the mock Graph, run as a real process beside a
running mailroom: dead-lettered by a 4xx, redriven, delivered again under the same webhook-id."""

from __future__ import annotations

import asyncio
import datetime
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml

from mailroom.config import parse_config
from mailroom.redrive.job import Job, Letter, Options, parse_since
from mailroom.sources.graph import FAILED_CATEGORY
from mailroom.sources.imap import idempotency_key
from mailroom.sources.imap_wire import id_keyword
from tests.helpers import ROOT, config_dict, mailbox_dict, message, running, wait_until
from tests.servers.dovecot import Account, Dovecot, quote_mailbox
from tests.servers.entra import EntraGraph
from tests.servers.redis import RedisServer
from tests.servers.webhook import WebhookReceiver
from tests.test_graph import graph_mailbox

FAILED = "Failed/Mailroom"
SEEN_FAILED = frozenset({"$MailroomFailed", "\\Seen"})
CLI_TIMEOUT_S = 60.0


@pytest.fixture
async def entra() -> AsyncIterator[EntraGraph]:
    async with EntraGraph() as mock:
        yield mock


async def cli(config: dict[str, Any], tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """``python -m mailroom redrive -c FILE args`` as a process (the event loop, and a
    mailroom running in it, go on meanwhile); exit code, stdout, stderr."""
    path = tmp_path / "mailroom.yml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailroom",
        "redrive",
        "-c",
        str(path),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TZ": "UTC"},
    )
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def flags(dovecot: Dovecot, account: Account, folder: str = "INBOX") -> list[frozenset[str]]:
    if folder not in dovecot.mailboxes(account):  # not created yet
        return []
    return [m.flags for m in dovecot.messages(account, folder)]


async def flags_are(
    dovecot: Dovecot, account: Account, expected: list[frozenset[str]], folder: str = "INBOX"
) -> bool:
    return await asyncio.to_thread(flags, dovecot, account, folder) == expected


def append(
    dovecot: Dovecot, account: Account, raw: bytes, *, to: str, flags: str, date: str
) -> int:
    """APPEND with flags and an internal date (``"01-Feb-2026 10:00:00 +0000"``); its UID."""
    with dovecot.imap(account) as conn:
        if to != "INBOX":
            conn.create(quote_mailbox(to))
        typ, data = conn.append(quote_mailbox(to), f"({flags})", f'"{date}"', raw)
        assert typ == "OK", data
    return dovecot.messages(account, to)[-1].uid


# -- IMAP: the whole flow with a running mailroom -------------------------------------------------


@pytest.mark.slow
async def test_flag_mode_dead_letter_is_delivered_again_under_its_webhook_id(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    # idle_timeout 600: the periodic sweep cannot be what finds the redriven message; the
    # flag change Dovecot pushes during IDLE is.
    document = config_dict([mailbox_dict(dovecot, account, idle_timeout=600)], webhook.url)
    webhook.respond(400)  # permanent: dead-letter
    uid = await dovecot.aappend(account, message(1))
    async with running(parse_config(document, env={})):
        first = (await webhook.wait_for(1))[0]
        await wait_until(lambda: flags_are(dovecot, account, [SEEN_FAILED]), what="$MailroomFailed")
        webhook.respond(200)
        code, out, err = await cli(document, tmp_path)
        second = (await webhook.wait_for(2, timeout=30))[1]
        await wait_until(
            lambda: flags_are(dovecot, account, [frozenset({"\\Seen"})]), what="delivered"
        )
    webhook_id = first.headers["webhook-id"]
    assert second.headers["webhook-id"] == webhook_id
    assert webhook_id == idempotency_key(account.user, dovecot.uidvalidity(account), uid)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{account.user}: uid {uid} in INBOX, received 20")
    assert lines[0].endswith(
        f"$MailroomFailed and \\Seen cleared; webhook-id {webhook_id} (its own)"
    )
    assert "<m1." in lines[0]
    assert lines[1].startswith(
        "mailroom redrive: 1 dead letter(s) redriven (1 with their own webhook-id, 0 with a new "
        "one); a running mailroom delivers them"
    )
    assert len(lines) == 2 and account.password not in out + err


@pytest.mark.slow
async def test_failed_folder_dead_letter_moves_back_and_keeps_its_webhook_id(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    box = mailbox_dict(dovecot, account, idle_timeout=600, failed_folder=FAILED)
    document = config_dict([box], webhook.url)
    webhook.respond(400)
    await dovecot.aappend(account, message(1))
    async with running(parse_config(document, env={})):
        first = (await webhook.wait_for(1))[0]
        webhook_id = first.headers["webhook-id"]
        keyword = frozenset({id_keyword(webhook_id)})
        await wait_until(lambda: flags_are(dovecot, account, [keyword], FAILED), what="moved")
        # Redriven while the webhook still refuses it: dead-lettered again, the same id kept.
        code, out, _ = await cli(document, tmp_path)
        assert code == 0 and f"moved back to INBOX; webhook-id {webhook_id} (its own)" in out
        second = (await webhook.wait_for(2, timeout=30))[1]
        await wait_until(lambda: flags_are(dovecot, account, [keyword], FAILED), what="again")
        webhook.respond(200)
        code, out, _ = await cli(document, tmp_path)
        assert code == 0
        third = (await webhook.wait_for(3, timeout=30))[2]
        await wait_until(
            lambda: flags_are(dovecot, account, [keyword | {"\\Seen"}]), what="delivered"
        )
    assert [r.headers["webhook-id"] for r in (first, second, third)] == [webhook_id] * 3
    assert flags(dovecot, account, FAILED) == []


# -- IMAP: which messages, and a dry run ---------------------------------------------------------


def dead_letters(dovecot: Dovecot, a: Account, b: Account) -> dict[str, str]:
    """Dead letters of mailbox a (flagged in INBOX, and in FAILED) and b, old and new, among
    other mail; the webhook-ids the id keywords carry, by age."""
    kept = {age: idempotency_key("earlier", 1, n) for n, age in enumerate(("new", "old"))}
    date = {"old": "15-Jan-2026 10:00:00 +0000", "new": "01-Mar-2026 09:30:00 +0100"}
    for n, (account, folder, flags, age) in enumerate(
        [
            (a, "INBOX", "$MailroomFailed \\Seen", "old"),
            (a, "INBOX", "$MailroomFailed \\Seen", "new"),
            (a, "INBOX", "\\Seen", "new"),  # delivered: not a dead letter
            (a, "INBOX", "", "new"),  # unseen: the watcher's, not redrive's
            (a, FAILED, id_keyword(kept["old"]), "old"),
            (a, FAILED, id_keyword(kept["new"]), "new"),
            (a, FAILED, "\\Seen", "new"),  # no id keyword (dead-lettered by an older mailroom)
            (a, FAILED, "\\Deleted", "new"),  # deleted by someone: left alone
            (b, "INBOX", "$MailroomFailed \\Seen", "new"),
        ],
        start=1,
    ):
        append(dovecot, account, message(n), to=folder, flags=flags, date=date[age])
    return kept


def state(dovecot: Dovecot, *accounts: Account) -> list[list[tuple[int, frozenset[str]]]]:
    return [
        [(m.uid, m.flags) for m in dovecot.messages(account, folder)]
        for account in accounts
        for folder in ("INBOX", FAILED)
        if folder in dovecot.mailboxes(account)
    ]


def two_mailboxes(dovecot: Dovecot, a: Account, b: Account, url: str) -> dict[str, Any]:
    boxes = [mailbox_dict(dovecot, x, id=i, failed_folder=FAILED) for i, x in (("a", a), ("b", b))]
    return config_dict(boxes, url)


@pytest.mark.slow
async def test_since_and_mailbox_choose_the_dead_letters(
    dovecot: Dovecot, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    a, b = dovecot.add_user(), dovecot.add_user()
    kept = await asyncio.to_thread(dead_letters, dovecot, a, b)
    document = two_mailboxes(dovecot, a, b, webhook.url)
    code, out, err = await cli(document, tmp_path, "--mailbox", "a", "--since", "2026-02-01")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4, out
    assert lines[0].startswith("a: uid 2 in INBOX, received 2026-03-01T08:30:00Z, <m2.")
    assert lines[1].endswith(f"moved back to INBOX; webhook-id {kept['new']} (its own)")
    assert "<m6." in lines[1]
    assert lines[2].endswith(
        "moved back to INBOX; a new webhook-id (it carries no $MailroomId keyword)"
    )
    assert lines[3] == (
        "mailroom redrive: 3 dead letter(s) received since 2026-02-01T00:00:00Z redriven "
        "(2 with their own webhook-id, 1 with a new one); a running mailroom delivers them at "
        "its next sweep or poll"
    )
    inbox = {m.raw.split(b"Subject: ")[1][:6]: m.flags for m in dovecot.messages(a)}
    assert inbox == {
        b"test 1": SEEN_FAILED,  # too old
        b"test 2": frozenset(),
        b"test 3": {"\\Seen"},
        b"test 4": frozenset(),
        b"test 6": {id_keyword(kept["new"])},
        b"test 7": frozenset(),
    }
    assert [m.flags for m in dovecot.messages(a, FAILED)] == [
        {id_keyword(kept["old"])},
        {"\\Deleted"},
    ]
    assert flags(dovecot, b) == [SEEN_FAILED]  # not chosen
    # Everything else (b, and a's older ones), without --since
    code, out, _ = await cli(document, tmp_path)
    assert code == 0
    assert out.splitlines()[-1].startswith("mailroom redrive: 3 dead letter(s) redriven (3 with")
    assert flags(dovecot, b) == [frozenset()]
    assert [m.flags for m in dovecot.messages(a, FAILED)] == [{"\\Deleted"}]


@pytest.mark.slow
async def test_a_dry_run_lists_them_and_changes_nothing(
    dovecot: Dovecot, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    a, b = dovecot.add_user(), dovecot.add_user()
    kept = await asyncio.to_thread(dead_letters, dovecot, a, b)
    before = state(dovecot, a, b)
    code, out, err = await cli(two_mailboxes(dovecot, a, b, webhook.url), tmp_path, "--dry-run")
    assert code == 0, out + err
    assert state(dovecot, a, b) == before
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == ["a"] * 5 + ["b"]
    assert lines[0].endswith(
        "would clear $MailroomFailed and \\Seen; webhook-id "
        f"{idempotency_key('a', dovecot.uidvalidity(a), 1)} (its own)"
    )
    assert f"would move back to INBOX; webhook-id {kept['old']} (its own)" in lines[2]
    assert lines[-1] == (
        "mailroom redrive: dry run: 6 dead letter(s) would be redriven (5 with their own "
        "webhook-id, 1 with a new one); nothing was changed"
    )


@pytest.mark.slow
async def test_redrive_deletes_the_dead_letter_markers_of_replicas(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, tmp_path: Path,
    redis_server: RedisServer,
) -> None:  # fmt: skip
    uid = await dovecot.aappend(account, message(1), flags="$MailroomFailed \\Seen")
    webhook_id = idempotency_key(account.user, dovecot.uidvalidity(account), uid)
    document = config_dict([mailbox_dict(dovecot, account)], webhook.url)
    document["arbitration"] = {"method": "redis", "url": redis_server.url}
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.set(f"mailroom:delivered:{webhook_id}", "dead_lettered")
        await client.set("mailroom:delivered:msg_other", "delivered")
        code, out, _ = await cli(document, tmp_path, "--dry-run")
        assert code == 0 and await client.exists(f"mailroom:delivered:{webhook_id}")
        code, out, _ = await cli(document, tmp_path)
        assert code == 0, out
        assert await client.exists(f"mailroom:delivered:{webhook_id}") == 0
        assert await client.get("mailroom:delivered:msg_other") == b"delivered"
    finally:
        await client.aclose()


# -- what goes wrong -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_bad_input_exits_2_and_a_mailbox_that_fails_exits_1_without_secrets(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    document = config_dict([mailbox_dict(dovecot, account)], webhook.url)
    code, _, err = await cli(document, tmp_path, "--mailbox", account.user + "x")
    assert code == 2 and f"did you mean {account.user}?" in err
    code, _, err = await cli(document, tmp_path, "--since", "yesterday")
    assert code == 2 and "--since 'yesterday' is not a date; give 2026-05-01" in err
    shared = config_dict(
        [
            mailbox_dict(dovecot, account, id="one", failed_folder="Failed"),
            mailbox_dict(dovecot, account, id="two", mailbox="Other", failed_folder="Failed"),
        ],
        webhook.url,
    )
    code, out, err = await cli(shared, tmp_path, "--mailbox", "one")
    assert code == 2 and out == ""
    assert "'Failed' is also the failed_folder of two on the same account" in err
    watched = config_dict(
        [
            mailbox_dict(dovecot, account, id="one", failed_folder="Other"),
            mailbox_dict(dovecot, account, id="two", mailbox="Other"),
        ],
        webhook.url,
    )
    code, out, err = await cli(watched, tmp_path, "--mailbox", "one")
    assert code == 2 and out == ""
    assert "'Other' is also the folder mailbox two watches on the same account" in err
    itself = config_dict([mailbox_dict(dovecot, account, failed_folder="inbox")], webhook.url)
    code, out, err = await cli(itself, tmp_path)
    assert code == 2 and out == ""
    assert "failed_folder: is the folder this mailbox watches (INBOX)" in err
    wrong = config_dict([mailbox_dict(dovecot, account, password="wrong")], webhook.url)
    code, out, err = await cli(wrong, tmp_path)
    assert code == 1
    assert f"{account.user}: FAILED: login as {account.user} refused" in out
    assert out.splitlines()[-1] == "mailroom redrive: no dead letters redriven"
    assert account.password not in out + err
    closed = config_dict([mailbox_dict(dovecot, account, port=1, ssl=False)], webhook.url)
    code, out, _ = await cli(closed, tmp_path)
    assert code == 1 and "FAILED: cannot connect to 127.0.0.1:1" in out


# -- Microsoft Graph -----------------------------------------------------------------------------


def graph_document(mock: EntraGraph, url: str, **overrides: Any) -> dict[str, Any]:
    return config_dict([graph_mailbox(mock, **overrides)], url)


@pytest.mark.parametrize("failed_folder", [None, "Dead letters"])
@pytest.mark.slow
async def test_graph_dead_letter_is_delivered_again_under_its_webhook_id(
    failed_folder: str | None, entra: EntraGraph, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    document = graph_document(entra, webhook.url, failed_folder=failed_folder)
    message_id = entra.add_message(message(1))
    webhook.respond(400)  # permanent: dead-letter
    async with running(parse_config(document, env={})):
        first = (await webhook.wait_for(1))[0]
        dead = entra.messages[message_id]
        if failed_folder is None:
            await entra.wait_for(lambda: dead.categories == [FAILED_CATEGORY], what="category")
            assert dead.is_read
        else:
            await entra.wait_for(lambda: dead.folder != "inbox", what="moved")
        webhook.respond(200)
        code, out, err = await cli(document, tmp_path)
        second = (await webhook.wait_for(2, timeout=30))[1]
        await entra.wait_for(lambda: dead.is_read, what="delivered and read")
    assert code == 0, err
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert (dead.folder, dead.categories) == ("inbox", [])
    done = (
        "category MailroomFailed removed, marked unread"
        if failed_folder is None
        else "marked unread, moved back to inbox"
    )
    where = "inbox" if failed_folder is None else failed_folder
    webhook_id, internet_id = first.headers["webhook-id"], first.json()["message_id"]
    assert out.splitlines()[0] == (
        f"graph: message {message_id[-12:]} in {where}, received 2026-01-01T00:00:00Z, "
        f"<{internet_id}>: {done}; webhook-id {webhook_id} (its own)"
    )


@pytest.mark.slow
async def test_graph_since_dry_run_and_other_categories(
    entra: EntraGraph, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    entra.folders["Dead letters"] = "AAMkFolderDead"
    ids = [
        entra.add_message(message(n), folder=folder, received=received)
        for n, (folder, received) in enumerate(
            [
                ("inbox", "2026-01-10T00:00:00Z"),
                ("inbox", "2026-03-10T00:00:00Z"),
                ("inbox", "2026-03-11T00:00:00Z"),  # read, no category: delivered
                ("AAMkFolderDead", "2026-01-10T00:00:00Z"),
                ("AAMkFolderDead", "2026-03-10T00:00:00Z"),
            ]
        )
    ]
    for index, message_id in enumerate(ids):
        entra.messages[message_id].is_read = True
        if index < 2:
            entra.messages[message_id].categories = ["Blue", FAILED_CATEGORY]
    document = graph_document(entra, webhook.url, failed_folder="Dead letters")
    code, out, err = await cli(document, tmp_path, "--since", "2026-02-01", "--dry-run")
    assert code == 0, err
    assert entra.of_kind("patch", "move") == []
    assert out.splitlines()[-1].startswith("mailroom redrive: dry run: 2 dead letter(s) received")
    code, out, err = await cli(document, tmp_path, "--since", "2026-02-01")
    assert code == 0, err
    state = [(m.folder, m.is_read, m.categories) for m in entra.messages.values()]
    assert state == [
        ("inbox", True, ["Blue", FAILED_CATEGORY]),
        ("inbox", False, ["Blue"]),
        ("inbox", True, []),
        ("AAMkFolderDead", True, []),
        ("inbox", False, []),
    ]


@pytest.mark.slow
async def test_a_server_refusing_the_id_keyword_still_gets_its_dead_letters_moved(
    webhook: WebhookReceiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Dovecot refuses keywords longer than mail_max_keyword_length with NO [CANNOT].
    with Dovecot(extra_config="mail_max_keyword_length = 20\n") as dovecot:
        account = dovecot.add_user()
        box = mailbox_dict(dovecot, account, failed_folder=FAILED)
        document = config_dict([box], webhook.url)
        webhook.respond(400)
        await dovecot.aappend(account, message(1))
        async with running(parse_config(document, env={})):
            await wait_until(
                lambda: flags_are(dovecot, account, [frozenset()], FAILED), what="moved"
            )
        code, out, _ = await cli(document, tmp_path)
    assert "could not keep its webhook-id in a keyword" in caplog.text
    assert code == 0
    assert "moved back to INBOX; a new webhook-id (it carries no $MailroomId keyword)" in out


@pytest.mark.slow
async def test_without_move_a_dead_letter_is_copied_back_and_its_original_deleted(
    webhook: WebhookReceiver, tmp_path: Path
) -> None:
    with Dovecot(extra_config="imap_capability = IMAP4rev1 LITERAL+ ENABLE\n") as dovecot:
        account = dovecot.add_user()
        webhook_id = idempotency_key("earlier", 1, 1)
        date = "01-Mar-2026 09:30:00 +0000"
        append(dovecot, account, message(1), to=FAILED, flags=id_keyword(webhook_id), date=date)
        document = config_dict([mailbox_dict(dovecot, account, failed_folder=FAILED)], webhook.url)
        code, out, _ = await cli(document, tmp_path)
        assert code == 0 and f"moved back to INBOX; webhook-id {webhook_id} (its own)" in out
        assert flags(dovecot, account) == [{id_keyword(webhook_id)}]
        # No UIDPLUS, expunge_deleted off: the original stays, deleted, and is not taken again.
        deleted = {id_keyword(webhook_id), "\\Seen", "\\Deleted"}
        assert flags(dovecot, account, FAILED) == [deleted]
        code, out, _ = await cli(document, tmp_path)
        assert code == 0 and out.splitlines()[0] == f"{account.user}: no dead letters"


# -- pure parts ----------------------------------------------------------------------------------


def test_since_takes_iso_dates_and_times() -> None:
    utc = datetime.UTC
    assert parse_since("2026-05-01T14:30+02:00") == datetime.datetime(
        2026, 5, 1, 12, 30, tzinfo=utc
    )
    assert parse_since(" 2026-05-01T14:30:00Z") == datetime.datetime(2026, 5, 1, 14, 30, tzinfo=utc)
    local = datetime.datetime(2026, 5, 1).astimezone()  # no zone: this machine's
    assert parse_since("2026-05-01") == local
    for bad in ("yesterday", "2026-13-01", "", "1 May 2026"):
        with pytest.raises(ValueError, match="is not a date"):
            parse_since(bad)


def test_a_line_never_carries_control_characters() -> None:
    lines: list[str] = []
    job = Job(Options(), lines.append)
    letter = Letter(
        where="uid 1 in INBOX",
        received=None,
        message_id="\x1b]0;owned\x07<x\u202e@example.org>" + "y" * 300,
        webhook_id=None,
    )
    asyncio.run(job.apply("box", [letter], lambda: asyncio.sleep(0), "done", "would"))
    assert lines[0].startswith("box: uid 1 in INBOX, received unknown, <?]0;owned?<x?@example.org")
    assert lines[0].isprintable() and "y" * 200 not in lines[0] and "…" in lines[0]
