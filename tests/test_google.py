"""Gmail and Google Workspace: IMAP XOAUTH2 with Google's tokens, end to end.

A real Dovecot whose oauth2 passdb asks the mock Google token endpoint's introspection (RFC
7662), mailroom's token providers talking HTTPS to that mock: a service account with
domain-wide delegation (the jwt-bearer grant, its signature verified) and an installed app's
refresh token."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from mailroom import check
from mailroom.config import GoogleOAuthConfig, ImapMailboxConfig, parse_config
from mailroom.errors import TokenError
from mailroom.kinds import KINDS
from mailroom.trust.google import GoogleTokenProvider
from mailroom.trust.providers import TokenProviders
from tests.helpers import config_dict, mailbox_dict, message, running, wait_until
from tests.servers import tls
from tests.servers.dovecot import Account, Dovecot
from tests.servers.google import (
    GMAIL_SCOPE,
    GOOGLE_AUDIENCE,
    JWT_BEARER,
    GoogleOAuth,
    InstalledApp,
    ServiceAccount,
    key_file_text,
)
from tests.servers.proxy import HttpProxy
from tests.servers.webhook import WebhookReceiver


@pytest.fixture
async def google() -> AsyncIterator[GoogleOAuth]:
    async with GoogleOAuth() as mock:
        yield mock


@pytest.fixture
def gmail(google: GoogleOAuth, dovecot_factory: Callable[..., Dovecot]) -> Dovecot:
    """A private Dovecot standing in for Gmail's IMAP: XOAUTH2 checked by the mock Google."""
    return dovecot_factory(oauth2_introspection_url=google.introspection_url)


def workspace_user(server: Dovecot, google: GoogleOAuth) -> Account:
    """A mailbox on ``server`` whose address is a user of the mock Workspace domain."""
    account = server.add_user(f"incoming-{secrets.token_hex(3)}@example.com")
    google.users.add(account.user)
    return account


def service_account_oauth(
    google: GoogleOAuth, account: ServiceAccount, directory: Path, **changes: Any
) -> dict[str, Any]:
    """``oauth:`` naming a key file for ``account`` written into ``directory``."""
    path = directory / f"{account.client_email}.json"
    path.write_text(key_file_text(account.key_file(google.token_uri, **changes)))
    path.chmod(0o600)
    return {"provider": "google", "service_account_file": str(path), "ca_file": str(tls.ca_file())}


def installed_app_oauth(
    google: GoogleOAuth, app: InstalledApp, refresh_token: str
) -> dict[str, Any]:
    return {
        "provider": "google",
        "client_id": app.client_id,
        "client_secret": app.client_secret,
        "refresh_token": refresh_token,
        "token_uri": google.token_uri,
        "ca_file": str(tls.ca_file()),
    }


def gmail_mailbox(
    server: Dovecot, account: Account, oauth: dict[str, Any], **more: Any
) -> dict[str, Any]:
    return mailbox_dict(server, account, password=None, auth="xoauth2", oauth=oauth, **more)


def google_oauth(oauth: dict[str, Any], user: str = "a@example.com") -> GoogleOAuthConfig:
    """The loaded ``oauth`` block of a Gmail mailbox of ``user``."""
    box = {"address": user, "host": "imap.gmail.com", "user": user, "auth": "xoauth2"}
    config = parse_config(config_dict([{**box, "oauth": oauth}], "https://app/hook"), env={})
    mailbox = config.mailboxes[0]
    assert isinstance(mailbox, ImapMailboxConfig) and isinstance(mailbox.oauth, GoogleOAuthConfig)
    return mailbox.oauth


async def deliver_one(
    server: Dovecot, account: Account, oauth: dict[str, Any], webhook: WebhookReceiver
) -> None:
    """A message appended to ``account``, mailroom run until the webhook has it."""
    await server.aappend(account, message(1))
    box = gmail_mailbox(server, account, oauth)
    async with running(parse_config(config_dict([box], webhook.url), env={})):
        (request,) = await webhook.wait_for(1)
    assert request.json()["subject"] == "test 1"


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


