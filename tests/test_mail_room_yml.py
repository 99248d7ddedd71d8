"""``--mail-room-config``: the MailRoom gem's own YAML, with symbol keys and MailRoom's defaults."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom import cli
from mailroom.config import ConfigError, GraphMailboxConfig, ImapMailboxConfig
from mailroom.delivery.webhook import request_headers
from mailroom.gitlab import load_mail_room
from mailroom.mail import routing
from tests.helpers import message, running
from tests.servers.dovecot import Dovecot
from tests.servers.webhook import WebhookReceiver

# The README of tpitale/mail_room, first two mailboxes, and a JWT postback as GitLab renders it
README_EXAMPLE = """\
---
:mailboxes:
  -
    :email: "user1@gmail.com"
    :password: "password"
    :name: "inbox"
    :search_command: 'NEW'
    :delivery_options:
      :delivery_url: "http://localhost:3000/inbox"
      :delivery_token: "abcdefg"

  -
    :email: "user2@gmail.com"
    :password: "password"
    :name: "inbox"
    :delivery_method: postback
    :delivery_options:
      :delivery_url: "http://localhost:3000/inbox"
      :delivery_token: "abcdefg"
  -
    :host: "imap.example.com"
    :port: 143
    :ssl: false
    :start_tls: true
    :email: "incoming"
    :password: "p${NOT_EXPANDED}"
    :idle_timeout: 60
    :name: "inbox"
    :delete_after_delivery: true
    :expunge_deleted: true
    :logger:
      :log_path: "/var/log/mail_room.log"
    :delivery_method: postback
    :delivery_options:
      :delivery_url: "https://gitlab.example.com/api/v4/internal/mail_room/incoming_email"
      :content_type: "text/plain"
      :jwt_auth_header: "Gitlab-Mailroom-Api-Request"
      :jwt_issuer: "gitlab-mailroom"
      :jwt_algorithm: "HS256"
      :jwt_secret_path: "SECRET_PATH"
:health_check:
  :address: "0.0.0.0"
  :port: 8081
"""


def write(tmp_path: Path, text: str) -> Path:
    secret = tmp_path / "secret"
    secret.write_text(base64.b64encode(b"k" * 32).decode() + "\n")
    path = tmp_path / "mail_room.yml"
    path.write_text(text.replace("SECRET_PATH", str(secret)))
    return path


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_mail_room(write(tmp_path, text), env={})
    return str(info.value)


def test_the_readme_example_with_mail_rooms_defaults(tmp_path: Path) -> None:
    config = load_mail_room(write(tmp_path, README_EXAMPLE), env={})
    first, second, third = config.mailboxes
    assert isinstance(first, ImapMailboxConfig) and isinstance(third, ImapMailboxConfig)
    assert (first.host, first.port, first.ssl, first.start_tls) == (
        "imap.gmail.com",
        993,
        True,
        False,
    )
    assert (first.user, first.mailbox, first.search_command) == ("user1@gmail.com", "inbox", "NEW")
    assert first.idle_timeout_s == 1740 and not first.delete_after_delivery
    assert first.routing.mode is routing.RoutingMode.FORWARD_ALL
    assert first.routing.forward_auto_generated  # MailRoom does not route: everything is posted
    hook = first.webhook
    assert (hook.url, hook.format, hook.request_content_type) == (
        "http://localhost:3000/inbox",
        "raw",
        "message/rfc822",
    )
    headers = request_headers(hook, webhook_id="msg_1", body=b"", content_type="message/rfc822")
    assert headers["Authorization"] == 'Token token="abcdefg"'  # Faraday's token_auth
    assert second.webhook == first.webhook
    assert (third.port, third.start_tls, third.delete_after_delivery) == (143, True, True)
    assert third.password is not None and third.password.reveal() == "p${NOT_EXPANDED}"
    assert third.routing.address.template == "incoming@imap.example.com"
    jwt = third.webhook.jwt
    assert jwt is not None and jwt.key() == b"k" * 32 and jwt.issuer == "gitlab-mailroom"
    assert third.webhook.request_content_type == "text/plain"
    assert config.health is not None and (config.health.host, config.health.port) == (
        "0.0.0.0",
        8081,
    )
    assert [(f.path, f.mailboxes) for f in config.log.files] == [
        ("/var/log/mail_room.log", frozenset({"mailbox2"}))
    ]
    assert config.warnings == ()  # :health_check: is served as it is (/liveness too)


def test_a_graph_mailbox(tmp_path: Path) -> None:
    text = """\
