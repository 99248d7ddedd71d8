"""Config loading: defaults, ${ENV}, *_file secrets, and errors that name the path."""

from __future__ import annotations

import gc
import logging
import re
import subprocess
import sys
from asyncio.sslproto import SSLProtocol
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailroom import cli
from mailroom.config import (
    Config,
    ConfigError,
    ImapMailboxConfig,
    Secret,
    SmtpConfig,
    load_config,
    parse_config,
)
from mailroom.config.model import SWITCH_KEYS, config_keys
from mailroom.config.reader import KEYS, SECRET_KEYS
from mailroom.mail import routing
from mailroom.runtime import supervisor
from mailroom.trust import tls
from tests.helpers import ROOT

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
    assert isinstance(box, ImapMailboxConfig)
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
    box = config.mailboxes[0]
    assert isinstance(box, ImapMailboxConfig) and box.password is not None
    assert SECRET not in str(box.password)
    assert box.password.reveal() == SECRET


def test_env_and_file_secrets(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET + "\n")
    data = minimal(password=None, password_file="pw", host="${IMAP_HOST}", port="${IMAP_PORT}")
    data["mailboxes"][0].pop("password")
    data["webhook"]["signing_secret"] = "${WHSEC}"
    config = parse_config(
        data, env={"IMAP_HOST": "mail.test", "IMAP_PORT": "1143", "WHSEC": WHSEC}, base_dir=tmp_path
    )
    box = config.mailboxes[0]
    assert isinstance(box, ImapMailboxConfig)
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
        ({"colour": "blue"}, "mailboxes[0]: unknown key colour; known keys here: address, auth,"),
        ({"password": None}, "mailboxes[0].password: is required (or password_file"),
        ({"address": "i@%{key}.ex.com"}, "mailboxes[0].address: 'i@%{key}.ex.com': %{key} must"),
        ({"address": "nobody"}, "mailboxes[0].address: 'nobody' is not an address template"),
        ({"host": "${NOPE}"}, "mailboxes[0].host: environment variable NOPE is not set"),
        ({"inbox_method": "pop3"}, "mailboxes[0].inbox_method: 'pop3' is not one of: imap,"),
        ({"ssl": "maybe"}, "mailboxes[0].ssl: expected true or false, got 'maybe'"),
        (
            {"ca_file": "/nonexistent/ca.pem"},
            "mailboxes[0].ca_file: the file it names does not exist",
        ),
    ],
)
def test_mailbox_errors_name_the_path(change: dict[str, Any], expected: str) -> None:
    assert error_of(changed(change)).startswith(expected)


def changed(change: dict[str, Any]) -> dict[str, Any]:
    """``minimal()`` with the mailbox's keys set, or removed where the value is None."""
    data = minimal()
    for key, value in change.items():
        if value is None:
            data["mailboxes"][0].pop(key)
        else:
            data["mailboxes"][0][key] = value
    return data