async def alogged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return logged(caplog, text)


async def test_a_service_account_acts_as_the_mailbox_user(
    gmail: Dovecot, google: GoogleOAuth, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    account = workspace_user(gmail, google)
    service = google.add_service_account()
    google.delegate(service)
    await deliver_one(gmail, account, service_account_oauth(google, service, tmp_path), webhook)
    (grant,) = google.of_kind("token")
    assert (grant.form["grant_type"], grant.status) == (JWT_BEARER, 200)
    claims = jwt.decode(grant.form["assertion"], options={"verify_signature": False})
    assert (claims["iss"], claims["sub"]) == (service.client_email, account.user)
    assert (claims["scope"], claims["aud"]) == (GMAIL_SCOPE, GOOGLE_AUDIENCE)
    assert jwt.get_unverified_header(grant.form["assertion"])["kid"] == service.key_id
    assert google.introspected and all(active for _, active in google.introspected)


async def test_an_installed_app_refresh_token_logs_in(
    gmail: Dovecot,
    google: GoogleOAuth,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    account = gmail.add_user(f"support-{secrets.token_hex(3)}@gmail.example")
    app = google.add_installed_app()
    refresh_token = google.grant(app, account.user)
    await deliver_one(gmail, account, installed_app_oauth(google, app, refresh_token), webhook)
    (grant,) = google.of_kind("token")
    assert grant.form["grant_type"] == "refresh_token" and grant.form["scope"] == GMAIL_SCOPE
    assert logged(
        caplog, f"new access token for {GMAIL_SCOPE} (valid 3599s, client {app.client_id})"
    )
    for secret in (app.client_secret, refresh_token, google.tokens.popitem()[0]):
        assert secret not in caplog.text


@pytest.mark.parametrize("kind", ["service_account", "installed_app"])
@pytest.mark.slow
async def test_a_refused_credential_says_what_to_fix_and_only_its_mailbox_suffers(
    gmail: Dovecot,
    google: GoogleOAuth,
    *,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    kind: str,
) -> None:
    good, bad = workspace_user(gmail, google), workspace_user(gmail, google)
    delegated, forgotten = google.add_service_account("good"), google.add_service_account("bad")
    google.delegate(delegated)
    app = google.add_installed_app()
    revoked = f"1//0g{secrets.token_urlsafe(40)}"  # never granted, or revoked since
    if kind == "service_account":
        oauth = service_account_oauth(google, forgotten, tmp_path)
        expected = (
            "unauthorized_client: Client is unauthorized to retrieve access tokens using this "
            "method, or client not authorized for any of the scopes requested.; in the Google "
            "Admin console (Security → Access and data control → API controls → Manage Domain "
            f"Wide Delegation) give client ID {forgotten.client_id} the scope {GMAIL_SCOPE}"
        )
    else:
        oauth = installed_app_oauth(google, app, revoked)
        expected = (
            "invalid_grant: Token has been expired or revoked.; the refresh token was revoked "
            "or has expired"
        )
    await gmail.aappend(good, message(1))
    await gmail.aappend(bad, message(2))
    boxes = [
        gmail_mailbox(gmail, bad, oauth, id="bad"),
        gmail_mailbox(gmail, good, service_account_oauth(google, delegated, tmp_path), id="good"),
    ]
    async with running(parse_config(config_dict(boxes, webhook.url), env={})):
        (request,) = await webhook.wait_for(1)
        await wait_until(lambda: alogged(caplog, "bad: TokenError"), what="the refusal")
    assert request.headers["X-Mailroom-Mailbox"] == "good"
    line = next(r for r in caplog.records if r.getMessage().startswith("bad: TokenError"))
    assert line.levelno == logging.ERROR
    assert expected in line.getMessage()
    for secret in (app.client_secret, revoked, "PRIVATE KEY", forgotten.keys.key_pem[40:80]):
        assert secret not in caplog.text
    (left,) = await gmail.amessages(bad)
    assert b"Subject: test 2" in left.raw and "\\Seen" not in left.flags  # untouched


@pytest.mark.slow
async def test_a_token_near_its_expiry_is_replaced_before_the_next_login(
    gmail: Dovecot, google: GoogleOAuth, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    google.token_lifetime_s = 2  # mailroom refreshes at half the lifetime when under 10 min
    account = workspace_user(gmail, google)
    service = google.add_service_account()
    google.delegate(service)
    box = gmail_mailbox(gmail, account, service_account_oauth(google, service, tmp_path))
    async with running(parse_config(config_dict([box], webhook.url), env={})):
        await google.wait_for(lambda: bool(google.introspected), what="the first login")
        (first,) = google.tokens
        await wait_until(lambda: _expired(google, first), what="the first token's expiry")
        await asyncio.to_thread(gmail.restart)  # the session ends; the next login needs a token
        await gmail.aappend(account, message(1))
        await webhook.wait_for(1, timeout=15)
    assert len(google.of_kind("token")) >= 2
    assert (first, False) not in google.introspected  # never offered once expired


async def _expired(google: GoogleOAuth, token: str) -> bool:
    return google.tokens[token].expires_at < time.monotonic()


@pytest.mark.slow
async def test_a_token_the_server_refuses_is_replaced(
    gmail: Dovecot,
    google: GoogleOAuth,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    account = workspace_user(gmail, google)
    app = google.add_installed_app()
    box = gmail_mailbox(
        gmail, account, installed_app_oauth(google, app, google.grant(app, account.user))
    )
    async with running(parse_config(config_dict([box], webhook.url), env={})):
        await google.wait_for(lambda: bool(google.introspected), what="the first login")
        (first,) = google.tokens
        google.revoke(first)  # Google ended it early; mailroom's copy still looks valid
        await asyncio.to_thread(gmail.restart)
        await gmail.aappend(account, message(1))
        await webhook.wait_for(1, timeout=15)
    assert len(google.of_kind("token")) == 2
    assert (first, False) in google.introspected
    assert logged(caplog, "refused or expired the access token; getting a new one")


# -- the provider on its own -----------------------------------------------------------------


async def test_tokens_are_cached_refreshed_and_invalidated(
    google: GoogleOAuth, tmp_path: Path
) -> None:
    service = google.add_service_account()
    google.delegate(service)
    google.users.add("a@example.com")
    oauth = google_oauth(service_account_oauth(google, service, tmp_path))
    provider = GoogleTokenProvider(oauth, label="a")
    try:
        first = await provider.token()
        assert await provider.token() == first and provider.acquisitions == 1
        provider.invalidate()
        second = await provider.token()
        assert second != first and provider.acquisitions == 2
    finally:
        provider.close()
    assert google.tokens[second].user == "a@example.com"
    assert "BEGIN" not in repr(provider) and service.client_email in repr(provider)


async def test_one_provider_per_credential_and_user(google: GoogleOAuth, tmp_path: Path) -> None:
    service = google.add_service_account()
    app = google.add_installed_app()
    refresh_token = google.grant(app, "c@example.com")
    account_oauth = service_account_oauth(google, service, tmp_path)
    a1, a2 = google_oauth(account_oauth), google_oauth(account_oauth)
    b = google_oauth(account_oauth, "b@example.com")
    c = google_oauth(installed_app_oauth(google, app, refresh_token), "c@example.com")
    providers = TokenProviders()
    try:
        assert providers.get(a1, label="a1") is providers.get(a2, label="a2")
        assert providers.get(b, label="b") is not providers.get(a1, label="a1")
        assert isinstance(providers.get(c, label="c"), GoogleTokenProvider)
        assert a1.subject == "a@example.com" and c.subject is None
    finally:
        providers.close()


@pytest.mark.parametrize(
    ("status", "answer", "expected"),
    [
        (400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
         "invalid_grant: Invalid JWT Signature.; the key was deleted or disabled"),
        (400, {"error": "invalid_grant", "error_description": "Invalid email or User ID"},
         "Invalid email or User ID; is a@example.com a user of the Workspace domain with Gmail?"),
        (200, {"token_type": "Bearer"}, "the answer holds no access_token and no OAuth error"),
        (200, {"access_token": "ya29.x", "expires_in": "soon"}, "unusable answer from"),
        (200, {"access_token": "ya29 x\x01user=me", "expires_in": 60}, "unusable answer from"),
        (400, {"detail": "<html>proxy says no</html>"}, "no access_token and no OAuth error"),
    ],
)  # fmt: skip
async def test_what_the_token_endpoint_answers_becomes_a_clear_error(
    google: GoogleOAuth, tmp_path: Path, status: int, answer: dict[str, Any], expected: str
) -> None:
    oauth = google_oauth(service_account_oauth(google, google.add_service_account(), tmp_path))
    google.fail_next(status, answer)
    provider = GoogleTokenProvider(oauth, label="a")
    try:
        with pytest.raises(TokenError) as caught:
            await provider.token()
    finally:
        provider.close()
    assert expected in str(caught.value)
    assert f"127.0.0.1:{google.port}" in str(caught.value)
    assert "BEGIN" not in str(caught.value) and "proxy says" not in str(caught.value)


async def test_a_token_endpoint_signed_by_an_unknown_ca_is_said_clearly(
    google: GoogleOAuth, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CURL_CA_BUNDLE", str(tls.ca_file()))  # curl's: requests would obey it
    app = google.add_installed_app()
    oauth = installed_app_oauth(google, app, google.grant(app, "a@example.com"))
    oauth.pop("ca_file")
    provider = GoogleTokenProvider(google_oauth(oauth), label="a")
    try:
        with pytest.raises(TokenError, match="not trusted; set ca_file to the CA that signed it"):
            await provider.token()
    finally:
        provider.close()
    assert google.of_kind("token") == []


@pytest.mark.slow
async def test_mailroom_check_gets_a_token_and_logs_in(
    gmail: Dovecot, google: GoogleOAuth, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    account = workspace_user(gmail, google)
    delegated, forgotten = google.add_service_account("good"), google.add_service_account("bad")
    google.delegate(delegated)
    boxes = [
        gmail_mailbox(
            gmail, account, service_account_oauth(google, delegated, tmp_path), id="good"
        ),
        gmail_mailbox(gmail, account, service_account_oauth(google, forgotten, tmp_path), id="bad"),
    ]
    report = check.Report(lambda line: None)
    config = parse_config(config_dict(boxes, webhook.url), env={})
    await check.run(config, path="mailroom.yml", send_test=False, report=report, kinds=KINDS)
    results = {(r.target, r.step): r for r in report.results}
    good, bad = results["imap[good]", "oauth token"], results["imap[bad]", "oauth token"]
    assert (good.status, good.detail) == (
        "OK",
        f"access token for {GMAIL_SCOPE} acquired "
        f"(service account {delegated.client_email} as {account.user})",
    )
    assert results["imap[good]", "login"].detail == f"logged in as {account.user} (XOAUTH2)"
    assert bad.status == "FAIL" and f"give client ID {forgotten.client_id}" in bad.detail


async def test_the_token_request_takes_the_oauth_blocks_proxy(google: GoogleOAuth) -> None:
    app = google.add_installed_app()
    oauth = installed_app_oauth(google, app, google.grant(app, "a@example.com"))
    async with HttpProxy() as proxy:
        config = google_oauth({**oauth, "proxy": proxy.url})
        provider = GoogleTokenProvider(config, label="a")
        try:
            await provider.token()
        finally:
            provider.close()
    assert proxy.targets() == [f"127.0.0.1:{google.port}"]
    assert all(line.startswith("CONNECT ") for line in proxy.seen)  # TLS end to end