:mailboxes:
  - :email: "incoming@example.onmicrosoft.com"
    :name: "inbox"
    :inbox_method: microsoft_graph
    :inbox_options:
      :tenant_id: "contoso.onmicrosoft.com"
      :client_id: "00000000-0000-0000-0000-000000000000"
      :client_secret: "graph-secret"
      :poll_interval: 30
    :delivery_options:
      :delivery_url: "https://app.example.com/mail"
"""
    (box,) = load_mail_room(write(tmp_path, text), env={}).mailboxes
    assert isinstance(box, GraphMailboxConfig)
    assert box.inbox_options.client_secret is not None
    assert box.inbox_options.client_secret.reveal() == "graph-secret"
    assert box.inbox_options.poll_interval_s == 30 and not box.delete_after_delivery
    unquoted = text.replace('"graph-secret"', "12345")
    assert error(tmp_path, unquoted).endswith(
        ":mailboxes:[0].:inbox_options.:client_secret: expected a string; put the value in quotes"
    )


BASE = """\
:mailboxes:
  - :email: "u@example.com"
    :password: "pw"
    :name: "inbox"
    :delivery_url: "http://localhost:3000/inbox"
"""


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("    :delivery_method: logger\n", ":delivery_method: logger: mailroom always posts"),
        ("    :delivery_method: sidekiq\n", ":delivery_options.:worker: is required"),
        ("    :delivery_klass: Foo\n", ":delivery_klass: a Ruby class"),
        ("    :location: /tmp/x\n", ":location: letter_opener's directory"),
        ("    :arbitration_method: postgresql\n", ":arbitration_method: postgresql: is not"),
        (
            "    :arbitration_method: redis\n    :arbitration_options: {':redis_url': 'x:/'}\n",
            "url is not redis://, rediss:// or unix://",
        ),
        ("    email: plain\n", ".email: MailRoom reads only symbol keys"),
        ("    :delivery_options:\n      :worker: X\n", ":worker: is not a postback option"),
        (  # a colon left out: the token is in a key, never shown
            "    :delivery_options: {':delivery_url': 'http://x/', ':token hunter2'}\n",
            ":delivery_options.:<a key of 13 characters>: is not a postback option",
        ),
        (
            "    :delivery_options:\n      :delivery_url: http://x/\n      :jwt_auth_header: H\n",
            ":jwt_secret_path: is missing",
        ),
        (
            "    :delivery_options:\n      :delivery_url: http://x/\n      :token: t\n"
            "      :username: u\n      :password: p\n",
            "MailRoom sends the token and ignores",
        ),
        ("    :port: 99999\n", ":port: 99999 is out of range"),
        ("    :ssl:\n      :verify_mode: :none\n      :ciphers: X\n", ":ciphers: mailroom takes"),
        ("    :idle_timeout: 3600\n", ":idle_timeout: 3600 is out of range"),
    ],
)
def test_what_mailroom_cannot_honour_is_explained(
    tmp_path: Path, extra: str, expected: str
) -> None:
    text = error(tmp_path, BASE + extra)
    assert text.startswith(str(tmp_path / "mail_room.yml")), text
    assert ":mailboxes:[0]" in text and expected in text


def test_ssl_options(tmp_path: Path) -> None:
    text = BASE + "    :ssl:\n      :verify_mode: :none\n"
    (box,) = load_mail_room(write(tmp_path, text), env={}).mailboxes
    assert isinstance(box, ImapMailboxConfig) and box.ssl and not box.tls_verify


def test_gitlabs_erb_template_points_to_gitlab_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, ":mailboxes:\n  <% Gitlab::MailRoom.enabled_configs.each do %>\n")
    assert cli.main(["run", "--mail-room-config", str(path)]) == 2
    assert "run with --gitlab-config config/gitlab.yml instead" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("mailboxes: []\n", "has no :mailboxes: list"),
        (":mailboxes: []\n", ":mailboxes: is empty"),
        (":mailboxes: [x]\n", "expected a mapping of :key: value"),
        (BASE + ":daemonize: true\n", ":daemonize: is not a MailRoom setting"),
    ],
)
def test_document_errors(tmp_path: Path, document: str, expected: str) -> None:
    assert expected in error(tmp_path, document)


def test_with_the_mailroom_yaml_over_it(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.yml"
    overlay.write_text("mailboxes: {mailbox0: {failed_folder: Failed}}\nlog: {level: debug}\n")
    path = write(tmp_path, BASE)
    config = load_mail_room(path, mailroom_config=overlay, env={})
    assert isinstance(config.mailboxes[0], ImapMailboxConfig)
    assert config.mailboxes[0].failed_folder == "Failed" and config.log.level == "debug"


def test_secrets_stay_out_of_errors(tmp_path: Path, capsys: pytest.CaptureFixture[Any]) -> None:
    path = write(tmp_path, BASE.replace('"pw"', '"hunter2-secret"') + "    :port: 99999\n")
    assert cli.main(["check", "--mail-room-config", str(path)]) == 2
    out = capsys.readouterr().out
    assert ":mailboxes:[0].:port: 99999 is out of range" in out
    assert "hunter2-secret" not in out


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=8).map(lambda k: ":" + k), children, max_size=3)
    ),
    max_leaves=8,
)
KEYS = [
    ":email",
    ":password",
    ":host",
    ":port",
    ":ssl",
    ":start_tls",
    ":name",
    ":search_command",
    ":idle_timeout",
    ":delivery_method",
    ":delivery_url",
    ":delivery_token",
    ":delivery_options",
    ":inbox_method",
    ":inbox_options",
    ":arbitration_method",
    ":logger",
    "email",
]


@settings(max_examples=200, deadline=None)
@given(mailbox=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6), top=VALUES)
@pytest.mark.slow
def test_any_mail_room_yml_loads_or_is_a_config_error(
    tmp_path_factory: pytest.TempPathFactory, mailbox: dict[str, Any], top: Any
) -> None:
    base = {":email": "u@example.com", ":password": "pw", ":name": "inbox"}
    document = {":mailboxes": [{**base, ":delivery_url": "http://localhost/", **mailbox}]}
    if isinstance(top, dict):
        document.update({k: v for k, v in top.items() if k != ":mailboxes"})
    path = tmp_path_factory.mktemp("fuzz") / "mail_room.yml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_mail_room(path, env={})
    except ConfigError as exc:
        assert str(exc).startswith(str(path)), str(exc)


def test_a_mailbox_never_inherits_another_mailboxs_delivery_options(tmp_path: Path) -> None:
    """MailRoom keeps each mailbox's delivery options to itself: mailbox 0's token, basic auth
    or JWT never becomes another mailbox's default."""
    text = """\
:mailboxes:
  - :email: "a@example.com"
    :password: "pa"
    :delivery_options:
      :delivery_url: "https://gitlab.example.com/api/inbox"
      :delivery_token: "gitlab-token"
      :content_type: "text/plain"
      :jwt_auth_header: "Gitlab-Mailroom-Api-Request"
      :jwt_secret_path: "SECRET_PATH"
  - :email: "b@example.com"
    :password: "pb"
    :delivery_options:
      :delivery_url: "https://thirdparty.example.net/inbox"
"""
    first, second = load_mail_room(write(tmp_path, text), env={}).mailboxes
    assert first.webhook.token is not None and first.webhook.jwt is not None
    hook = second.webhook
    assert (hook.token, hook.basic, hook.jwt, hook.content_type) == (None, None, None, None)
    headers = request_headers(hook, webhook_id="msg_1", body=b"", content_type="message/rfc822")
    assert "Authorization" not in headers and "Gitlab-Mailroom-Api-Request" not in headers