def test_password_and_password_file_exclude_each_other(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x")
    assert error_of(minimal(password_file="pw"), base_dir=tmp_path).startswith(
        "mailboxes[0].password: give either password or password_file, not both"
    )


def test_unreadable_secret_file_is_named_not_printed(tmp_path: Path) -> None:
    data = minimal(password_file="missing")
    data["mailboxes"][0].pop("password")
    assert error_of(data, base_dir=tmp_path).startswith(
        f"mailboxes[0].password_file: the file it names does not exist (relative to {tmp_path})"
    )


@pytest.mark.parametrize(
    ("webhook", "expected"),
    [
        ({"url": "ftp://x"}, "webhook.url: is not an http or https URL (ftp://x:80); write it"),
        ({"url": "http://127.0.0.1:99999/x"}, "webhook.url: http://127.0.0.1:99999: the port is"),
        (
            {"url": "https://u:hunter2@app/x"},
            "webhook.url: https://app:443: must not carry user:password@; use webhook.basic",
        ),
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


def test_a_wrong_shape_says_what_to_write_instead() -> None:
    assert error_of(["not", "a", "mapping"]) == (
        "expected a mapping of keys, got a list; a config is key: value lines, mailboxes: and "
        "webhook: among them (`mailroom sample-config` writes one)"
    )
    assert error_of({**minimal(), "health": {"listen": "127.0.0.1:99999"}}) == (
        "health.listen: port 99999 is out of range; use a value from 0 to 65535"
    )
    assert error_of({**minimal(), "health": {"listen": "8080"}}).startswith(
        "health.listen: '8080' is not host:port"
    )
    assert error_of({**minimal(), "webhook": "https://app.example.com/in"}) == (
        "webhook: expected a mapping of keys, got str; write key: value lines, indented under it"
    )


def test_load_config_reports_yaml_syntax(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("mailboxes: [\n  - host: x\n webhook: {")
    with pytest.raises(ConfigError, match=r"\(.*bad\.yml, line \d+, column \d+\); fix the YAML"):
        load_config(path)


@pytest.mark.slow
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


# -- routing keys, reject_notices and warnings ---------------------------------------------------

NOTICES: dict[str, Any] = {
    "from": "Example <NoReply@example.com>",
    "smtp": {"host": "smtp.example.com", "port": 587, "start_tls": True, "user": "mailroom"},
}


def with_notices(**notices: Any) -> dict[str, Any]:
    data = minimal()
    block: dict[str, Any] = {**NOTICES, "smtp": {**NOTICES["smtp"], "password": SECRET}}
    block.update(notices)
    data["reject_notices"] = block
    return data


def test_routing_defaults_and_no_notices_without_the_block() -> None:
    config = parse_config(minimal(start_tls=True), env={})
    rules = config.mailboxes[0].routing
    assert rules.reply_host is None
    assert rules.reply_domain == "example.com"
    assert rules.ignore_auto_generated == frozenset(routing.AUTO_GENERATED_RULES)
    assert rules.own_addresses == frozenset({"incoming@example.com"})  # the mailbox user
    assert config.reject_notices is None
    assert config.warnings == ()


def test_routing_keys() -> None:
    data = minimal(
        reply_host="Reply.Example.com",
        ignore_auto_generated={"precedence": False, "x_loop": "yes"},
        own_addresses=["Help <help@example.com>", "${OWN}"],
        user="login-name",
    )
    rules = parse_config(data, env={"OWN": "desk@example.com"}).mailboxes[0].routing
    assert rules.reply_domain == "reply.example.com"
    assert rules.ignore_auto_generated == frozenset(routing.AUTO_GENERATED_RULES) - {"precedence"}
    assert rules.own_addresses == frozenset({"help@example.com", "desk@example.com"})


def test_reject_notices_block_with_defaults(tmp_path: Path) -> None:
    (tmp_path / "smtp-pw").write_text(SECRET + "\n")
    data = with_notices(trusted_authserv_ids=["MX.example.com"], footer="Example Inc.\nHelp")
    data["reject_notices"]["smtp"] = {**NOTICES["smtp"], "password_file": "smtp-pw"}
    data["mailboxes"][0]["start_tls"] = True
    config = parse_config(data, env={}, base_dir=tmp_path)
    notices = config.reject_notices
    assert notices is not None
    assert (notices.sender, notices.sender_address) == (NOTICES["from"], "NoReply@example.com")
    assert (notices.require_authenticated_sender, notices.footer) == (False, "Example Inc.\nHelp")
    assert notices.trusted_authserv_ids == frozenset({"mx.example.com"})
    assert notices.smtp == SmtpConfig(
        host="smtp.example.com",
        port=587,
        ssl=False,
        start_tls=True,
        tls_verify=True,
        ca_file=None,
        user="mailroom",
        password=Secret(SECRET),
        timeout_s=30.0,
    )
    assert SECRET not in repr(config)
    retry = notices.retry
    assert (retry.initial_s, retry.max_s, retry.give_up_after_s) == (5.0, 600.0, 86_400.0)
    # The notice's own address is ours: never a notice to it, X-Loop naming it is a loop.
    assert "noreply@example.com" in config.mailboxes[0].routing.own_addresses
    assert config.warnings == ()


@pytest.mark.parametrize(
    ("smtp", "port"),
    [({"ssl": True}, 465), ({"start_tls": True}, 587), ({}, 25)],
)
def test_smtp_default_ports(smtp: dict[str, Any], port: int) -> None:
    data = with_notices(smtp={"host": "smtp.example.com", **smtp})
    notices = parse_config(data, env={}).reject_notices
    assert notices is not None
    assert notices.smtp.port == port


def test_disabled_notices_still_make_the_from_address_ours() -> None:
    data = minimal()
    data["reject_notices"] = {"enabled": False, "from": "noreply@example.com"}
    config = parse_config(data, env={})
    assert config.reject_notices is None
    assert "noreply@example.com" in config.mailboxes[0].routing.own_addresses


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"ignore_auto_generated": {"bogus": False}},
            "mailboxes[0].ignore_auto_generated.bogus: unknown rule; known rules: "
            "auto_submitted, x_autoreply, precedence, x_auto_response_suppress, dsn, "
            "null_sender, mailer_daemon, x_loop",
        ),
        (
            {"ignore_auto_generated": {"dsn": "sometimes"}},
            "mailboxes[0].ignore_auto_generated.dsn: expected true or false, got 'sometimes'",
        ),
        (
            {"ignore_auto_generated": ["dsn"]},
            "mailboxes[0].ignore_auto_generated: expected a mapping of keys, got a list",
        ),
        (
            {"own_addresses": "a@example.com"},
            "mailboxes[0].own_addresses: expected a list of addresses, got str",
        ),
        (
            {"own_addresses": ["not an address"]},
            "mailboxes[0].own_addresses[0]: a text of 14 characters is not an email address",
        ),
        ({"reply_host": "bad_host"}, "mailboxes[0].reply_host: 'bad_host' is not a host name"),
    ],
)
def test_routing_key_errors(change: dict[str, Any], expected: str) -> None:
    assert error_of(minimal(**change)).startswith(expected)


