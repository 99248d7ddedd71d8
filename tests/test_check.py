"""``mailroom check``: every check against real servers on 127.0.0.1, good and broken."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from standardwebhooks.webhooks import Webhook

from mailroom import check
from mailroom.config import Config, parse_config
from mailroom.kinds import KINDS
from tests.helpers import ROOT, WHSEC, config_dict, mailbox_dict, message
from tests.servers import tls
from tests.servers.dovecot import Account, Dovecot
from tests.servers.entra import EntraGraph
from tests.servers.smtp import SmtpServer
from tests.servers.webhook import WebhookReceiver

GRAPH_USER = "incoming@contoso.onmicrosoft.com"
SMTP_PASSWORD = "smtp-Pa55-word-xyzzy"
JWT_SECRET = "jwt-secret-value-42-" + "x" * 12  # 32 bytes: RFC 7518 §3.2, no load warning
LINE = re.compile(r"^(OK|WARN|FAIL|SKIP) +\S+ [a-z_ ]+: .+$")


@pytest.fixture
async def entra() -> AsyncIterator[EntraGraph]:
    async with EntraGraph() as mock:
        yield mock


@pytest.fixture
def bare_dovecot() -> Iterator[Dovecot]:
    """A Dovecot that advertises none of IDLE, UIDPLUS and MOVE after login."""
    server = Dovecot(extra_config="imap_capability = IMAP4rev1 LITERAL+ NAMESPACE\n")
    server.start()
    try:
        yield server
    finally:
        server.close()


def notices(smtp: SmtpServer, **overrides: Any) -> dict[str, Any]:
    server: dict[str, Any] = {"host": smtp.host, "port": smtp.port, "timeout": 5}
    if smtp.mode != "plain":
        server.update(ssl=smtp.mode == "ssl", start_tls=smtp.mode == "start_tls")
        server["ca_file"] = str(tls.ca_file())
    if smtp.user is not None:
        server.update(user=smtp.user, password=smtp.password)
    server.update(overrides)
    return {"from": "Example <noreply@example.com>", "smtp": server}


def graph_mailbox(mock: EntraGraph, **options: Any) -> dict[str, Any]:
    inbox_options: dict[str, Any] = {
        "tenant_id": mock.tenant,
        "client_id": "app-client",
        "client_secret": mock.clients["app-client"],
        "azure_ad_endpoint": mock.login_endpoint,
        "graph_endpoint": mock.graph_endpoint,
        "ca_file": str(tls.ca_file()),
    }
    inbox_options.update(options)
    return {
        "id": "graph",
        "inbox_method": "microsoft_graph",
        "address": "incoming+%{key}@example.com",
        "user": GRAPH_USER,
        "inbox_options": inbox_options,
    }


def build(
    mailboxes: list[dict[str, Any]],
    webhook_url: str,
    *,
    reject_notices: dict[str, Any] | None = None,
    **webhook: Any,
) -> Config:
    return parse_config(
        config_dict(mailboxes, webhook_url, reject_notices=reject_notices, **webhook), env={}
    )


async def run_check(config: Config, *, send_test: bool = False) -> dict[tuple[str, str], Any]:
    """Every result by (target, step), after checking that each line has the format."""
    lines: list[str] = []
    report = check.Report(lines.append)
    ok = await check.run(
        config, path="mailroom.yml", send_test=send_test, report=report, kinds=KINDS
    )
    assert ok == (report.count(check.Status.FAIL) == 0)
    assert all(LINE.match(line) for line in lines), lines
    results = {(r.target, r.step): r for r in report.results}
    assert len(results) == len(report.results)  # one line per check
    return results


def statuses(results: dict[tuple[str, str], Any], target: str) -> dict[str, str]:
    return {step: r.status for (name, step), r in results.items() if name == target}


IMAP_GOOD = {
    "tcp": "OK",
    "tls": "OK",
    "login": "OK",
    "mailbox": "OK",
    "idle": "OK",
    "uidplus": "OK",
    "move": "OK",
    "failed_folder": "OK",
    "unseen": "OK",
}


# -- IMAP ----------------------------------------------------------------------------------


async def test_all_good_imap_webhook_smtp_with_a_signed_test_event(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, smtp: SmtpServer
) -> None:
    await asyncio.to_thread(dovecot.create_mailbox, account, "Failed")
    box = mailbox_dict(dovecot, account, failed_folder="Failed")
    config = build([box], webhook.url, reject_notices=notices(smtp))
    results = await run_check(config, send_test=True)
    target = f"imap[{account.user}]"
    assert statuses(results, target) == IMAP_GOOD
    assert re.fullmatch(
        r"implicit TLS, TLSv1\.[23]; certificate for \S+ verified, issued by .+, "
        r"valid until \d{4}-\d\d-\d\d",
        results[target, "tls"].detail,
    )
    assert results[target, "login"].detail == f"logged in as {account.user} (password)"
    assert results[target, "failed_folder"].detail == "'Failed' exists"
    assert statuses(results, "address[" + account.user + "]") == {
        "template": "OK",
        "prefix": "OK",
        "round trip": "OK",
    }
    hook = f"webhook[http://127.0.0.1:{webhook.port}]"
    assert statuses(results, hook) == {"dns": "OK", "tcp": "OK", "tls": "OK", "test event": "OK"}
    (request,) = webhook.requests
    assert Webhook(WHSEC).verify(request.body, dict(request.headers)) == {"type": "mailroom.check"}
    assert request.headers["webhook-id"].startswith("check_")
    assert statuses(results, f"smtp[127.0.0.1:{smtp.port}]") == {
        "connect": "OK",
        "tls": "OK",
        "ehlo": "OK",
        "auth": "OK",
    }
    assert smtp.messages == []  # nothing was sent
    assert await dovecot.amessages(account) == []


async def test_wrong_password_fails_login_and_skips_what_depends_on_it(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    box = mailbox_dict(dovecot, account, password="not-the-password")
    results = await run_check(build([box], webhook.url))
    target = f"imap[{account.user}]"
    assert statuses(results, target) == {
        **dict.fromkeys(("tcp", "tls"), "OK"),
        "login": "FAIL",
        **dict.fromkeys(("mailbox", "idle", "uidplus", "move", "failed_folder", "unseen"), "SKIP"),
    }
    assert results[target, "login"].detail.startswith(f"login as {account.user} refused: ")
    assert results[target, "login"].detail.endswith("; check user and password")
    assert results[target, "mailbox"].detail == "skipped: login failed"
    assert "not-the-password" not in repr(results)


async def test_missing_mailbox_fails_but_the_capabilities_are_still_checked(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    box = mailbox_dict(dovecot, account, mailbox="Nope")
    results = await run_check(build([box], webhook.url))
    target = f"imap[{account.user}]"
    assert statuses(results, target) == {**IMAP_GOOD, "mailbox": "FAIL", "unseen": "SKIP"}
    assert results[target, "mailbox"].detail.startswith("cannot select mailbox 'Nope': ")


async def test_missing_failed_folder_is_created(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    box = mailbox_dict(dovecot, account, failed_folder="Dead letters/mailroom")
    results = await run_check(build([box], webhook.url))
    detail = results[f"imap[{account.user}]", "failed_folder"].detail
    assert (
        detail
        == "'Dead letters/mailroom' did not exist; created it (as the first dead letter would)"
    )
    assert "Dead letters/mailroom" in await asyncio.to_thread(dovecot.mailboxes, account)
    again = await run_check(build([box], webhook.url))
    assert (
        again[f"imap[{account.user}]", "failed_folder"].detail == "'Dead letters/mailroom' exists"
    )


async def test_tls_with_an_untrusted_ca_fails_and_says_what_to_do(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    box = mailbox_dict(dovecot, account, ca_file=str(other_ca))
    results = await run_check(build([box], webhook.url))
    target = f"imap[{account.user}]"
    assert statuses(results, target)["tls"] == "FAIL"
    assert results[target, "tls"].detail == (
        f"TLS certificate of 127.0.0.1:{dovecot.tls_port} not trusted (unable to get local issuer "
        "certificate); set ca_file to the CA that signed it"
    )
    assert results[target, "login"].detail == "skipped: tls failed"


async def test_starttls_and_plain(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    starttls = mailbox_dict(dovecot, account, id="starttls", port=dovecot.port, ssl=False)
    starttls["start_tls"] = True
    plain = mailbox_dict(dovecot, account, id="plain", port=dovecot.port, ssl=False, ca_file=None)
    results = await run_check(build([starttls, plain], webhook.url))
    assert statuses(results, "imap[starttls]") == IMAP_GOOD
    assert results["imap[starttls]", "tls"].detail.startswith("STARTTLS, TLSv1.")
    plain_steps = {k: v for k, v in IMAP_GOOD.items() if k != "tls"} | {"connect": "WARN"}
    assert statuses(results, "imap[plain]") == plain_steps
    assert "clear text" in results["imap[plain]", "connect"].detail


async def test_server_down_fails_tcp_and_skips_the_rest(
    dovecot_factory: Callable[[], Dovecot], webhook: WebhookReceiver
) -> None:
    server = dovecot_factory()
    account = server.add_user()
    server.stop()
    results = await run_check(build([mailbox_dict(server, account)], webhook.url))
    target = f"imap[{account.user}]"
    assert statuses(results, target) == {"tcp": "FAIL"} | dict.fromkeys(
        ("tls", "login", "mailbox", "idle", "uidplus", "move", "failed_folder", "unseen"), "SKIP"
    )
    assert results[target, "tcp"].detail.startswith(
        f"cannot connect to 127.0.0.1:{server.tls_port}: Connection refused;"
    )
    assert results[target, "tls"].detail == "skipped: tcp failed"


async def test_unseen_messages_are_counted_by_decision_and_left_as_they_are(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    box = mailbox_dict(dovecot, account, id="inbox", delete_after_delivery=True)
    results = await run_check(build([box], webhook.url))
    assert results["imap[inbox]", "unseen"].detail == (
        "no messages match search_command UNSEEN: the first start finds none waiting"
    )
    auto = b"Auto-Submitted: auto-replied\r\n" + message(4, to="someone@example.net")
    raws = [
        message(1),
        message(2),
        message(3, to="alice@example.net"),  # a person's mail in the inbox: no key
        message(5, to="bob@example.net"),
        auto,
        message(6, size=40_000),  # over max_message_bytes below
    ]
    await dovecot.aappend_many(account, raws)
    await asyncio.to_thread(
        dovecot.append, account, message(7, to="x@example.net"), "INBOX", "\\Seen"
    )
    before = await dovecot.amessages(account)
    box["max_message_bytes"] = 30_000
    results = await run_check(build([box], webhook.url))
    unseen = results["imap[inbox]", "unseen"]
    assert unseen.status == "WARN"
    assert unseen.detail == (
        "6 messages match search_command UNSEEN; the first start takes them on: "
        "2 posted to the webhook, 2 rejected (2 unknown incoming email), "
        "1 ignored as auto-generated (1 auto_submitted), 1 dead-lettered (1 too large); "
        "all but the dead letters are then deleted (delete_after_delivery: true). If people read "
        "this mailbox, give mailroom a mailbox of its own; `mailroom route -c FILE "
        "message.eml` shows the decision on one message"
    )
    assert await dovecot.amessages(account) == before  # nothing fetched as seen, nothing moved
    assert webhook.requests == []
    # search_command: ALL counts what a run would search: the unseen ones only (uid 7 is seen).
    box["search_command"] = "ALL"
    results = await run_check(build([box], webhook.url))
    assert results["imap[inbox]", "unseen"].detail.startswith(
        "6 messages match search_command ALL and are unseen (mailroom adds UNSEEN); "
    )

    other = dovecot.add_user()
    await dovecot.aappend_many(other, [message(n) for n in range(3)])
    box = mailbox_dict(dovecot, other, id="dedicated")
    results = await run_check(build([box], webhook.url))
    assert results["imap[dedicated]", "unseen"].status == "OK"
    assert results["imap[dedicated]", "unseen"].detail == (
        "3 messages match search_command UNSEEN; the first start takes them on: "
        "3 posted to the webhook; all are then marked read "
        "(delete_after_delivery: false)"
    )


async def test_missing_idle_uidplus_and_move_are_warnings_that_say_what_is_lost(
    bare_dovecot: Dovecot, webhook: WebhookReceiver
) -> None:
    account = bare_dovecot.add_user()
    box = mailbox_dict(bare_dovecot, account, idle_timeout=300)
    lines: list[str] = []
    report = check.Report(lines.append)
    assert await check.run(
        build([box], webhook.url), path="x", send_test=False, report=report, kinds=KINDS
    )
    target = f"imap[{account.user}]"
    warned = [line for line in lines if line.startswith("WARN")]
    assert warned == [
        f"WARN {target} idle: IDLE not advertised: mail will only be found by the periodic sweep, "
        "every 300s (idle_timeout)",
        f"WARN {target} uidplus: UIDPLUS not advertised: deleted messages are expunged only "
        "with expunge_deleted: true, and then by plain EXPUNGE, which also removes messages other "
        "clients marked \\Deleted",
        f"WARN {target} move: MOVE not advertised: dead letters are copied and the originals "
        "flagged \\Deleted: not atomic (a crash in between leaves a copy in both folders)",
    ]
    assert report.summary().startswith("mailroom check: all checks passed (")


async def test_xoauth2_token_and_login(entra: EntraGraph, webhook: WebhookReceiver) -> None:
    server = Dovecot(oauth2_introspection_url=entra.introspection_url)
    await asyncio.to_thread(server.start)
    try:
        account = server.add_user()
        entra.grants["app-client"] = account.user
        oauth = {
            "tenant_id": entra.tenant,
            "client_id": "app-client",
            "client_secret": entra.clients["app-client"],
            "azure_ad_endpoint": entra.login_endpoint,
            "ca_file": str(tls.ca_file()),
        }
        good = mailbox_dict(server, account, id="good", password=None, auth="xoauth2", oauth=oauth)
        bad = mailbox_dict(
            server,
            account,
            id="bad",
            password=None,
            auth="xoauth2",
            oauth={**oauth, "client_secret": "wrong-secret"},
        )
        results = await run_check(build([good, bad], webhook.url))
    finally:
        await asyncio.to_thread(server.close)
    assert statuses(results, "imap[good]") == {**IMAP_GOOD, "oauth token": "OK"}
    assert results["imap[good]", "login"].detail == f"logged in as {account.user} (XOAUTH2)"
    assert statuses(results, "imap[bad]") == {"tcp": "OK", "oauth token": "FAIL"} | dict.fromkeys(
        ("tls", "login", "mailbox", "idle", "uidplus", "move", "failed_folder", "unseen"), "SKIP"
    )
    assert "invalid_client" in results["imap[bad]", "oauth token"].detail
    assert "wrong-secret" not in repr(results)


# -- Microsoft Graph -------------------------------------------------------------------------


async def test_graph_token_folder_and_patch_change_nothing(
    entra: EntraGraph, webhook: WebhookReceiver
) -> None:
    message_id = entra.add_message(message(1))
    entra.messages[message_id].categories = ["Blue"]
    results = await run_check(build([graph_mailbox(entra)], webhook.url))
    assert statuses(results, "graph[graph]") == {
        "token": "OK",
        "folder": "OK",
        "patch": "OK",
        "unread": "OK",
    }
    assert results["graph[graph]", "folder"].detail == (
        f"users/{GRAPH_USER}/mailFolders/inbox readable (at least one unread message)"
    )
    (patch,) = entra.of_kind("patch")
    assert json.loads(patch.body) == {"categories": ["Blue"]}
    stored = entra.messages[message_id]
    assert (stored.is_read, stored.categories, stored.folder) == (False, ["Blue"], "inbox")


async def test_graph_wrong_secret_patch_refused_and_empty_folder(
    entra: EntraGraph, webhook: WebhookReceiver
) -> None:
    wrong = graph_mailbox(entra, client_secret="not-the-secret") | {"id": "wrong"}
    results = await run_check(build([wrong], webhook.url))
    assert statuses(results, "graph[wrong]") == {
        "token": "FAIL",
        "folder": "SKIP",
        "patch": "SKIP",
        "unread": "SKIP",
    }
    assert "invalid_client" in results["graph[wrong]", "token"].detail
    assert "check client_id and client_secret" in results["graph[wrong]", "token"].detail
    assert "not-the-secret" not in repr(results)

    results = await run_check(build([graph_mailbox(entra)], webhook.url))
    assert statuses(results, "graph[graph]") == {
        "token": "OK",
        "folder": "OK",
        "patch": "WARN",
        "unread": "OK",
    }
    assert results["graph[graph]", "patch"].detail.startswith("not tried: no unread message")

    entra.add_message(message(2))
    entra.fail_next("patch", status=403)
    results = await run_check(build([graph_mailbox(entra)], webhook.url))
    assert statuses(results, "graph[graph]") == {
        "token": "OK",
        "folder": "OK",
        "patch": "FAIL",
        "unread": "OK",
    }
    assert results["graph[graph]", "patch"].detail.endswith(
        "; grant the app Mail.ReadWrite and check its application access policy"
    )


async def test_graph_folder_not_readable(entra: EntraGraph, webhook: WebhookReceiver) -> None:
    box = graph_mailbox(entra) | {"user": "nobody@contoso.onmicrosoft.com"}
    entra.fail_next("list", status=404)
    results = await run_check(build([box], webhook.url))
    assert statuses(results, "graph[graph]") == {
        "token": "OK",
        "folder": "FAIL",
        "patch": "SKIP",
        "unread": "SKIP",
    }
    assert results["graph[graph]", "folder"].detail.endswith("; check user and mailbox")


async def test_graph_unread_messages_are_counted_by_decision_and_left_unread(
    entra: EntraGraph, webhook: WebhookReceiver
) -> None:
    entra.page_size = 2  # the listing is paged
    for raw in (message(1), message(2, to="someone@example.net"), message(3, size=5000)):
        entra.add_message(raw)
    box = graph_mailbox(entra) | {"max_message_bytes": 2048}
    results = await run_check(build([box], webhook.url))
    unread = results["graph[graph]", "unread"]
    assert (unread.status, unread.detail) == (
        "WARN",
        "3 messages are unread; the first start takes them on: 1 posted to the webhook, "
        "1 rejected (1 unknown incoming email), 1 dead-lettered (1 too large); all but the dead "
        "letters are then marked read (delete_after_delivery: false). If people read this "
        "mailbox, give mailroom a mailbox of its own; `mailroom route -c FILE message.eml` "
        "shows the decision on one message",
    )
    assert not any(m.is_read for m in entra.messages.values())
    assert webhook.requests == []


# -- webhook ---------------------------------------------------------------------------------


async def test_webhook_down_fails_tcp(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    await webhook.stop()
    results = await run_check(build([mailbox_dict(dovecot, account)], webhook.url), send_test=True)
    hook = f"webhook[http://127.0.0.1:{webhook.port}]"
    assert statuses(results, hook) == {
        "dns": "OK",
        "tcp": "FAIL",
        "tls": "SKIP",
        "test event": "SKIP",
    }
    assert "Connection refused" in results[hook, "tcp"].detail


async def test_webhook_answering_500_fails_the_test_event(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    webhook.respond(500)
    config = build([mailbox_dict(dovecot, account)], webhook.url)
    results = await run_check(config, send_test=True)
    hook = f"webhook[http://127.0.0.1:{webhook.port}]"
    assert results[hook, "test event"].status == "FAIL"
    assert results[hook, "test event"].detail == (
        "HTTP 500 to the signed test event (2xx expected); the receiver failed; see its logs"
    )
    results = await run_check(config)  # without --send-test nothing is posted
    assert results[hook, "test event"].status == "SKIP"
    assert len(webhook.requests) == 1


async def test_webhook_over_https_trusted_and_not(
    dovecot: Dovecot, account: Account, entra: EntraGraph, tmp_path: Path
) -> None:
    """The mock Graph is an HTTPS server on 127.0.0.1: a webhook URL that answers 404."""
    url = f"https://127.0.0.1:{entra.port}/hook?token=s3cr3t-in-query"
    box = mailbox_dict(dovecot, account)
    results = await run_check(build([box], url, ca_file=str(tls.ca_file())), send_test=True)
    hook = f"webhook[https://127.0.0.1:{entra.port}]"
    assert statuses(results, hook) == {"dns": "OK", "tcp": "OK", "tls": "OK", "test event": "FAIL"}
    assert results[hook, "test event"].detail.endswith("check the path of webhook.url")
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    results = await run_check(build([box], url, ca_file=str(other_ca)), send_test=True)
    assert statuses(results, hook) == {
        "dns": "OK",
        "tcp": "OK",
        "tls": "FAIL",
        "test event": "SKIP",
    }
    assert results[hook, "tls"].detail.startswith("certificate of 127.0.0.1 not trusted")
    assert results[hook, "tls"].detail.endswith("set webhook.ca_file to the CA that signed it")
    assert "s3cr3t" not in repr(results)


# -- SMTP ------------------------------------------------------------------------------------


async def test_smtp_down(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, smtp: SmtpServer
) -> None:
    smtp.stop()
    box = mailbox_dict(dovecot, account)
    results = await run_check(build([box], webhook.url, reject_notices=notices(smtp)))
    target = f"smtp[127.0.0.1:{smtp.port}]"
    assert statuses(results, target) == {
        "connect": "FAIL",
        "tls": "SKIP",
        "ehlo": "SKIP",
        "auth": "SKIP",
    }
    assert results[target, "connect"].detail.startswith(f"127.0.0.1:{smtp.port}: ")
    assert results[target, "tls"].detail == "skipped: connect failed"


@pytest.mark.parametrize("mode", ["start_tls", "ssl"])
async def test_smtp_tls_with_auth_good_and_wrong_password(
    mode: str,
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp_factory: Callable[..., SmtpServer],
) -> None:
    smtp = smtp_factory(mode, user="mailroom", password=SMTP_PASSWORD)
    box = mailbox_dict(dovecot, account)
    target = f"smtp[127.0.0.1:{smtp.port}]"
    results = await run_check(build([box], webhook.url, reject_notices=notices(smtp)))
    assert statuses(results, target) == dict.fromkeys(("connect", "tls", "ehlo", "auth"), "OK")
    how = "implicit TLS" if mode == "ssl" else "STARTTLS"
    assert results[target, "tls"].detail.startswith(f"{how}, TLSv1.")
    assert results[target, "auth"].detail == "logged in as mailroom"
    wrong = notices(smtp, password="wrong-smtp-password")
    results = await run_check(build([box], webhook.url, reject_notices=wrong))
    assert statuses(results, target) == {"connect": "OK", "tls": "OK", "ehlo": "OK", "auth": "FAIL"}
    assert results[target, "auth"].detail.startswith("SMTPAuthenticationError: 535")
    assert "wrong-smtp-password" not in repr(results)


async def test_smtp_untrusted_certificate(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp_factory: Callable[..., SmtpServer],
    tmp_path: Path,
) -> None:
    smtp = smtp_factory("ssl")
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    box = mailbox_dict(dovecot, account)
    config = build([box], webhook.url, reject_notices=notices(smtp, ca_file=str(other_ca)))
    results = await run_check(config)
    target = f"smtp[127.0.0.1:{smtp.port}]"
    assert statuses(results, target) == {
        "connect": "OK",
        "tls": "FAIL",
        "ehlo": "SKIP",
        "auth": "SKIP",
    }
    assert "set reject_notices.smtp.ca_file" in results[target, "tls"].detail


# -- addresses -------------------------------------------------------------------------------


async def test_address_checks_long_prefix_and_dedicated_address(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver
) -> None:
    long_prefix = "a-very-long-incoming-mailbox-name+"  # 34 characters
    boxes = [
        mailbox_dict(dovecot, account, id="long", address=long_prefix + "%{key}@example.com"),
        mailbox_dict(dovecot, account, id="dedicated", address="support@example.com"),
    ]
    results = await run_check(build(boxes, webhook.url))
    assert statuses(results, "address[long]") == {
        "template": "OK",
        "prefix": "WARN",
        "round trip": "OK",
    }
    assert (
        "the local part before %{key} is 34 characters" in results["address[long]", "prefix"].detail
    )
    assert statuses(results, "address[dedicated]") == {"template": "OK", "round trip": "OK"}
    trip = results["address[dedicated]", "round trip"].detail
    assert re.fullmatch(r"reply id reply-([0-9a-f]{32})@example\.com → key \1 \(References\)", trip)
    assert not any(name == "config" and step == "advice" for name, step in results)


# -- the command -----------------------------------------------------------------------------


async def mailroom(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailroom",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_command_output_exit_codes_and_no_secrets(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    smtp_factory: Callable[..., SmtpServer],
    tmp_path: Path,
) -> None:
    smtp = smtp_factory("start_tls", user="mailroom", password=SMTP_PASSWORD)
    box = mailbox_dict(dovecot, account, id="incoming", failed_folder="Failed")
    data = config_dict([box], webhook.url, reject_notices=notices(smtp), jwt={"secret": JWT_SECRET})
    path = tmp_path / "mailroom.yml"
    path.write_text(yaml.safe_dump(data))
    code, out, err = await mailroom("check", "-c", str(path), "--send-test")
    assert code == 0, out + err
    lines = out.splitlines()
    assert [line.split(" ", 1)[0] for line in lines[:-1]] == ["OK"] * (len(lines) - 1), out
    assert all(LINE.match(line) for line in lines[:-1]), out
    steps = [re.sub(r"^OK +(\S+ [a-z_ ]+):.*$", r"\1", line) for line in lines[:-1]]
    hook, mail = f"webhook[http://127.0.0.1:{webhook.port}]", f"smtp[127.0.0.1:{smtp.port}]"
    assert steps == [
        "config load",
        *(f"address[incoming] {s}" for s in ("template", "prefix", "round trip")),
        *(f"imap[incoming] {s}" for s in IMAP_GOOD),
        *(f"{hook} {s}" for s in ("dns", "tcp", "tls", "test event")),
        *(f"{mail} {s}" for s in ("connect", "tls", "ehlo", "auth")),
    ]
    passed = len(lines) - 1
    summary = f"({passed} ok, 0 warning(s), 0 failed, 0 skipped)"
    assert lines[-1] == f"mailroom check: all checks passed {summary}"
    assert lines[0] == (
        f"OK   config load: {path}: 1 mailbox(es) (1 imap, 0 microsoft_graph, 0 lmtp), "
        "reject notices on"
    )
    (request,) = webhook.requests
    assert request.headers["Gitlab-Mailroom-Api-Request"].count(".") == 2
    for secret in (account.password, WHSEC, SMTP_PASSWORD, JWT_SECRET):
        assert secret not in out + err

    box["password"] = "wrong-password"
    path.write_text(yaml.safe_dump(config_dict([box], webhook.url)))
    code, out, err = await mailroom("check", "-c", str(path))
    assert code == 1
    assert "\nFAIL imap[incoming] login: login as " in out
    assert out.splitlines()[-1].startswith("mailroom check: some checks FAILED (")
    assert "wrong-password" not in out + err

    path.write_text(yaml.safe_dump({**config_dict([box], webhook.url), "surprise": 1}))
    code, out, err = await mailroom("check", "-c", str(path))
    assert code == 2
    first, second = out.splitlines()
    assert first.startswith("FAIL config load: unknown key surprise; known keys here: ")
    assert second == "mailroom check: the config does not load; nothing else was checked"


async def test_a_plain_connection_to_a_tls_port_says_to_set_ssl(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each side waits for the other to speak first: no greeting, and a hint at ssl.
    monkeypatch.setattr("mailroom.check.mailboxes.SESSION_TIMEOUT_S", 1.0)
    box = mailbox_dict(dovecot, account, ssl=False, ca_file=None)
    assert box["port"] == dovecot.tls_port
    results = await run_check(build([box], webhook.url))
    target = f"imap[{account.user}]"
    assert statuses(results, target)["connect"] == "FAIL"
    assert results[target, "connect"].detail == (
        f"no IMAP greeting from 127.0.0.1:{dovecot.tls_port} in 1s; if this is a TLS port "
        "(993), set ssl: true (start_tls is for a plain port, 143)"
    )
