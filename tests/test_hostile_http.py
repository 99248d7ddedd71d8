"""Issue 18: a hostile Graph endpoint, webhook receiver or token endpoint costs its own mailbox
a failed poll or a retried post, bounded in memory, and never shows a secret.

``tests/servers/hostile_http.py`` misbehaves by mode; a healthy Dovecot mailbox runs beside the
hostile Graph mailbox in the same mailroom and keeps delivering.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import multidict
import pytest
import requests
from aiohttp.client_reqrep import ConnectionKey
from yarl import URL

from mailroom.config import parse_config
from mailroom.redact import error_text
from mailroom.trust.http import ANSWER_MAX_BYTES, HttpSession
from mailroom.trust.values import OAuthConfig
from tests.helpers import config_dict, logged, mailbox_dict, message, running, wait_until
from tests.servers import tls
from tests.servers.dovecot import Account, Dovecot
from tests.servers.entra import EntraGraph
from tests.servers.hostile_http import HostileHttp
from tests.servers.webhook import WebhookReceiver
from tests.test_graph import graph_mailbox
from tests.test_hostile_imap import PEAK_RSS_MIB, _status_kib, reset_peak_rss

SECRET = "s3cr3t-t0ken-in-the-query"


Healthy = tuple[Dovecot, Account, WebhookReceiver]


@pytest.fixture
def healthy(dovecot: Dovecot, account: Account, webhook: WebhookReceiver) -> Healthy:
    """The healthy mailbox beside the hostile one, and the webhook both post to."""
    return dovecot, account, webhook


@pytest.fixture
async def entra() -> AsyncIterator[EntraGraph]:
    async with EntraGraph() as mock:
        yield mock


# What each mode of a hostile Graph endpoint does to its mailbox (the log says so).
GRAPH_SIGNS = {
    "status_garbage": "ClientResponseError",
    "long_header": "ClientResponseError",
    "bad_chunk": "ClientResponseError",
    "huge_json": "the answer is larger than 4194304 bytes",
    "huge_error": "HTTP 500",
    "huge_length": "the answer is larger than 4194304 bytes",
    "deep_json": "nested deeper than 32 levels",
    "value_null": "Graph listed a message without a usable id; skipped",
    "value_string": "whose value is not a list",
    "dot_ids": None,  # both listed, fetched, posted and settled at %2E paths
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(GRAPH_SIGNS))
async def test_a_hostile_graph_endpoint_costs_its_own_mailbox_only(
    mode: str, entra: EntraGraph, healthy: Healthy, caplog: pytest.LogCaptureFixture
) -> None:
    dovecot, account, webhook = healthy
    caplog.set_level(logging.INFO, logger="mailroom")
    with HostileHttp(mode, tls=True) as graph:
        entra.scopes.add(f"{graph.url}/.default")  # the token is Entra's, the Graph hostile
        box = graph_mailbox(entra, inbox_options={"graph_endpoint": graph.url})
        boxes = [mailbox_dict(dovecot, account), box]
        config = parse_config(config_dict(boxes, webhook.url), env={})
        before_kib = reset_peak_rss()
        async with running(config):
            sign = GRAPH_SIGNS[mode]
            if sign is not None:
                await wait_until(lambda: bool(logged(caplog, sign)), timeout=30, what=sign)
            else:
                await wait_until(lambda: _graph_posts(webhook) == 2, what="the two dotted ids")
                await wait_until(lambda: _settled(graph) == 2, what="both settled")
            await dovecot.aappend(account, message(1))
            await wait_until(lambda: _posts(webhook, account.user) == 1, what="the healthy one")
        peak_mib = (_status_kib("VmHWM") - before_kib) / 1024
    assert peak_mib < PEAK_RSS_MIB, f"{mode}: peak RSS grew by {peak_mib:.0f} MiB"
    assert not logged(caplog, "restarting"), "a hostile endpoint is no bug of mailroom's"
    assert not [r for r in caplog.records if "Traceback" in r.getMessage()]
    paths = [path for _, path in graph.requests]
    assert not [p for p in paths if "/messages/../" in p or p.endswith("/messages/..")]
    if mode == "dot_ids":
        patched = {p.split("/messages/")[1] for m, p in graph.requests if m == "PATCH"}
        assert patched == {"%2E", "%2E%2E"}  # never a dot-segment: never the user itself
    if mode == "value_null":  # the one good item among the bad ones was fetched and posted
        assert next(p for p in paths if p.endswith("/$value")).split("/")[-2] == "AAM1"
    print(f"graph {mode}: peak RSS +{peak_mib:.1f} MiB")


def _posts(webhook: WebhookReceiver, mailbox: str) -> int:
    return sum(1 for r in webhook.requests if r.headers["X-Mailroom-Mailbox"] == mailbox)


def _graph_posts(webhook: WebhookReceiver) -> int:
    return _posts(webhook, "graph")


def _settled(graph: HostileHttp) -> int:
    return sum(1 for method, _ in graph.requests if method == "PATCH")


# -- webhook receivers ----------------------------------------------------------------------------

WEBHOOK_SIGNS = {
    "status_garbage": "ClientResponseError",
    "long_header": "ClientResponseError",
    "bad_chunk": "ClientResponseError",
    "huge_error": "HTTP 500",
    "huge_reject": "HTTP 422",
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(WEBHOOK_SIGNS))
async def test_a_hostile_receiver_costs_retries_and_shows_no_secret(
    mode: str, dovecot: Dovecot, account: Account, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp's error texts carry the whole URL: they are logged (at every attempt, and as the
    circuit's reason) through redact.error_text, without the query's token."""
    caplog.set_level(logging.INFO, logger="mailroom")
    with HostileHttp(mode) as receiver:
        url = f"{receiver.url}/hook/{SECRET}?token={SECRET}"
        config = parse_config(config_dict([mailbox_dict(dovecot, account)], url), env={})
        await dovecot.aappend(account, message(1))
        before_kib = reset_peak_rss()
        async with running(config):
            sign = WEBHOOK_SIGNS[mode]
            await wait_until(lambda: bool(logged(caplog, sign)), timeout=30, what=sign)
        peak_mib = (_status_kib("VmHWM") - before_kib) / 1024
    assert peak_mib < PEAK_RSS_MIB
    assert SECRET not in caplog.text
    assert receiver.requests and all(SECRET in path for _, path in receiver.requests)