@pytest.mark.parametrize(
    ("notices", "expected"),
    [
        ({"from": None}, "reject_notices.from: is required"),
        ({"from": "nobody"}, "reject_notices.from: 'nobody' is not an email address"),
        ({"smtp": None}, "reject_notices.smtp: is required, like {host: smtp.example.com"),
        ({"smtp": {"port": 25}}, "reject_notices.smtp.host: is required"),
        (
            {"smtp": {"host": "h", "port": 465}},
            "reject_notices.smtp.port: 465 with ssl: false; set ssl: true or use port 587",
        ),
        (
            {"smtp": {"host": "h", "port": 587, "ssl": True}},
            "reject_notices.smtp.port: 587 with ssl: true; use port 465, or ssl: false with",
        ),
        (
            {"smtp": {"host": "h", "ssl": True, "start_tls": True}},
            "reject_notices.smtp.start_tls: ssl (implicit TLS) and start_tls exclude each other",
        ),
        (
            {"smtp": {"host": "h", "user": "u"}},
            "reject_notices.smtp.password: is required (or password_file",
        ),
        (
            {"smtp": {"host": "h", "password": SECRET}},
            "reject_notices.smtp.user: is required with a password",
        ),
        ({"smtp": {"host": "h", "colour": 1}}, "reject_notices.smtp: unknown key colour"),
        ({"retry": {"initial": 10, "max": 1}}, "reject_notices.retry.max: must be at least"),
        ({"retry": {"give_up_after": 0}}, "reject_notices.retry.give_up_after: 0 is out of range"),
        ({"trusted_authserv_ids": "mx"}, "reject_notices.trusted_authserv_ids: expected a list"),
        ({"footer": ["x"]}, "reject_notices.footer: expected text, got a list"),
        ({"enabled": "maybe"}, "reject_notices.enabled: expected true or false, got 'maybe'"),
        ({"sender": "x"}, "reject_notices: unknown key sender; known keys here:"),
    ],
)
def test_reject_notices_errors(notices: dict[str, Any], expected: str) -> None:
    data = with_notices()
    for key, value in notices.items():
        if value is None:
            data["reject_notices"].pop(key)
        else:
            data["reject_notices"][key] = value
    assert error_of(data).startswith(expected)


