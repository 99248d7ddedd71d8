"""Microsoft Graph → webhook end to end, against the mock Entra ID + Graph over HTTPS."""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mailroom.config import ConfigError, GraphMailboxConfig, parse_config
from mailroom.sources.graph import FAILED_CATEGORY, MAX_PAGES, idempotency_key
from mailroom.trust.entra import TokenProvider
from tests.helpers import config_dict, message, running, wait_until
from tests.servers import tls
from tests.servers.entra import EntraGraph
from tests.servers.webhook import WebhookReceiver

USER = "incoming@contoso.onmicrosoft.com"


@pytest.fixture
async def entra() -> AsyncIterator[EntraGraph]:
    async with EntraGraph() as mock:
        yield mock


def graph_mailbox(mock: EntraGraph, **overrides: Any) -> dict[str, Any]:
    """A Graph mailbox on the mock, polling fast, trusting the test CA."""
    options: dict[str, Any] = {
        "tenant_id": mock.tenant,
        "client_id": "app-client",
        "client_secret": mock.clients["app-client"],
        "poll_interval": 0.1,
        "azure_ad_endpoint": mock.login_endpoint,
        "graph_endpoint": mock.graph_endpoint,
        "ca_file": str(tls.ca_file()),
    }
    options.update(overrides.pop("inbox_options", {}))
    box: dict[str, Any] = {
        "id": "graph",
        "inbox_method": "microsoft_graph",
        "address": "incoming+%{key}@example.com",
        "user": USER,
        "mailbox": "inbox",
        "inbox_options": options,
    }
    box.update(overrides)
    return box


def graph_config(mock: EntraGraph, webhook_url: str, **overrides: Any) -> Any:
    return parse_config(config_dict([graph_mailbox(mock, **overrides)], webhook_url), env={})


def unread(mock: EntraGraph) -> int:
    return sum(1 for m in mock.in_folder("inbox") if not m.is_read)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


async def alogged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return logged(caplog, text)


async def test_delivers_then_marks_read_never_before_the_webhook_answered(
    entra: EntraGraph, webhook: WebhookReceiver
) -> None:
    raws = [message(n) for n in range(3)]
    ids = [entra.add_message(raw) for raw in raws]
    webhook.stall()
    async with running(graph_config(entra, webhook.url)):
        received = await webhook.wait_for(3)
        await entra.wait_for(lambda: entra.polls_after(received[-1].at) >= 2, what="2 polls")
        assert entra.of_kind("patch", "delete", "move") == []  # nothing settled while waiting
        assert unread(entra) == 3
        webhook.release()
        await entra.wait_for(lambda: unread(entra) == 0, what="all read")
    patches = entra.of_kind("patch")
    assert sorted(r.path.rsplit("/", 1)[1] for r in patches) == sorted(ids)
    assert all(r.body == b'{"isRead": true}' for r in patches)
    assert all(p.at > received[-1].at for p in patches)
    by_raw = {base64.b64decode(r.json()["raw"]): r for r in received}
    assert set(by_raw) == set(raws)  # byte-exact
    request = by_raw[raws[1]]
    assert request.headers["webhook-id"] == idempotency_key("graph", ids[1])
    assert request.headers["webhook-id"].isascii()
    assert request.json()["key"] == "key1"
    listing = entra.of_kind("list")[0]
    assert listing.query == {
        "$filter": "receivedDateTime ge 1900-01-01T00:00:00Z and isRead eq false",
        "$orderby": "receivedDateTime asc",
        "$select": "id,categories",
        "$top": "50",
    }
    assert listing.headers["Prefer"] == 'IdType="ImmutableId"'
    assert len(webhook.requests) == 3


