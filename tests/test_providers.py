"""examples/providers: every recipe loads with mailroom's own loader and says what its provider
needs (hosts, ports, TLS, Entra ID and Graph endpoints); the Postfix + Dovecot pair delivers a
message sent by Bcc from the Maildir Postfix writes, through a Dovecot running the recipe."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom.config import (
    Config,
    GoogleOAuthConfig,
    GraphMailboxConfig,
    ImapMailboxConfig,
    OAuthConfig,
    parse_config,
)
from tests.helpers import ROOT, running, wait_until
from tests.servers import tls
from tests.servers.dovecot import DOVECOT, Dovecot
from tests.servers.imap import Account, ImapServer
from tests.servers.webhook import WebhookReceiver
from tests.test_examples import env_used, with_secret_files

PROVIDERS = ROOT / "examples" / "providers"
POSTFIX_DOVECOT = PROVIDERS / "postfix-dovecot"
RECIPES = sorted(p.relative_to(PROVIDERS).as_posix() for p in PROVIDERS.rglob("*.yml"))
TENANT = "contoso.onmicrosoft.com"
ENV = {"AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000000"}

# recipe → (host, port, auth, address): every IMAP recipe uses implicit TLS, verified.
IMAP = {
    "gmail-app-password.yml": (
        "imap.gmail.com",
        993,
        "password",
        "gitlab-incoming+%{key}@gmail.com",
    ),
    "gmail-oauth.yml": (
        "imap.gmail.com",
        993,
        "xoauth2",
        "support+%{key}@example.com",
    ),
    "microsoft-365-imap-xoauth2.yml": (
        "outlook.office365.com",
        993,
        "xoauth2",
        "incoming+%{key}@example.com",
    ),
    "exchange-server.yml": (
        "exchange.example.com",
        993,
        "password",
        "incoming-%{key}@exchange.example.com",  # no plus addressing: a catch-all
    ),
    "postfix-dovecot/mailroom.yml": (
        "mail.example.com",
        993,
        "password",
        "incoming+%{key}@gitlab.example.com",
    ),
    "cyrus.yml": ("mail.example.com", 993, "password", "incoming+%{key}@gitlab.example.com"),
    "courier.yml": ("mail.example.com", 993, "password", "incoming+%{key}@gitlab.example.com"),
}
# recipe → (azure_ad_endpoint, graph_endpoint), as docs/microsoft.md's national clouds table has
# them.
GRAPH = {
    "microsoft-365-graph.yml": ("https://login.microsoftonline.com", "https://graph.microsoft.com"),
    "us-government-graph.yml": ("https://login.microsoftonline.us", "https://graph.microsoft.us"),
    "china-graph.yml": (
        "https://login.chinacloudapi.cn",
        "https://microsoftgraph.chinacloudapi.cn",
    ),
}


def data(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((PROVIDERS / name).read_text())
    return loaded


def build(raw: dict[str, Any], tmp_path: Path) -> Config:
    """The config as mailroom loads it, each secret file and ${...} given a value."""
    missing = env_used(raw) - set(ENV)
    assert not missing, f"${{...}} this test does not provide: {missing}"
    return parse_config(with_secret_files(raw, tmp_path), env=ENV, base_dir=tmp_path)


def test_every_recipe_is_checked_and_named_in_the_docs() -> None:
    assert set(RECIPES) == set(IMAP) | set(GRAPH)
    page = (ROOT / "docs" / "providers.md").read_text()
    for name in [*RECIPES, "postfix-dovecot/main.cf", "postfix-dovecot/dovecot-local.conf"]:
        assert f"examples/providers/{name}" in page, f"docs/providers.md does not name {name}"


@pytest.mark.parametrize("name", RECIPES)
def test_the_recipe_loads_cleanly(name: str, tmp_path: Path) -> None:
    config = build(data(name), tmp_path)
    assert config.warnings == ()
    (box,) = config.mailboxes
    assert box.webhook.url.startswith("https://")
    assert config.health is not None and config.health.host == "127.0.0.1"


@pytest.mark.parametrize("name", sorted(IMAP))
def test_imap_recipes_use_tls_on_the_providers_port(name: str, tmp_path: Path) -> None:
    (box,) = build(data(name), tmp_path).mailboxes
    assert isinstance(box, ImapMailboxConfig)
    host, port, auth, address = IMAP[name]
    assert (box.host, box.port, box.auth, box.routing.address.template) == (
        host,
        port,
        auth,
        address,
    )
    assert box.ssl and not box.start_tls and box.tls_verify
    assert box.delete_after_delivery and box.expunge_deleted
    assert box.failed_folder == "mailroom-failed"
    if auth == "xoauth2" and host == "imap.gmail.com":
        assert box.password is None and isinstance(box.oauth, GoogleOAuthConfig)
        assert box.oauth.scope == "https://mail.google.com/"
        assert box.oauth.token_uri == "https://oauth2.googleapis.com/token"
    elif auth == "xoauth2":
        assert box.password is None and isinstance(box.oauth, OAuthConfig)
        assert box.oauth.authority == f"https://login.microsoftonline.com/{TENANT}"
        assert box.oauth.scope == "https://outlook.office365.com/.default"
    else:
        assert box.password is not None and box.oauth is None


def test_gmail_sends_notices_through_gmail_with_the_same_app_password(tmp_path: Path) -> None:
    config = build(data("gmail-app-password.yml"), tmp_path)
    assert config.reject_notices is not None
    smtp = config.reject_notices.smtp
    assert (smtp.host, smtp.port, smtp.start_tls, smtp.ssl) == ("smtp.gmail.com", 587, True, False)
    (box,) = config.mailboxes
    assert isinstance(box, ImapMailboxConfig) and smtp.user == box.user
    assert smtp.password == box.password  # both the one app password file


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_graph_recipes_name_their_clouds_endpoints(name: str, tmp_path: Path) -> None:
    (box,) = build(data(name), tmp_path).mailboxes
    assert isinstance(box, GraphMailboxConfig)
    login, graph = GRAPH[name]
    options = box.inbox_options
    assert (options.azure_ad_endpoint, options.graph_endpoint) == (login, graph)
    assert options.oauth.authority == f"{login}/{TENANT}"
    assert options.oauth.scope == f"{graph}/.default"
    assert options.tls_verify and options.ca_file is None
    assert box.delete_after_delivery is False  # Graph deletes are soft, then purged
    page = (ROOT / "docs" / "microsoft.md").read_text()
    assert re.search(rf"\| `{re.escape(login)}` \| `{re.escape(graph)}` \|", page)


# -- Postfix + Dovecot ------------------------------------------------------------------------


def postfix_main_cf() -> dict[str, str]:
    """``name = value`` of main.cf (comments and blank lines aside, no continuation lines)."""
    settings = {}
    for line in (POSTFIX_DOVECOT / "main.cf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
    return settings


def dovecot_recipe(certs: tls.ServerCertFiles) -> str:
    """dovecot-local.conf, with the test's certificate in place of the server's."""
    text = (POSTFIX_DOVECOT / "dovecot-local.conf").read_text()
    text, certs_found = re.subn(r"(?m)^ssl_cert = <.*$", f"ssl_cert = <{certs.cert}", text)
    text, keys_found = re.subn(r"(?m)^ssl_key = <.*$", f"ssl_key = <{certs.key}", text)
    assert certs_found == keys_found == 1
    return text


def test_postfix_and_dovecot_agree_with_each_other_and_with_mailroom(tmp_path: Path) -> None:
    postfix = postfix_main_cf()
    dovecot = dict(
        (name.strip(), value.strip())
        for name, _, value in (
            line.partition("=")
            for line in (POSTFIX_DOVECOT / "dovecot-local.conf").read_text().splitlines()
            if "=" in line and not line.startswith("#")
        )
    )
    (box,) = build(data("postfix-dovecot/mailroom.yml"), tmp_path).mailboxes
    assert isinstance(box, ImapMailboxConfig)
    template = box.routing.address
    # The delimiter Postfix strips is the one before %{key}; the domain is delivered locally.
    assert template.prefix == f"{box.user}{postfix['recipient_delimiter']}"
    assert template.domain in [d.strip() for d in postfix["mydestination"].split(",")]
    # Postfix writes ~/Maildir/, Dovecot reads it there.
    assert postfix["home_mailbox"] == "Maildir/"
    assert dovecot["mail_location"] == f"maildir:~/{postfix['home_mailbox'].rstrip('/')}"
    assert int(postfix["message_size_limit"]) >= box.max_message_bytes
    assert dovecot["ssl"] == "required" and box.ssl and box.port == 993


def deliver_like_postfix(home: Path, home_mailbox: str, raw: bytes) -> Path:
    """Write ``raw`` into the user's Maildir as Postfix's local(8) does with ``home_mailbox =
    Maildir/``: the directories made on first delivery, the file written in tmp/, then renamed
    into new/ (the Maildir protocol: a reader never sees half a message)."""
    mail = os.stat(home)
    maildir = home / home_mailbox
    for sub in ("", "tmp", "new", "cur"):
        (maildir / sub).mkdir(mode=0o700, exist_ok=True)
        os.chown(maildir / sub, mail.st_uid, mail.st_gid)
    name = f"{time.time_ns()}.P{os.getpid()}.mail.example.com"
    tmp = maildir / "tmp" / name
    tmp.write_bytes(raw)
    os.chown(tmp, mail.st_uid, mail.st_gid)
    tmp.rename(maildir / "new" / name)
    return maildir


# As local(8) writes it (LF line ends; Delivered-To lowercased, the key with it): the message
# went to the team, and to incoming+<key>@ only by Bcc, so no header but Delivered-To and
# X-Original-To names our address.
POSTFIX_DELIVERED = b"""\
Return-Path: <alice@example.org>
X-Original-To: incoming+5e1f0a9c@gitlab.example.com
Delivered-To: incoming+5e1f0a9c@gitlab.example.com
Received: from mx.example.org (mx.example.org [192.0.2.10])
\tby mail.example.com (Postfix) with ESMTPS id 4Xb2kQ1vz9z9sWm
\tfor <incoming+5e1f0a9c@gitlab.example.com>; Sun, 22 Nov 2026 10:00:01 +0000 (UTC)
From: Alice <alice@example.org>
To: Team <team@example.org>
Subject: Re: the build is red
Message-ID: <bcc-1@example.org>
Date: Sun, 22 Nov 2026 10:00:00 +0000
Content-Type: text/plain; charset=utf-8