def test_warnings_for_a_long_prefix_and_a_clear_text_smtp_password() -> None:
    data = with_notices()
    data["mailboxes"][0]["address"] = "a-very-long-incoming-mail-prefix+%{key}@example.com"
    data["reject_notices"]["smtp"]["start_tls"] = False
    data["reject_notices"]["smtp"]["port"] = 25
    config = parse_config(data, env={})
    assert config.warnings == (
        "mailboxes[0].address: the local part before %{key} is 33 characters; providers cap "
        "local parts at 64 (RFC 5321 §4.5.3.1.1), which leaves 31 for the key: keep it to 31 "
        "characters or fewer",
        "mailboxes[0].ssl: the IMAP password would cross the network in clear text; "
        "set ssl: true (port 993) or start_tls: true",
        "reject_notices.smtp.user: the SMTP password would cross the network in clear text; "
        "set start_tls: true (port 587) or ssl: true (port 465)",
    )
    assert SECRET not in " ".join(config.warnings)


def test_a_thousand_clear_text_mailboxes_make_one_warning() -> None:
    data = with_notices()
    box = data["mailboxes"][0]
    data["mailboxes"] = [{**box, "id": f"box{n:04d}"} for n in range(1000)]
    config = parse_config(data, env={})
    clear = [w for w in config.warnings if "clear text" in w and w.startswith("mailboxes")]
    assert clear == [
        "mailboxes[0].ssl: the IMAP password would cross the network in clear text; set ssl: "
        "true (port 993) or start_tls: true (the same for 999 more mailboxes: box0001, box0002, "
        "box0003 and 996 more)"
    ]


def test_cli_logs_the_config_warnings_and_tunes_gc_and_tls_buffers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mailroom.yml"
    path.write_text(
        "mailboxes:\n"
        "  - address: a-very-long-incoming-mail-prefix+%{key}@example.com\n"
        "    host: imap.example.com\n"
        "    user: u\n"
        f"    password: {SECRET}\n"
        "webhook: {url: https://app.internal/incoming}\n"
        "log: {format: text}\n"
    )

    thresholds = []

    async def run(config: Config, **kwargs: object) -> int:  # kwargs: load= (SIGHUP reload)
        thresholds.append(gc.get_threshold()[0])
        thresholds.append(SSLProtocol.max_size)
        return 0

    monkeypatch.setattr(supervisor, "run", run)
    monkeypatch.setattr(SSLProtocol, "max_size", SSLProtocol.max_size)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("mailroom").level)
    saved_gc = gc.get_threshold()
    try:
        assert cli.main(["-c", str(path)]) == 0
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("mailroom").setLevel(saved[2])
        gc.set_threshold(*saved_gc)
    # The service runs with the tuned GC and small TLS read buffers.
    assert thresholds == [cli.GC_YOUNG_THRESHOLD, tls.READ_BUFFER_BYTES]
    err = capsys.readouterr().err
    assert "WARNING mailroom.config config: mailboxes[0].address: the local part before" in err
    assert SECRET not in err


