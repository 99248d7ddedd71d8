"""Entra ID certificate credentials (``client_certificate_file``): msal signs a client
assertion (private_key_jwt, RFC 7523 §2.2) that the mock Entra ID verifies with the
certificate uploaded to the app; for Microsoft Graph and for IMAP XOAUTH2 (a real Dovecot)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import jwt
import pytest

from mailroom.config import parse_config
from tests.helpers import config_dict, mailbox_dict, message, running, wait_until
from tests.servers import tls
from tests.servers.dovecot import Dovecot
from tests.servers.entra import CLIENT_ASSERTION_TYPE, EntraGraph
from tests.servers.keys import KeyPair, key_pair
from tests.servers.webhook import WebhookReceiver

CLIENT = "cert-client"


@pytest.fixture
async def entra() -> AsyncIterator[EntraGraph]:
    async with EntraGraph() as mock:
        mock.certificates[CLIENT] = [key_pair("entra-app").certificate]
        yield mock


def pem_file(directory: Path, keys: KeyPair, name: str = "app.pem") -> str:
    """The PEM file an admin makes for the app: private key, then certificate."""
    path = directory / name
    path.write_text(keys.key_pem + keys.certificate_pem)
    path.chmod(0o600)
    return str(path)


def app_options(mock: EntraGraph, certificate_file: str, **more: Any) -> dict[str, Any]:
    return {
        "tenant_id": mock.tenant,
        "client_id": CLIENT,
        "client_certificate_file": certificate_file,
        "azure_ad_endpoint": mock.login_endpoint,
        "ca_file": str(tls.ca_file()),
        **more,
    }


def graph_mailbox(mock: EntraGraph, certificate_file: str) -> dict[str, Any]:
    options = app_options(mock, certificate_file, graph_endpoint=mock.graph_endpoint)
    return {
        "id": "graph",
        "inbox_method": "microsoft_graph",
        "address": "incoming+%{key}@example.com",
        "user": "incoming@contoso.onmicrosoft.com",
        "inbox_options": {**options, "poll_interval": 0.1},
    }


def assertion_was_used(mock: EntraGraph) -> dict[str, Any]:
    """The one token request's form: a client assertion, no secret; its JWT header."""
    (request,) = mock.of_kind("token")
    form = dict(parse_qsl(request.body.decode()))
    assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE and "client_secret" not in form
    assert request.status == 200
    return jwt.get_unverified_header(form["client_assertion"])


async def test_graph_with_a_certificate(
    entra: EntraGraph, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    entra.add_message(message(1))
    box = graph_mailbox(entra, pem_file(tmp_path, key_pair("entra-app")))
    async with running(parse_config(config_dict([box], webhook.url), env={})):
        (request,) = await webhook.wait_for(1)
    assert request.json()["subject"] == "test 1"
    header = assertion_was_used(entra)
    assert header["alg"] == "RS256" and "x5t" in header  # the SHA-1 thumbprint, computed


async def test_imap_xoauth2_with_a_certificate_and_its_thumbprint(
    entra: EntraGraph,
    dovecot_factory: Callable[..., Dovecot],
    webhook: WebhookReceiver,
    tmp_path: Path,
) -> None:
    oauth_dovecot = dovecot_factory(oauth2_introspection_url=entra.introspection_url)
    account = oauth_dovecot.add_user()
    entra.grants[CLIENT] = account.user
    await oauth_dovecot.aappend(account, message(1))
    keys = key_pair("entra-app")
    # An admin may paste the thumbprint as the portal shows it, or with colons (openssl).
    thumbprint = ":".join(keys.thumbprint[i : i + 2] for i in range(0, 40, 2)).lower()
    oauth = app_options(entra, pem_file(tmp_path, keys), client_certificate_thumbprint=thumbprint)
    box = mailbox_dict(oauth_dovecot, account, password=None, auth="xoauth2", oauth=oauth)
    async with running(parse_config(config_dict([box], webhook.url), env={})):
        (request,) = await webhook.wait_for(1)
    assert request.json()["subject"] == "test 1"
    assertion_was_used(entra)


async def test_a_certificate_the_app_does_not_have_is_said_clearly(
    entra: EntraGraph, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    other = key_pair("not-uploaded")
    box = graph_mailbox(entra, pem_file(tmp_path, other))

    async def refused() -> bool:
        return any(r.getMessage().startswith("graph: TokenError") for r in caplog.records)

    async with running(parse_config(config_dict([box], webhook.url), env={})):
        await wait_until(refused, what="the refusal")
    line = next(r for r in caplog.records if r.getMessage().startswith("graph: TokenError"))
    assert line.levelno == logging.ERROR
    text = line.getMessage()
    assert "invalid_client: AADSTS700027: The certificate with identifier used to sign" in text
    assert "the certificate must be uploaded to this app registration" in text
    assert "PRIVATE KEY" not in caplog.text and other.key_pem[40:80] not in caplog.text
