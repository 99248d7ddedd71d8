"""Proxies: which proxy a request takes (pure), and Entra ID, Graph and the webhook through a
real CONNECT proxy, as a company network would have it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom import check
from mailroom.config import ConfigError, parse_config
from mailroom.kinds import KINDS
from mailroom.trust.proxies import proxy_for
from tests.helpers import config_dict, mailbox_dict, message, running
from tests.servers.dovecot import Account, Dovecot
from tests.servers.entra import EntraGraph
from tests.servers.proxy import HttpProxy
from tests.servers.webhook import WebhookReceiver
from tests.test_graph import graph_config

PROXY = "http://proxy.corp:3128"


@pytest.mark.parametrize(
    ("url", "env", "expected"),
    [
        ("https://graph.microsoft.com/v1.0", {"HTTPS_PROXY": PROXY}, PROXY),
        ("https://graph.microsoft.com/v1.0", {"https_proxy": PROXY, "HTTPS_PROXY": "x"}, PROXY),
        ("https://graph.microsoft.com/v1.0", {"HTTP_PROXY": PROXY}, None),  # not for https
        ("http://app.internal/hook", {"HTTP_PROXY": PROXY}, PROXY),
        ("https://login.example.com", {"ALL_PROXY": PROXY}, PROXY),
        ("https://app.internal/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": "internal"}, None),
        ("https://app.internal/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": "nal"}, PROXY),
        ("https://app.internal/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": ".internal"}, None),
        ("https://internal/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": ".internal"}, None),
        ("https://a.b.example.com", {"HTTPS_PROXY": PROXY, "no_proxy": "example.com"}, None),
        ("https://10.1.2.3:8443/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": "10.0.0.0/8"}, None),
        ("https://10.1.2.3:8443/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": "10.1.2.3:443"}, PROXY),
        ("https://10.1.2.3:8443/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": "10.1.2.3:8443"}, None),
        ("https://[::1]:8443/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": "::1"}, None),
        ("https://[::1]:8443/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": "[::1]"}, None),
        ("https://[::1]:8443/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": "[::1]:8443"}, None),
        ("https://[::1]:8443/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": "[::1]:443"}, PROXY),
        ("https://[fd00::5]/x", {"HTTPS_PROXY": PROXY, "NO_PROXY": "fd00::/8"}, None),
        ("https://anything", {"HTTPS_PROXY": PROXY, "NO_PROXY": "*"}, None),
        ("https://anything", {}, None),
    ],
)
def test_proxy_for_follows_the_environment(
    url: str, env: dict[str, str], expected: str | None
) -> None:
    assert proxy_for(url, env=env) == expected


def test_the_config_wins_over_the_environment() -> None:
    env = {"HTTPS_PROXY": PROXY}
    assert proxy_for("https://x", "http://other:8080", env=env) == "http://other:8080"
    assert proxy_for("https://x", "direct", env=env) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200), st.text(max_size=50))
def test_any_no_proxy_and_host_are_read_without_error(no_proxy: str, host: str) -> None:
    url = f"https://{host.replace('/', '')}/" if host else "https://h/"
    with contextlib.suppress(ValueError):  # urlsplit refuses some hosts: not a proxy question
        proxy_for(url, env={"HTTPS_PROXY": PROXY, "NO_PROXY": no_proxy})


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("socks5://u:s3cret@p:1080", "is not a proxy URL"),
        ("u:s3cret@proxy:3128", "is not a proxy URL"),
        ("http://u:s3cret@p:3128/path", "a proxy URL is scheme://[user:password@]host:port"),
    ],
)
def test_a_bad_proxy_is_a_config_error_without_its_credentials(value: str, error: str) -> None:
    box = {"address": "a+%{key}@example.com", "host": "h", "user": "u", "password": "p"}
    data = config_dict([box], "http://127.0.0.1:1/", proxy=value)
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={})
    assert error in str(caught.value) and "s3cret" not in str(caught.value)


@pytest.fixture
async def proxy() -> AsyncIterator[HttpProxy]:
    async with HttpProxy() as server:
        yield server


@pytest.fixture
async def entra() -> AsyncIterator[EntraGraph]:
    async with EntraGraph() as mock:
        yield mock


async def test_entra_and_graph_go_through_https_proxy(
    entra: EntraGraph,
    webhook: WebhookReceiver,
    proxy: HttpProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    entra.add_message(message(1))
    async with running(graph_config(entra, webhook.url)):
        await webhook.wait_for(1)
    graph = entra.graph_endpoint.removeprefix("https://")
    login = entra.login_endpoint.removeprefix("https://")
    assert {graph, login} <= set(proxy.targets())
    assert all(line.startswith("CONNECT ") for line in proxy.seen)  # TLS end to end
    assert webhook.url.removeprefix("http://").rstrip("/") not in proxy.targets()  # http: no


async def test_no_proxy_keeps_them_direct(
    entra: EntraGraph,
    webhook: WebhookReceiver,
    proxy: HttpProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    entra.add_message(message(1))
    async with running(graph_config(entra, webhook.url)):
        await webhook.wait_for(1)
    assert proxy.seen == []


async def test_a_proxy_key_sends_the_webhook_through_it(
    dovecot: Dovecot,
    account: Account,
    webhook: WebhookReceiver,
    proxy: HttpProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("http_proxy", raising=False)
    await dovecot.aappend(account, message(1))
    data = config_dict([mailbox_dict(dovecot, account)], webhook.url, proxy=proxy.url)
    async with running(parse_config(data, env={})):
        await webhook.wait_for(1)
    assert proxy.targets() == [f"127.0.0.1:{webhook.port}"]
    assert webhook.requests[0].headers["webhook-id"].startswith("msg_")


async def test_check_goes_the_way_deliveries_go(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, proxy: HttpProxy
) -> None:
    lines: list[str] = []
    data = config_dict([mailbox_dict(dovecot, account)], webhook.url, proxy=proxy.url)
    report = check.Report(lines.append)
    await check.run(
        parse_config(data, env={}), path="x.yml", send_test=True, report=report, kinds=KINDS
    )
    hook = f"webhook[http://127.0.0.1:{webhook.port}]"
    assert f"OK   {hook} proxy: deliveries go through http://127.0.0.1:{proxy.port}" in lines
    assert any(
        line.startswith(f"OK   {hook} test event: signed test event answered") for line in lines
    )
    assert proxy.targets() == [f"127.0.0.1:{webhook.port}"]  # the test event went through it
