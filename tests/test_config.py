"""Config loading: defaults, ${ENV}, *_file secrets, and errors that name the path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mailroom.config import Config, ConfigError, Secret, load_config, parse_config

SECRET = "hunter2-do-not-print"
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def minimal(**mailbox: Any) -> dict[str, Any]:
    box = {
        "address": "incoming+%{key}@example.com",
        "host": "imap.example.com",
        "user": "incoming@example.com",
        "password": SECRET,
    }
    box.update(mailbox)
    return {"mailboxes": [box], "webhook": {"url": "https://app.internal/incoming"}}


def error_of(data: Any, env: dict[str, str] | None = None, base_dir: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env=env or {}, base_dir=base_dir)
    text = str(info.value)
    assert SECRET not in text
    return text


def test_minimal_config_gets_documented_defaults() -> None:
    config = parse_config(minimal(), env={})
    assert isinstance(config, Config)
    (box,) = config.mailboxes
    assert box.id == "incoming@example.com@imap.example.com/INBOX"
    assert (box.port, box.ssl, box.start_tls, box.tls_verify) == (143, False, False, True)
    assert (box.mailbox, box.search_command, box.idle_timeout_s) == ("INBOX", "UNSEEN", 60.0)
    assert (box.delete_after_delivery, box.expunge_deleted, box.failed_folder) == (
        True,
        False,
        None,
    )
    assert box.max_message_bytes == 26_214_400
    assert box.webhook == config.webhook
    assert (config.webhook.format, config.webhook.concurrency, config.webhook.timeout_s) == (
        "json",
        8,
        30.0,
    )
    assert config.webhook.retry.give_up_after_s is None
    assert (config.log.format, config.log.level) == ("json", "info")


def test_secrets_never_show_in_repr() -> None:
    config = parse_config(minimal(), env={})
    assert SECRET not in repr(config)
    assert SECRET not in str(config.mailboxes[0].password)
    assert config.mailboxes[0].password.reveal() == SECRET


def test_env_and_file_secrets(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET + "\n")
    data = minimal(password=None, password_file="pw", host="${IMAP_HOST}", port="${IMAP_PORT}")
    data["mailboxes"][0].pop("password")
    data["webhook"]["signing_secret"] = "${WHSEC}"
    config = parse_config(
        data, env={"IMAP_HOST": "mail.test", "IMAP_PORT": "1143", "WHSEC": WHSEC}, base_dir=tmp_path
    )
    box = config.mailboxes[0]
    assert (box.host, box.port) == ("mail.test", 1143)
    assert box.password == Secret(SECRET)
    assert config.webhook.signing_secret == Secret(WHSEC)


def test_mailbox_webhook_override_merges_over_top_level() -> None:
    data = minimal(webhook={"url": "https://app.internal/service_desk", "format": "raw"})
    data["webhook"]["concurrency"] = 3
    box = parse_config(data, env={}).mailboxes[0]
    assert (box.webhook.url, box.webhook.format, box.webhook.concurrency) == (
        "https://app.internal/service_desk",
        "raw",
        3,
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"port": 993}, "mailboxes[0].port: 993 with ssl: false; set ssl: true or use port 143"),
        ({"ssl": True, "start_tls": True}, "mailboxes[0].start_tls: ssl (implicit TLS) and"),
        ({"port": "abc"}, "mailboxes[0].port: expected a whole number, got 'abc'"),
        ({"port": 70000}, "mailboxes[0].port: 70000 is out of range; use a value from 1 to 65535"),
        ({"idle_timeout": 3600}, "mailboxes[0].idle_timeout: 3600 is out of range"),
        ({"colour": "blue"}, "mailboxes[0].colour: unknown key; known keys here:"),
        ({"password": None}, "mailboxes[0].password: is required (or password_file"),
        ({"address": "i@%{key}.ex.com"}, "mailboxes[0].address: 'i@%{key}.ex.com': %{key} must"),
        ({"address": "nobody"}, "mailboxes[0].address: 'nobody' is not an address template"),
        ({"host": "${NOPE}"}, "mailboxes[0].host: environment variable NOPE is not set"),
        ({"inbox_method": "pop3"}, "mailboxes[0].inbox_method: 'pop3' is not one of: imap,"),
        ({"ssl": "maybe"}, "mailboxes[0].ssl: expected true or false, got 'maybe'"),
        ({"ca_file": "/nonexistent/ca.pem"}, "mailboxes[0].ca_file: file /nonexistent/ca.pem"),
    ],
)
def test_mailbox_errors_name_the_path(change: dict[str, Any], expected: str) -> None:
    data = minimal()
    for key, value in change.items():
        if value is None:
            data["mailboxes"][0].pop(key)
        else:
            data["mailboxes"][0][key] = value
    assert error_of(data).startswith(expected)


def test_password_and_password_file_exclude_each_other(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x")
    assert error_of(minimal(password_file="pw"), base_dir=tmp_path).startswith(
        "mailboxes[0].password: give either password or password_file, not both"
    )


def test_unreadable_secret_file_is_named_not_printed(tmp_path: Path) -> None:
    data = minimal(password_file="missing")
    data["mailboxes"][0].pop("password")
    assert error_of(data, base_dir=tmp_path).startswith(
        f"mailboxes[0].password_file: cannot read {tmp_path}/missing: No such file or directory"
    )


@pytest.mark.parametrize(
    ("webhook", "expected"),
    [
        ({"url": "ftp://x"}, "webhook.url: 'ftp://x' is not an http(s) URL"),
        ({"url": "https://x", "format": "xml"}, "webhook.format: 'xml' is not one of: json, raw"),
        ({"url": "https://x", "signing_secret": "plain"}, "webhook.signing_secret: must be a"),
        ({"url": "https://x", "retry": {"initial": 10, "max": 1}}, "webhook.retry.max: must be"),
        ({"url": "https://x", "token": "t", "basic": {"user": "u", "password": "p"}}, "webhook."),
        ({}, "webhook.url: is required"),
    ],
)
def test_webhook_errors(webhook: dict[str, Any], expected: str) -> None:
    data = minimal()
    data["webhook"] = webhook
    assert error_of(data).startswith(expected)


def test_duplicate_ids_and_empty_documents() -> None:
    data = minimal(id="a")
    data["mailboxes"].append(dict(data["mailboxes"][0]))
    assert error_of(data).startswith("mailboxes[1].id: 'a' is used twice")
    assert error_of({"webhook": {"url": "https://x"}}).startswith("mailboxes: is required")
    assert error_of(["not", "a", "mapping"]).startswith("expected a mapping of keys, got a list")


def test_load_config_reports_yaml_syntax(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("mailboxes: [\n  - host: x\n webhook: {")
    with pytest.raises(ConfigError, match=r"bad\.yml: .* at line \d+, column \d+; fix the YAML"):
        load_config(path)


def test_cli_config_error_exits_2_without_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "mailroom.yml"
    path.write_text(
        "mailboxes:\n"
        "  - address: incoming+%{key}@example.com\n"
        "    host: imap.example.com\n"
        "    port: 993\n"
        "    user: u\n"
        f"    password: {SECRET}\n"
        "webhook: {url: https://app.internal/incoming}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mailroom", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "mailroom: config error: mailboxes[0].port: 993 with ssl: false; "
        "set ssl: true or use port 143"
    )
    assert SECRET not in result.stdout + result.stderr