def test_a_mailbox_webhook_on_another_host_warns_about_inherited_credentials() -> None:
    data = minimal(ssl=True, webhook={"url": "https://other.example.net/hook"})
    data["webhook"]["token"] = "t0ken"
    config = parse_config(data, env={})
    assert config.warnings == (
        "mailboxes[0].webhook.url: posts to https://other.example.net:443 with the top-level "
        "webhook's token; restate them in this mailbox's webhook block (null to send none) if "
        "that host must not see them",
    )
    data["mailboxes"][0]["webhook"]["token"] = None
    assert parse_config(data, env={}).warnings == ()


def test_unquoted_numbers_are_not_taken_as_secrets() -> None:
    assert error_of(minimal(password=755)).startswith(
        "mailboxes[0].password: expected a string, got int; put the value in quotes"
    )


# -- typos and missing secrets (issue 14) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"pasword": SECRET, "password": None}, "mailboxes[0]: unknown key pasword; did you "),
        ({"pasword_file": "x", "password": None}, "mailboxes[0]: unknown key pasword_file; did"),
        ({"adress": "a+%{key}@example.com", "address": None}, "mailboxes[0]: unknown key adress;"),
        ({"hots": "imap.example.com", "host": None}, "mailboxes[0]: unknown key hots; did you "),
        ({"usr": "u", "user": None}, "mailboxes[0]: unknown key usr; did you mean user?"),
        ({"delete_after_delivey": False}, "mailboxes[0]: unknown key delete_after_delivey; did "),
        ({"sll": True}, "mailboxes[0]: unknown key sll; did you mean ssl?"),
        (
            {"colour": "blue", "sll": 1},
            "mailboxes[0]: unknown keys colour, sll (did you mean ssl?)",
        ),
    ],
)
def test_typos_in_keys_are_named_with_the_close_match(
    change: dict[str, Any], expected: str
) -> None:
    text = error_of(changed(change))
    assert text.startswith(expected)
    if "; did you mean" in expected or expected.endswith("did you "):
        assert text.count("did you mean") == 1


def test_typos_at_the_top_level_and_in_every_block() -> None:
    data = minimal()
    data["webhok"] = data.pop("webhook")
    assert error_of(data) == "unknown key webhok; did you mean webhook?"
    data = minimal()
    data["mailboxs"] = data.pop("mailboxes")
    assert error_of(data) == "unknown key mailboxs; did you mean mailboxes?"
    data = minimal()
    data["webhook"] = {"ulr": "https://app/x"}
    assert error_of(data) == "webhook: unknown key ulr; did you mean url?"
    data = minimal()
    data["webhook"]["signing_secert"] = WHSEC
    assert error_of(data) == "webhook: unknown key signing_secert; did you mean signing_secret?"
    data = with_notices()
    data["reject_notices"]["smtp"]["pasword"] = data["reject_notices"]["smtp"].pop("password")
    assert error_of(data) == "reject_notices.smtp: unknown key pasword; did you mean password?"
    data = minimal(ignore_auto_generated={"x_autorepy": False})
    assert error_of(data) == (
        "mailboxes[0].ignore_auto_generated.x_autorepy: unknown rule; did you mean x_autoreply?"
    )
    data = minimal()
    data["log"] = {"levle": "debug"}
    assert error_of(data) == "log: unknown key levle; did you mean level?"
    data = minimal(inbox_method="imapp")
    assert error_of(data) == (
        "mailboxes[0].inbox_method: 'imapp' is not one of: imap, microsoft_graph, lmtp; "
        "did you mean imap?"
    )


def test_a_valid_key_elsewhere_is_not_taken_for_a_typo() -> None:
    # own_addresses is close to address, but valid here: "address" is simply missing.
    data = minimal(own_addresses=["help@example.com"])
    data["mailboxes"][0].pop("address")
    assert error_of(data) == "mailboxes[0].address: is required"