# -- token endpoints ---------------------------------------------------------------------------


def test_a_token_answer_is_read_within_its_bound() -> None:
    """msal and google-auth read answers through requests, which reads an endless one whole:
    mailroom's session stops at ANSWER_MAX_BYTES."""
    with HostileHttp("huge_length", tls=True) as endpoint:
        oauth = OAuthConfig(tenant_id="t", client_id="c", ca_file=str(tls.ca_file()))
        session = HttpSession(oauth, timeout_s=10)
        before_kib = reset_peak_rss()
        with pytest.raises(requests.RequestException, match="larger than 1048576 bytes"):
            session.post(endpoint.url + "/token", data={"grant_type": "client_credentials"})
        peak_mib = (_status_kib("VmHWM") - before_kib) / 1024
        session.close()
    assert ANSWER_MAX_BYTES == 1024 * 1024
    assert peak_mib < 32


# -- one redaction for every error text built from a URL ------------------------------------------

URL_WITH_SECRETS = (
    f"https://user:{SECRET}@hooks.example.com:8443/hook/{SECRET}?token={SECRET}#{SECRET}"
)


def _request_info() -> aiohttp.RequestInfo:
    url = URL(URL_WITH_SECRETS)
    headers = multidict.CIMultiDictProxy(multidict.CIMultiDict({"Authorization": SECRET}))
    return aiohttp.RequestInfo(url=url, method="POST", headers=headers, real_url=url)


def _key() -> Any:
    return ConnectionKey("hooks.example.com", 8443, True, True, None, None, None)


def _every_client_error() -> list[BaseException]:
    """One instance of every error type aiohttp's client raises, each built with the URL."""
    oserror = OSError(111, f"Connection refused to {URL_WITH_SECRETS}")
    info = _request_info()
    made: list[BaseException] = [
        aiohttp.ClientError(URL_WITH_SECRETS),
        aiohttp.ClientConnectionError(URL_WITH_SECRETS),
        aiohttp.ClientConnectionResetError(URL_WITH_SECRETS),
        aiohttp.ClientOSError(111, URL_WITH_SECRETS),
        aiohttp.ClientConnectorError(_key(), oserror),
        aiohttp.ClientProxyConnectionError(_key(), oserror),
        aiohttp.ClientSSLError(_key(), oserror),
        aiohttp.ClientConnectorDNSError(_key(), oserror),
        aiohttp.ClientConnectorSSLError(_key(), oserror),
        aiohttp.ClientConnectorCertificateError(_key(), ValueError(URL_WITH_SECRETS)),
        aiohttp.ConnectionTimeoutError(URL_WITH_SECRETS),
        aiohttp.SocketTimeoutError(URL_WITH_SECRETS),
        aiohttp.ServerConnectionError(URL_WITH_SECRETS),
        aiohttp.ServerTimeoutError(URL_WITH_SECRETS),
        aiohttp.ServerDisconnectedError(URL_WITH_SECRETS),
        aiohttp.ServerFingerprintMismatch(b"a", b"b", "hooks.example.com", 8443),
        aiohttp.ClientPayloadError(URL_WITH_SECRETS),
        aiohttp.client_exceptions.UploadAbortedError(URL_WITH_SECRETS),
        aiohttp.InvalidURL(URL_WITH_SECRETS),
        aiohttp.InvalidUrlClientError(URL_WITH_SECRETS),
        aiohttp.RedirectClientError(URL_WITH_SECRETS),
        aiohttp.NonHttpUrlClientError(URL_WITH_SECRETS),
        aiohttp.InvalidUrlRedirectClientError(URL_WITH_SECRETS, "redirect"),
        aiohttp.NonHttpUrlRedirectClientError(URL_WITH_SECRETS),
        aiohttp.WSMessageTypeError(URL_WITH_SECRETS),
    ]
    for kind in (
        aiohttp.ClientResponseError,
        aiohttp.ClientHttpProxyError,
        aiohttp.WSServerHandshakeError,
        aiohttp.ContentTypeError,
    ):
        made.append(kind(info, (), status=400, message=f"bad {URL_WITH_SECRETS}"))
    made.append(aiohttp.TooManyRedirects(info, (), status=302, message="Too many"))
    return made


def test_every_aiohttp_client_error_goes_through_one_redaction() -> None:
    errors = _every_client_error()
    covered = {type(e) for e in errors}
    exported = {
        getattr(aiohttp.client_exceptions, name) for name in aiohttp.client_exceptions.__all__
    }
    missing = {c for c in exported if isinstance(c, type) and issubclass(c, Exception)} - covered
    assert not missing, f"aiohttp has error types this test does not feed: {missing}"
    for error in errors:
        assert SECRET in str(error) or isinstance(error, aiohttp.ServerFingerprintMismatch)
        text = error_text(error, URL_WITH_SECRETS)
        assert SECRET not in text, text
        assert "user:" not in text and text.isprintable()
        assert text.startswith(type(error).__name__)