It is green again.
"""


@pytest.fixture
def recipe_dovecot(tmp_path: Path) -> Iterator[Dovecot]:
    """A private Dovecot running dovecot-local.conf (with the test's certificate)."""
    if not os.path.exists(DOVECOT):
        pytest.fail("dovecot is missing: run `make test` (it installs dovecot-imapd)")
    extra = "\n# examples/providers/postfix-dovecot/dovecot-local.conf\n"
    with Dovecot(extra_config=extra + dovecot_recipe(tls.write_server_cert(tmp_path))) as server:
        yield server


async def test_a_message_postfix_delivered_reaches_the_webhook_through_the_recipes_dovecot(
    recipe_dovecot: Dovecot, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    server = recipe_dovecot
    postfix = postfix_main_cf()
    raw = data("postfix-dovecot/mailroom.yml")
    (box,) = raw["mailboxes"]
    account = server.add_user(box["user"])
    home = server.root / "home" / account.user
    maildir = deliver_like_postfix(home, postfix["home_mailbox"], POSTFIX_DELIVERED)
    # The recipe as it is, pointed at this Dovecot and this webhook.
    box.update(host=server.host, port=server.tls_port, ca_file=str(server.ca_file))
    del box["password_file"]
    box["password"] = account.password
    raw["webhook"]["url"] = webhook.url
    del raw["health"]

    async def expunged() -> bool:
        return not any((maildir / "new").iterdir()) and not any((maildir / "cur").iterdir())

    async with running(build(raw, tmp_path)):
        (request,) = await webhook.wait_for(1)
        await wait_until(expunged, what="the message deleted and expunged")
    body = request.json()
    assert (body["key"], body["matched_header"]) == ("5e1f0a9c", "Delivered-To")
    assert body["subject"] == "Re: the build is red"
    assert body["text"].strip() == "It is green again."


# -- Cyrus and Courier -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cyrus", "courier"])
async def test_the_cyrus_and_courier_recipes_deliver_and_dead_letter_on_their_servers(
    name: str, request: pytest.FixtureRequest, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    """The recipe as written, only the server's address, CA and the account put in: a message
    is posted and expunged, a refused one lands in failed_folder (INBOX.mailroom-failed)."""
    server: ImapServer = request.getfixturevalue(name)  # the session's Cyrus or Courier
    account = server.add_user()
    raw = data(f"{name}.yml")
    (box,) = raw["mailboxes"]
    box.update(host=server.host, port=server.tls_port, ca_file=str(server.ca_file))
    box.update(user=account.user, password=account.password)
    del box["password_file"]
    raw["webhook"] = {"url": webhook.url, "retry": {"initial": 0.05, "max": 0.2}}
    del raw["health"]
    config = build(raw, tmp_path)
    to = "incoming+key1@gitlab.example.com"
    webhook.fail_next(1, status=400)
    for n in (1, 2):
        await server.aappend(account, message_to(n, to))
    async with running(config):
        await webhook.wait_for(2, timeout=30)
        failed = server.folder("mailroom-failed")
        assert failed == "INBOX.mailroom-failed"
        await wait_until(
            lambda: _moved(server, account, failed), what="one expunged, one dead-lettered"
        )


async def _moved(server: ImapServer, account: Account, failed: str) -> bool:
    return await server.aflags(account) == [] and len(await server.aflags(account, failed)) == 1


def message_to(n: int, to: str) -> bytes:
    return (
        f"From: a@example.org\r\nTo: {to}\r\nSubject: {n}\r\nMessage-ID: <{n}.{time.time_ns()}"
        "@example.org>\r\n\r\nHello\r\n"
    ).encode()