async def test_a_token_never_reaches_another_mailboxs_receiver(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    """End to end: two MailRoom mailboxes on a real Dovecot, each posting to its own receiver;
    only the first configures a token, and the second receiver never sees it."""
    first, second = dovecot.add_user(), dovecot.add_user()
    await dovecot.aappend(first, message(1))
    await dovecot.aappend(second, message(2))
    async with WebhookReceiver() as gitlab, WebhookReceiver() as thirdparty:
        boxes = [
            {
                ":email": account.user,
                ":password": account.password,
                ":host": dovecot.host,
                ":port": dovecot.tls_port,
                ":ssl": {":ca_file": str(dovecot.ca_file)},
                ":idle_timeout": 60,
                ":delivery_options": {":delivery_url": receiver.url, **extra},
            }
            for account, receiver, extra in (
                (first, gitlab, {":delivery_token": "gitlab-token"}),
                (second, thirdparty, {}),
            )
        ]
        path = tmp_path / "mail_room.yml"
        path.write_text(yaml.safe_dump({":mailboxes": boxes}))
        overlay = tmp_path / "mailroom.yml"
        overlay.write_text(yaml.safe_dump({"health": None, "shutdown_timeout": 5}))
        config = load_mail_room(path, mailroom_config=overlay, env={})
        async with running(config):
            (to_gitlab,) = await gitlab.wait_for(1)
            (to_thirdparty,) = await thirdparty.wait_for(1)
    assert to_gitlab.headers["Authorization"] == 'Token token="gitlab-token"'
    assert "Authorization" not in to_thirdparty.headers
    assert b"gitlab-token" not in bytes(str(to_thirdparty.headers), "utf-8") + to_thirdparty.body
    assert to_thirdparty.body.startswith(b"From: Sender 2")


def test_sidekiq_delivery_and_redis_arbitration_as_mail_room_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "mail_room.yml"
    path.write_text(
        """
:mailboxes:
  -
    :email: "user@example.com"
    :password: "pw"
    :name: "inbox"
    :delivery_method: sidekiq
    :delivery_options:
      :redis_url: "redis://:s3cr%40t@redis.example.com:6380/2"
      :namespace: "resque:gitlab"
      :queue: "email_receiver"
      :worker: "EmailReceiverWorker"
    :arbitration_method: redis
    :arbitration_options:
      :redis_url: "redis://:s3cr%40t@redis.example.com:6380"
      :namespace: "mail_room:gitlab"
"""
    )
    config = load_mail_room(path, env={})
    (box,) = config.mailboxes
    sidekiq = box.webhook.sidekiq
    assert sidekiq is not None and sidekiq.key == "resque:gitlab:queue:email_receiver"
    assert sidekiq.worker == "EmailReceiverWorker" and sidekiq.redis.db == 2
    assert sidekiq.redis.password is not None and sidekiq.redis.password.reveal() == "s3cr@t"
    assert sidekiq.redis.url == "redis://redis.example.com:6380/2"  # no password in it
    arbitration = config.arbitration
    assert arbitration.enabled and arbitration.namespace == "mail_room:gitlab"
    assert arbitration.mail_room_claims and arbitration.mail_room_key("3") == (
        "mail_room:gitlab:delivered:3"
    )
    assert arbitration.password is not None and arbitration.password.reveal() == "s3cr@t"
    assert "s3cr" not in repr(config)