async def test_webhook_failure_leaves_the_message_unread_then_it_is_delivered(
    entra: EntraGraph, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    entra.add_message(message(1))
    await webhook.stop()
    async with running(graph_config(entra, webhook.url)):
        await entra.wait_for(lambda: logged(caplog, "webhook attempt 2 failed"), what="2 fails")
        polls = len(entra.of_kind("list"))
        await entra.wait_for(lambda: len(entra.of_kind("list")) > polls + 2, what="more polls")
        assert unread(entra) == 1 and entra.of_kind("patch") == []
        assert len(entra.of_kind("value")) == 1  # in flight: not fetched again by later polls
        await webhook.start()
        await webhook.wait_for(1)
        await entra.wait_for(lambda: unread(entra) == 0, what="read after delivery")
    assert len(webhook.requests) == 1


async def test_follows_next_link_across_pages(entra: EntraGraph, webhook: WebhookReceiver) -> None:
    entra.page_size = 7
    for n in range(25):
        entra.add_message(message(n))
    async with running(graph_config(entra, webhook.url)):
        await webhook.wait_for(25)
        await entra.wait_for(lambda: unread(entra) == 0, what="all read")
    first_poll = entra.of_kind("list")[:4]
    assert [r.query.get("$skip") for r in first_poll] == [None, "7", "14", "21"]
    assert len({r.headers["webhook-id"] for r in webhook.requests}) == 25


async def test_429_honours_retry_after(
    entra: EntraGraph, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    entra.add_message(message(1))
    entra.fail_next("list", status=429, headers={"Retry-After": "1"})
    async with running(graph_config(entra, webhook.url)):
        await webhook.wait_for(1)
    throttled, retried = entra.of_kind("list")[:2]
    assert throttled.status == 429 and retried.status == 200
    assert retried.at - throttled.at >= 0.95  # not before Retry-After
    assert logged(caplog, "graph: GraphError: GET /v1.0/users/")
    assert "retrying in 1.0s" in caplog.text


@pytest.mark.parametrize("retry_after", ["0", "Wed, 21 Oct 2015 07:28:00 GMT"])
async def test_retry_after_zero_or_past_still_backs_off(
    retry_after: str, entra: EntraGraph, webhook: WebhookReceiver
) -> None:
    entra.add_message(message(1))
    entra.fail_next("list", status=429, headers={"Retry-After": retry_after})
    async with running(graph_config(entra, webhook.url)):
        await webhook.wait_for(1)
    throttled, retried = entra.of_kind("list")[:2]
    assert throttled.status == 429 and retried.status == 200
    assert retried.at - throttled.at >= 0.95  # not at once while throttled


async def test_oldest_first(entra: EntraGraph, webhook: WebhookReceiver) -> None:
    ids = [entra.add_message(message(n), received=f"2026-01-0{9 - n}T00:00:00Z") for n in range(3)]
    async with running(graph_config(entra, webhook.url)):
        await webhook.wait_for(3)
    assert [r.path.split("/")[-2] for r in entra.of_kind("value")] == ids[::-1]


@pytest.mark.parametrize("status", [404, 400, 500])
async def test_a_message_that_cannot_be_fetched_does_not_hold_up_the_rest(
    status: int, entra: EntraGraph, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailroom")
    bad = entra.add_message(message(0))  # the oldest: listed first
    entra.broken[bad] = status
    entra.add_message(message(1))
    entra.add_message(message(2))

    def fetches() -> int:
        return sum(1 for r in entra.of_kind("value") if bad in r.path)

    async with running(graph_config(entra, webhook.url)):
        received = await webhook.wait_for(2)
        await entra.wait_for(lambda: unread(entra) == 1, what="the others read")
        if status != 404:
            await entra.wait_for(lambda: fetches() == 5, what="5 attempts")
            polls = len(entra.of_kind("list"))
            await entra.wait_for(lambda: len(entra.of_kind("list")) > polls + 3, what="3 polls")
            assert fetches() == 5  # then left alone until a restart
            assert logged(caplog, "(5 of 5 polls in a row); it stays unread, not fetched again")
    assert {r.json()["subject"] for r in received} == {"test 1", "test 2"}
    assert len(webhook.requests) == 2
    assert not entra.messages[bad].is_read
    assert not logged(caplog, "retrying in")  # the mailbox stayed healthy
    if status == 404:
        assert logged(caplog, "gone before it was fetched; skipped")


@pytest.mark.parametrize("paging", ["cyclic", "endless"])
async def test_a_runaway_next_link_ends_the_poll(
    paging: str, entra: EntraGraph, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    entra.paging = paging
    entra.add_message(message(1))

    def starts() -> list[int]:  # where each poll began: its first page has no $skip
        return [i for i, r in enumerate(entra.of_kind("list")) if "$skip" not in r.query]

    async with running(graph_config(entra, webhook.url)):
        await entra.wait_for(lambda: unread(entra) == 0, what="settled between polls")
        await entra.wait_for(lambda: len(starts()) >= 2, what="a second poll")
    assert starts()[1] - starts()[0] == (2 if paging == "cyclic" else MAX_PAGES)
    assert logged(caplog, "repeats after 2 pages" if paging == "cyclic" else "goes on after 20")


@pytest.mark.parametrize(
    "answer",
    [
        ("folders", 200, b"<html>proxy</html>", "HTTP 200: the answer is not JSON"),
        ("create_folder", 201, b'{"displayName": "x"}', "a mail folder without an id"),
    ],
)
async def test_a_malformed_answer_while_settling_is_retried(
    answer: tuple[str, int, bytes, str],
    entra: EntraGraph,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kind, status, body, error = answer
    webhook.respond(400, b"bad")
    message_id = entra.add_message(message(1))
    entra.fail_next(kind, status=status, body=body)
    async with running(graph_config(entra, webhook.url, failed_folder="Failed")):
        await entra.wait_for(lambda: not entra.in_folder("inbox"), what="moved")
    assert entra.messages[message_id].folder == entra.folders["Failed"]
    assert logged(caplog, error)
    assert len(webhook.requests) == 1


@pytest.mark.slow
async def test_503_and_value_errors_back_off_and_recover(
    entra: EntraGraph, webhook: WebhookReceiver
) -> None:
    entra.add_message(message(1))
    entra.fail_next("value", status=503, headers={"Retry-After": "0"})
    entra.fail_next("patch", status=500)
    async with running(graph_config(entra, webhook.url)):
        await entra.wait_for(lambda: unread(entra) == 0, what="read")
    assert [r.status for r in entra.of_kind("patch")] == [500, 200]
    assert len(webhook.requests) == 1


async def test_token_is_reused_across_polls(entra: EntraGraph, webhook: WebhookReceiver) -> None:
    async with running(graph_config(entra, webhook.url)):
        await entra.wait_for(lambda: len(entra.of_kind("list")) >= 5, what="5 polls")
    assert len(entra.of_kind("token")) == 1
    assert len(entra.of_kind("discovery")) == 1
    assert len({r.token for r in entra.of_kind("list")}) == 1


async def test_mailboxes_of_one_app_registration_share_one_token(
    entra: EntraGraph, webhook: WebhookReceiver
) -> None:
    boxes = [graph_mailbox(entra, id=f"g{i}", mailbox=f"folder{i}") for i in range(5)]
    config = parse_config(config_dict(boxes, webhook.url), env={})
    async with running(config):
        await entra.wait_for(lambda: len(entra.of_kind("list")) >= 10, what="10 polls")
    assert len(entra.of_kind("token")) == 1  # one app registration and scope: one provider
    assert len(entra.of_kind("discovery")) == 1
    assert len({r.token for r in entra.of_kind("list")}) == 1


async def test_token_is_refreshed_before_it_expires(
    entra: EntraGraph, webhook: WebhookReceiver
) -> None:
    entra.token_lifetime_s = 2  # refreshed at half its life (5 min before, for real tokens)
    async with running(graph_config(entra, webhook.url)):
        await entra.wait_for(
            lambda: len({r.token for r in entra.of_kind("list")}) >= 2, what="a second token"
        )
    issued = entra.of_kind("token")
    assert issued[1].at - issued[0].at > 0.9  # not before half its life
    assert all(r.status == 200 for r in entra.of_kind("list"))  # never sent an expired one
    assert len({r.token for r in entra.of_kind("list")}) >= 2


async def test_401_gets_one_fresh_token(entra: EntraGraph, webhook: WebhookReceiver) -> None:
    async with running(graph_config(entra, webhook.url)):
        await entra.wait_for(lambda: bool(entra.of_kind("list")), what="a poll")
        old = entra.of_kind("list")[0].token
        assert old is not None
        entra.revoke(old)
        entra.add_message(message(1))
        await webhook.wait_for(1)
    statuses = [r.status for r in entra.of_kind("list")]
    assert 401 in statuses and len(entra.of_kind("token")) == 2
    assert webhook.requests[0].json()["subject"] == "test 1"


async def test_national_cloud_endpoints_by_config_alone(webhook: WebhookReceiver) -> None:
    async with EntraGraph(graph_prefix="/graph.microsoft.us") as mock:
        mock.add_message(message(1))
        config = graph_config(mock, webhook.url)
        box = config.mailboxes[0]
        assert isinstance(box, GraphMailboxConfig)
        assert box.inbox_options.oauth.scope == f"{mock.graph_endpoint}/.default"
        async with running(config):
            await webhook.wait_for(1)
            await mock.wait_for(lambda: unread(mock) == 0, what="read")
    assert all(r.path.startswith("/graph.microsoft.us/v1.0/") for r in mock.of_kind("list"))


def test_national_cloud_config() -> None:
    raw = {
        "id": "us",
        "inbox_method": "microsoft_graph",
        "address": "incoming+%{key}@example.us",
        "user": "incoming@example.us",
        "inbox_options": {
            "tenant_id": "t",
            "client_id": "c",
            "client_secret": "s3cr3t-value",
            "azure_ad_endpoint": "https://login.microsoftonline.us/",
            "graph_endpoint": "https://graph.microsoft.us",
        },
    }
    config = parse_config({"mailboxes": [raw], "webhook": {"url": "https://app/x"}}, env={})
    (box,) = config.mailboxes
    assert isinstance(box, GraphMailboxConfig)
    oauth = box.inbox_options.oauth
    assert (oauth.authority, oauth.scope) == (
        "https://login.microsoftonline.us/t",
        "https://graph.microsoft.us/.default",
    )
    assert box.delete_after_delivery is False and box.inbox_options.poll_interval_s == 60
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in repr(TokenProvider(oauth, label="us"))


async def test_wrong_secret_is_reported_clearly_and_only_that_mailbox_suffers(
    entra: EntraGraph, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    entra.add_message(message(1))
    bad = graph_mailbox(entra, id="bad", inbox_options={"client_secret": "wrong-secret-value"})
    good = graph_mailbox(entra, id="good")
    config = parse_config(config_dict([bad, good], webhook.url), env={})
    async with running(config):
        await webhook.wait_for(1)
        await entra.wait_for(lambda: logged(caplog, "bad: TokenError"), what="the error")
    line = next(r for r in caplog.records if r.getMessage().startswith("bad: TokenError"))
    assert line.levelno == logging.ERROR
    text = line.getMessage()
    assert "invalid_client: AADSTS7000215: Invalid client secret provided" in text
    assert "check client_id and client_secret" in text
    assert "wrong-secret-value" not in caplog.text
    assert "Trace ID" not in text
    assert webhook.requests[0].headers["X-Mailroom-Mailbox"] == "good"


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
async def test_a_private_ca_given_only_through_the_environment_is_trusted(
    entra: EntraGraph, webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # How users hand Python programs a private CA: Entra ID (msal's requests) and Graph
    # (aiohttp) both trust it, on top of the system store, with no ca_file in the config.
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, str(tls.ca_file()))
    entra.add_message(message(1))
    config = graph_config(entra, webhook.url, inbox_options={"ca_file": None})
    async with running(config):
        await webhook.wait_for(1)
    assert len(entra.of_kind("token")) == 1


async def test_an_untrusted_endpoint_is_said_clearly(
    entra: EntraGraph,
    webhook: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CURL_CA_BUNDLE is curl's, not Python's: requests would let it replace the trust.
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CURL_CA_BUNDLE", str(tls.ca_file()))
    config = graph_config(entra, webhook.url, inbox_options={"ca_file": None})
    async with running(config):
        await wait_until(lambda: alogged(caplog, "not trusted"), what="the TLS error")
    assert "set ca_file to the CA that signed it" in caplog.text
    assert entra.of_kind("token") == []


@pytest.mark.parametrize("failed_folder", [None, "Mailroom Failed"])
async def test_permanent_webhook_failure_dead_letters(
    failed_folder: str | None, entra: EntraGraph, webhook: WebhookReceiver
) -> None:
    webhook.respond(400, b"bad")
    message_id = entra.add_message(message(1))
    entra.messages[message_id].categories = ["Blue"]
    config = graph_config(entra, webhook.url, failed_folder=failed_folder)
    async with running(config):
        if failed_folder is None:
            await entra.wait_for(lambda: unread(entra) == 0, what="flagged and read")
        else:
            await entra.wait_for(lambda: not entra.in_folder("inbox"), what="moved")
    moved = entra.messages[message_id]
    if failed_folder is None:
        assert moved.categories == ["Blue", FAILED_CATEGORY] and moved.folder == "inbox"
    else:
        assert moved.folder == entra.folders[failed_folder] and not moved.is_read
        assert [r.status for r in entra.of_kind("create_folder")] == [201]
    assert len(webhook.requests) == 1


async def test_delete_after_delivery_deletes(entra: EntraGraph, webhook: WebhookReceiver) -> None:
    entra.add_message(message(1))
    async with running(graph_config(entra, webhook.url, delete_after_delivery=True)):
        await entra.wait_for(lambda: not entra.in_folder("inbox"), what="deleted")
    assert [r.status for r in entra.of_kind("delete")] == [204]
    assert entra.of_kind("patch") == []


async def test_too_large_is_not_read_whole_and_dead_lettered(
    entra: EntraGraph, webhook: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    big = entra.add_message(message(1, size=300_000))
    entra.add_message(message(2))
    async with running(graph_config(entra, webhook.url, max_message_bytes=2048)):
        (request,) = await webhook.wait_for(1)
        await entra.wait_for(lambda: unread(entra) == 0, what="both settled")
    assert request.json()["subject"] == "test 2"
    assert entra.messages[big].categories == [FAILED_CATEGORY]
    assert "over max_message_bytes (2048)" in caplog.text


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"host": "imap.example.com"}, "mailboxes[0].host: is an IMAP setting"),
        ({"inbox_options": None}, "mailboxes[0].inbox_options: is required"),
        (
            {"inbox_options": {"graph_endpoint": "http://graph.example"}},
            "mailboxes[0].inbox_options.graph_endpoint: is not an https URL "
            "(http://graph.example:80); write it like https://graph.microsoft.com",
        ),
        (
            {"inbox_options": {"client_secret": None}},
            "mailboxes[0].inbox_options.client_secret: is required",
        ),
        ({"inbox_options": {"scope": "x"}}, "mailboxes[0].inbox_options: unknown key scope"),
    ],
)
def test_graph_config_errors(change: dict[str, Any], error: str) -> None:
    options: dict[str, Any] = {"tenant_id": "t", "client_id": "c", "client_secret": "s"}
    box: dict[str, Any] = {
        "inbox_method": "microsoft_graph",
        "address": "incoming+%{key}@example.com",
        "user": USER,
        "inbox_options": options,
    }
    if "inbox_options" in change and change["inbox_options"] is not None:
        options.update(change["inbox_options"])
    else:
        box.update(change)
    with pytest.raises(ConfigError) as caught:
        parse_config({"mailboxes": [box], "webhook": {"url": "https://app/x"}}, env={})
    assert str(caught.value).startswith(error)
