"""IMAP XOAUTH2 with client-credentials tokens: against a real Dovecot whose oauth2 passdb asks
the mock identity provider's introspection endpoint (RFC 7662), and against a scripted server
that ends the session the way Exchange Online does when a token expires."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qsl

import pytest

from mailroom.config import ConfigError, ImapMailboxConfig, parse_config
from mailroom.errors import ImapAuthError
from mailroom.sources.imap_session import ImapSession
from tests.helpers import config_dict, mailbox_dict, message, running, wait_until
from tests.servers import tls
from tests.servers.dovecot import Account, Dovecot
from tests.servers.entra import EntraGraph
from tests.servers.webhook import WebhookReceiver

OUTLOOK_SCOPE = "https://outlook.office365.com/.default"


@pytest.fixture
async def entra() -> AsyncIterator[EntraGraph]:
    async with EntraGraph() as mock:
        yield mock


@pytest.fixture
def oauth_dovecot(entra: EntraGraph) -> Iterator[Dovecot]:
    """A private Dovecot with the oauth2 passdb (the session Dovecot stays as it is)."""
    server = Dovecot(oauth2_introspection_url=entra.introspection_url)
    server.start()
    try:
        yield server
    finally:
        server.close()


def oauth_block(mock: EntraGraph, **overrides: Any) -> dict[str, Any]:
    block: dict[str, Any] = {
        "tenant_id": mock.tenant,
        "client_id": "app-client",
        "client_secret": mock.clients["app-client"],
        "azure_ad_endpoint": mock.login_endpoint,
        "ca_file": str(tls.ca_file()),
    }
    block.update(overrides)
    return block


def xoauth2_config(
    server: Dovecot, account: Account, mock: EntraGraph, webhook_url: str, **overrides: Any
) -> Any:
    box = mailbox_dict(
        server, account, password=None, auth="xoauth2", oauth=oauth_block(mock), **overrides
    )
    return parse_config(config_dict([box], webhook_url), env={})


def imap_config(config: Any) -> ImapMailboxConfig:
    (box,) = config.mailboxes
    assert isinstance(box, ImapMailboxConfig)
    return box


async def all_seen(server: Dovecot, account: Account, count: int) -> bool:
    stored = await server.amessages(account)
    return len(stored) == count and all("\\Seen" in m.flags for m in stored)


@pytest.mark.slow
async def test_xoauth2_login_and_delivery(
    oauth_dovecot: Dovecot, entra: EntraGraph, webhook: WebhookReceiver
) -> None:
    account = oauth_dovecot.add_user()
    entra.grants["app-client"] = account.user
    await oauth_dovecot.aappend(account, message(1))
    async with running(xoauth2_config(oauth_dovecot, account, entra, webhook.url)):
        (request,) = await webhook.wait_for(1)
        await wait_until(lambda: all_seen(oauth_dovecot, account, 1), what="\\Seen")
    assert request.json()["subject"] == "test 1"
    (token,) = entra.of_kind("token")
    assert dict(_form(token.body))["scope"] == OUTLOOK_SCOPE
    introspected = entra.of_kind("introspect")
    assert introspected and all(r.status == 200 for r in introspected)


@pytest.mark.slow
async def test_token_the_provider_did_not_issue_is_refused(
    oauth_dovecot: Dovecot, entra: EntraGraph, webhook: WebhookReceiver
) -> None:
    account = oauth_dovecot.add_user()
    entra.grants["app-client"] = account.user
    config = imap_config(xoauth2_config(oauth_dovecot, account, entra, webhook.url))

    async def forged() -> str:
        return "eyJ0eXAi.forged.sig"

    # ImapAuthError, not ImapConnectionLost after timeout_s: the challenge was answered.
    with pytest.raises(ImapAuthError, match=f"XOAUTH2 as {account.user} refused"):
        await ImapSession.open(config, token=forged, timeout_s=60)
    assert [r.status for r in entra.of_kind("introspect")] == [200]


@pytest.mark.slow
async def test_token_for_another_mailbox_is_refused_and_said_clearly(
    oauth_dovecot: Dovecot,
    entra: EntraGraph,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    account = oauth_dovecot.add_user()
    entra.grants["app-client"] = "someone-else"  # the app may read another mailbox only
    await oauth_dovecot.aappend(account, message(1))
    async with running(xoauth2_config(oauth_dovecot, account, entra, webhook.url)):
        await wait_until(lambda: _logged(caplog, "XOAUTH2 as"), what="the refusal")
    assert webhook.requests == []
    assert "check the app's access to this mailbox" in caplog.text
    assert entra.clients["app-client"] not in caplog.text


@pytest.mark.slow
async def test_expired_token_leads_to_reauthentication(
    oauth_dovecot: Dovecot,
    entra: EntraGraph,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    account = oauth_dovecot.add_user()
    entra.grants["app-client"] = account.user
    async with running(xoauth2_config(oauth_dovecot, account, entra, webhook.url)):
        await wait_until(lambda: _logged(caplog, "connected to"), what="connected")
        (first,) = entra.tokens
        entra.revoke(first)  # expired at the provider; mailroom's copy still looks valid
        await asyncio.to_thread(oauth_dovecot.restart)  # the session ends; reconnect
        await oauth_dovecot.aappend(account, message(1))
        (request,) = await webhook.wait_for(1, timeout=15)
    assert len(entra.of_kind("token")) == 2
    assert _logged_sync(caplog, "refused or expired the access token; getting a new one")
    assert (first, False) in entra.introspected  # Dovecot asked, the provider said inactive
    assert entra.introspected[-1][1] is True
    assert request.json()["subject"] == "test 1"


async def test_bye_access_token_expired_refreshes_the_token_before_reconnecting(
    entra: EntraGraph, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    async with _ExchangeLike() as server:
        box = {
            "id": "exchange",
            "address": "incoming+%{key}@example.com",
            "host": "127.0.0.1",
            "port": server.port,
            "user": "incoming@example.com",
            "auth": "xoauth2",
            "oauth": oauth_block(entra),
        }
        config = parse_config(config_dict([box], webhook.url), env={})
        async with running(config):
            await server.second_login.wait()
    first, second = server.tokens
    assert first != second and len(entra.of_kind("token")) == 2
    assert _logged_sync(caplog, "AccessTokenExpired")


class _ExchangeLike:
    """Scripted IMAP: the first session ends with Exchange Online's ``* BYE ...
    AccessTokenExpired`` once IDLE starts; later sessions idle quietly."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.second_login = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> _ExchangeLike:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        capabilities = b"IMAP4rev1 AUTH=XOAUTH2 IDLE"
        writer.write(b"* OK [CAPABILITY " + capabilities + b"] ready\r\n")
        try:
            while line := await reader.readline():
                tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
                verb = rest.split(b" ")[0].upper()
                if verb == b"CAPABILITY":
                    writer.write(b"* CAPABILITY " + capabilities + b"\r\n")
                elif verb == b"AUTHENTICATE":
                    sasl = base64.b64decode(rest.split(b" ")[2]).decode()
                    self.tokens.append(sasl.split("auth=Bearer ")[1].rstrip("\x01"))
                    if len(self.tokens) == 2:
                        self.second_login.set()
                elif verb == b"SELECT":
                    writer.write(b"* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n")
                elif verb == b"UID":
                    writer.write(b"* SEARCH\r\n")
                elif verb == b"IDLE":
                    writer.write(b"+ idling\r\n")
                    if len(self.tokens) == 1:
                        writer.write(b"* BYE Session invalidated - AccessTokenExpired\r\n")
                        await writer.drain()
                        break
                    continue
                elif verb == b"LOGOUT":
                    writer.write(b"* BYE bye\r\n")
                writer.write(tag + b" OK done\r\n")
                await writer.drain()
        finally:
            writer.close()


def _form(body: bytes) -> list[tuple[str, str]]:
    return parse_qsl(body.decode())


def _logged_sync(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return _logged_sync(caplog, text)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"oauth": None}, "mailboxes[0].oauth: is required with auth: xoauth2"),
        ({"password": "pw"}, "mailboxes[0].password: auth: xoauth2 gets its token from the oauth"),
        ({"auth": "password", "password": "pw"}, "mailboxes[0].oauth: is used only with auth"),
    ],
)
def test_xoauth2_config_errors(change: dict[str, Any], error: str) -> None:
    box: dict[str, Any] = {
        "address": "incoming+%{key}@example.com",
        "host": "imap.example.com",
        "user": "incoming@example.com",
        "auth": "xoauth2",
        "oauth": {"tenant_id": "t", "client_id": "c", "client_secret": "s3cr3t"},
    }
    box.update(change)
    with pytest.raises(ConfigError) as caught:
        parse_config({"mailboxes": [box], "webhook": {"url": "https://app/x"}}, env={})
    assert str(caught.value).startswith(error)
    assert "s3cr3t" not in str(caught.value)