def test_the_keys_derived_from_the_model_are_the_keys_the_getters_read() -> None:
    """KEYS comes from the model (model.FIELD_KEYS): a key no getter reads is a field that
    needs its entry there; a key read and not derived would miss the typo check."""
    source = "".join(p.read_text() for p in (ROOT / "mailroom" / "config").glob("*.py"))
    getters = r"(?:\.(?:text|number|flag|secret|choice|raw|section|path_value|url)\(|_block\(root,)"
    getters += r"\s*\"([a-z_]+)\""
    keys = set(re.findall(getters, source))
    keys |= {name for name in ("ca_file", "proxy") if f".{name}()" in source}  # their default
    secrets = set(re.findall(r"\.secret\(\s*\"([a-z_]+)\"", source))
    assert keys | {f"{k}_file" for k in secrets} == KEYS
    assert secrets == SECRET_KEYS  # what an offline read (mailroom route) does not need


@dataclass(frozen=True, kw_only=True)
class NewBlock:
    stall_timeout_s: float = 1.0
    token: Secret | None = None


@dataclass(frozen=True, kw_only=True)
class NewRoot:
    block: NewBlock | None = None
    tags: tuple[str, ...] = ()


def test_a_new_field_is_a_new_key() -> None:
    assert config_keys(NewRoot) - set(SWITCH_KEYS) == {
        "block", "tags", "stall_timeout", "token", "token_file"
    }  # fmt: skip


def test_every_missing_secret_and_variable_is_reported_at_once(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    data = minimal(password=None, password_file="/run/secrets/imap", host="${IMAP_HOST}")
    data["mailboxes"][0].pop("password")
    data["mailboxes"].append(dict(data["mailboxes"][0], id="second", user="${IMAP_HOST}"))
    data["webhook"].update(signing_secret_file="empty", token="${TOKEN}")
    data["reject_notices"] = {
        **NOTICES,
        "smtp": {**NOTICES["smtp"], "password_file": "/run/secrets/smtp", "ca_file": "ca.pem"},
    }
    assert error_of(data, base_dir=tmp_path) == (
        "6 settings cannot be read; fix them all:\n"
        "  mailboxes[0].host: environment variable IMAP_HOST is not set; export it or edit "
        "the file\n"
        "  mailboxes[0].password_file: the file it names does not exist\n"
        f"  webhook.signing_secret_file: the file it names is empty (relative to {tmp_path})\n"
        "  webhook.token: environment variable TOKEN is not set; export it or edit the file\n"
        "  reject_notices.smtp.password_file: the file it names does not exist\n"
        "  reject_notices.smtp.ca_file: the file it names does not exist (relative to "
        f"{tmp_path})"
    )


def test_the_example_config_reports_all_its_missing_secret_files_at_once(tmp_path: Path) -> None:
    env = {"AZURE_TENANT_ID": "contoso.onmicrosoft.com", "AZURE_CLIENT_ID": "client"}
    with pytest.raises(ConfigError) as caught:
        load_config(ROOT / "examples" / "mailroom.yml", env=env)
    lines = str(caught.value).splitlines()
    assert lines[0] == "8 settings cannot be read; fix them all:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "mailboxes[0].password_file",
        "mailboxes[1].inbox_options.client_secret_file",
        "mailboxes[2].oauth.client_secret_file",
        "mailboxes[3].oauth.client_secret_file",
        "mailboxes[3].oauth.refresh_token_file",
        "webhook.signing_secret_file",
        "webhook.jwt.secret_file",
        "reject_notices.smtp.password_file",
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "the file it names is empty"),
        (b"\xff\xfe", "the file it names is not UTF-8 text"),
        (b"x" * 70_000, "the file it names is larger than 64 KiB; it should hold one secret"),
    ],
)
def test_secret_files_that_cannot_hold_a_secret(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    (tmp_path / "pw").write_bytes(content)
    data = minimal(password_file=str(tmp_path / "pw"))
    data["mailboxes"][0].pop("password")
    assert error_of(data, base_dir=tmp_path) == f"mailboxes[0].password_file: {expected}"
    data["mailboxes"][0]["password_file"] = str(tmp_path)
    assert error_of(data) == (
        "mailboxes[0].password_file: the file it names is a directory or a device"
    )
