"""Hostile and careless config (issue 13, points 7 and 8): every YAML or value error is a
ConfigError naming the dotted path and never the value; endpoint URLs carry no credentials and
are shown as scheme://host:port only. Ends with a bounded fuzz test over YAML documents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailroom import cli
from mailroom.config import ConfigError, GraphMailboxConfig, load_config, parse_config
from mailroom.config.document import load as load_yaml
from mailroom.config.reader import KEYS
from mailroom.redact import origin

# What the examples call the secret: it must never come back in an error.
WORD = "Secret"
DOCUMENT = """\
mailboxes:
  - address: incoming+%{{key}}@example.com
    host: imap.example.com
    ssl: true
    user: u
    password: {password}
webhook: {{url: {url}}}
"""


def write(tmp_path: Path, password: str = "'p'", url: str = "https://app.internal/x") -> Path:
    path = tmp_path / "mailroom.yml"
    path.write_text(DOCUMENT.format(password=password, url=url))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    text = str(caught.value)
    assert WORD not in text and "Traceback" not in text
    return text


# -- point 8: YAML errors around secrets -------------------------------------------------------

ALIAS = "mailboxes[0].password: starts with * (a YAML alias), but no &anchor of that name exists"
TAG = "mailboxes[0].password: starts with ! (a YAML tag) that mailroom does not know"


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        ("*Secret", ALIAS),
        ("!Secret", TAG),
        ("!Secret and more", TAG),
        ("!Secret {a: 1}", TAG),
        ("!!python/object:os.system Secret", TAG),
        ("2024-13-01", "mailboxes[0].password: YAML reads it as a date, but there is no such date"),
        ("!!int Secret", "mailboxes[0].password: YAML reads it as a whole number (!!int), but"),
        ("!!float Secret", "mailboxes[0].password: YAML reads it as a number (!!float), but"),
        ("!!bool Secret", "mailboxes[0].password: YAML reads it as true/false (!!bool), but"),
        ("!!binary Secret!", "mailboxes[0].password: YAML reads it as base64 (!!binary), but"),
        ("!!timestamp Secret", "mailboxes[0].password: YAML reads it as a date, but there is"),
        ("[*Secret]", "mailboxes[0].password[0]: starts with * (a YAML alias), but no"),
        ("{x: !!int Secret}", "mailboxes[0].password.x: YAML reads it as a whole number"),
    ],
)
def test_values_yaml_cannot_construct_name_the_path_not_the_value(
    tmp_path: Path, password: str, expected: str
) -> None:
    text = error_of(write(tmp_path, password))
    assert text.startswith(expected)
    assert text.endswith("mailroom.yml, line 6); put the value in quotes")


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        ("'Secret", "mailboxes[0].password: while scanning a quoted scalar, found unexpected end"),
        ('"Sec\\qret"', "mailboxes[0].password: while scanning a double-quoted scalar, found "),
        ("Sec: ret", "mailboxes[0]: mapping values are not allowed here ("),
        ("%Secret", "mailboxes[0].password: while scanning for the next token, found character"),
        ("&Secret a\n    port: &Secret 1", "mailboxes[0].port: found duplicate anchor"),
    ],
)
def test_syntax_errors_name_the_path_and_the_line_not_the_value(
    tmp_path: Path, password: str, expected: str
) -> None:
    text = error_of(write(tmp_path, password))
    assert text.startswith(expected)
    assert ", line " in text and text.endswith("; fix the YAML syntax")


@pytest.mark.parametrize("opener", ["[Secret", "{x: Secret", '"Secret'])
def test_an_unclosed_bracket_or_quote_is_named_where_it_was_opened(
    tmp_path: Path, opener: str
) -> None:
    # The parser gives up lines below, at the next mapping or at the end of the file: the
    # path and line to look at are the ones where the value began.
    text = error_of(write(tmp_path, opener))
    assert text.startswith("mailboxes[0].password: while ")
    assert "mailroom.yml, line 6, column 15 where it opens; YAML gave up at line " in text


def test_a_real_date_or_number_as_a_password_is_refused_not_guessed(tmp_path: Path) -> None:
    assert error_of(write(tmp_path, "2024-01-31")) == (
        "mailboxes[0].password: expected a string, got date; put the value in quotes"
    )
    assert error_of(write(tmp_path, "0755")).endswith("got int; put the value in quotes")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("'https://[bad/hook'", "webhook.url: is not a URL (a [ without its ]); write it like"),
        ("'https://[::1/Secret'", "webhook.url: is not a URL (a [ without its ])"),
        ("'http://127.0.0.1:99999/x'", "webhook.url: http://127.0.0.1:99999: the port is not a"),
        ("'https://[::1]:70000/x'", "webhook.url: https://[::1]:70000: the port is not a"),
        ("'https://app:Secret/x'", "webhook.url: https://app:?: the port is not a number"),
        ("'https://app:0/x'", "webhook.url: https://app:0: the port is not a number from 1"),
        ("'https://u:Secret@app/x'", "webhook.url: https://app:443: must not carry user:pass"),
        ("'https://Secret@app/x'", "webhook.url: https://app:443: must not carry user:password@"),
        ("'ftp://app/Secret'", "webhook.url: is not an http or https URL (ftp://app:80); write"),
        ("'Secret'", "webhook.url: is not an http or https URL; write it like https://host/path"),
    ],
)
def test_webhook_url_errors_show_at_most_scheme_host_port(
    tmp_path: Path, url: str, expected: str
) -> None:
    assert error_of(write(tmp_path, url=url)).startswith(expected)


def test_a_query_in_the_webhook_url_is_allowed_and_never_shown(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, url="'https://app.internal/x?token=Secret'"), env={})
    assert config.webhook.url == "https://app.internal/x?token=Secret"
    assert origin(config.webhook.url) == "https://app.internal:443"
    assert "Secret" not in repr(config)


def test_other_values_are_quoted_only_when_they_are_a_short_word(tmp_path: Path) -> None:
    # A stray quote makes the next line (a secret) part of the port's value.
    path = tmp_path / "mailroom.yml"
    path.write_text(
        "mailboxes:\n  - address: incoming+%{key}@example.com\n    host: imap.example.com\n"
        '    port: "993\n    password: Secret\n    user: "\nwebhook: {url: https://app/x}\n'
    )
    assert error_of(path) == (
        "mailboxes[0].port: expected a whole number, got a text of 27 characters"
    )
    path.write_text(DOCUMENT.format(password="p", url="https://a/x").replace("true", "maybe"))
    assert error_of(path) == "mailboxes[0].ssl: expected true or false, got 'maybe'"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"address": "incoming+%{key}@example.com Secret"}, "mailboxes[0].address: a text of"),
        ({"id": "two words"}, "mailboxes[1].id: a text of 9 characters is used twice"),
        ({"reply_host": "Secret host"}, "mailboxes[0].reply_host: a text of 11 characters is"),
        ({"content_type": "text/plain Secret"}, "webhook.content_type: a text of 17 characters"),
    ],
)
def test_values_with_spaces_are_described_not_quoted(change: dict[str, Any], expected: str) -> None:
    box = {"address": "incoming+%{key}@example.com", "host": "h", "user": "u", "password": "p"}
    webhook = {"url": "https://app/x"}
    if "content_type" in change:
        webhook.update(change, format="raw")
    else:
        box.update(change)
    boxes = [box, dict(box)] if "id" in change else [box]
    with pytest.raises(ConfigError) as caught:
        parse_config({"mailboxes": boxes, "webhook": webhook}, env={})
    assert str(caught.value).startswith(expected)
    assert WORD not in str(caught.value)


def test_a_secret_given_as_a_file_name_by_mistake_is_not_printed(tmp_path: Path) -> None:
    path = tmp_path / "mailroom.yml"
    path.write_text(DOCUMENT.format(password="p", url="https://a/x").replace("password:", "pa:"))
    text = path.read_text().replace("    pa: p\n", "    password_file: Secret\n")
    path.write_text(text)
    assert error_of(path) == (
        f"mailboxes[0].password_file: the file it names does not exist (relative to {tmp_path})"
    )


@pytest.mark.parametrize(
    "text",
    [
        "mailboxes: [" * 2000,  # deeper than Python's recursion limit
        "a: 1\n---\nb: 2\n",  # two documents
        "password: Sec\x00ret\n",  # a character YAML does not allow
        "\ufeffmailboxes: *Secret\n",
        "<<: *Secret\n",
        "? [a, b]\n: Secret\n",  # a key that cannot be a dict key
        "x: &a [*a]\nmailboxes: *a\n",  # a list that contains itself
    ],
)
def test_whatever_the_yaml_the_error_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "mailroom.yml"
    path.write_text(text)
    error_of(path)


# -- the command line: exit 2, one line, and `check` reports it as its config load -----------


@pytest.mark.parametrize(
    ("password", "url"),
    [
        ("*Secret", "https://a/x"),
        ("!Secret", "https://a/x"),
        ("2024-13-01", "https://a/x"),
        ("!!int Secret", "https://a/x"),
        ("p", "'https://[bad/hook'"),
    ],
)
@pytest.mark.usefixtures("restore_logging")
def test_run_exits_2_and_check_prints_its_config_load_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], password: str, url: str
) -> None:
    path = write(tmp_path, password, url)
    assert cli.main(["-c", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("mailroom: config error: ") and err.count("\n") == 1
    assert cli.main(["check", "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    first, second = out.splitlines()
    assert first.startswith("FAIL config load: ")
    assert second == "mailroom check: the config does not load; nothing else was checked"
    assert WORD not in out + err


@pytest.mark.slow
def test_no_traceback_from_the_real_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailroom", "-c", str(write(tmp_path, "!!int Secret"))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "mailroom: config error: mailboxes[0].password: YAML reads it as a whole number "
        f"(!!int), but it is not one ({tmp_path}/mailroom.yml, line 6); put the value in quotes\n"
    )


# -- point 7: credentials in OAuth and Graph endpoint URLs ------------------------------------


def graph_box(**options: Any) -> dict[str, Any]:
    return {
        "inbox_method": "microsoft_graph",
        "address": "incoming+%{key}@example.com",
        "user": "incoming@example.com",
        "inbox_options": {"tenant_id": "t", "client_id": "c", "client_secret": "s", **options},
    }


def xoauth2_box(**oauth: Any) -> dict[str, Any]:
    return {
        "address": "incoming+%{key}@example.com",
        "host": "outlook.office365.com",
        "ssl": True,
        "user": "incoming@example.com",
        "auth": "xoauth2",
        "oauth": {"tenant_id": "t", "client_id": "c", "client_secret": "s", **oauth},
    }


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        (
            graph_box(azure_ad_endpoint="http://user:Secret@login.example.com"),
            "mailboxes[0].inbox_options.azure_ad_endpoint: is not an https URL "
            "(http://login.example.com:80); write it like https://login.microsoftonline.com",
        ),
        (
            graph_box(azure_ad_endpoint="https://user:Secret@login.example.com"),
            "mailboxes[0].inbox_options.azure_ad_endpoint: https://login.example.com:443: must "
            "not carry user:password@; remove it",
        ),
        (
            graph_box(azure_ad_endpoint="https://login.example.com/?token=Secret"),
            "mailboxes[0].inbox_options.azure_ad_endpoint: https://login.example.com:443: must "
            "not carry a ?query or #fragment; remove it",
        ),
        (
            graph_box(graph_endpoint="https://Secret@graph.example.com:8443/v1"),
            "mailboxes[0].inbox_options.graph_endpoint: https://graph.example.com:8443: must not",
        ),
        (
            graph_box(graph_endpoint="https://graph.example.com#Secret"),
            "mailboxes[0].inbox_options.graph_endpoint: https://graph.example.com:443: must not",
        ),
        (
            graph_box(graph_endpoint="https://graph.example.com?"),
            "mailboxes[0].inbox_options.graph_endpoint: https://graph.example.com:443: must not",
        ),
        (
            xoauth2_box(azure_ad_endpoint="https://u:Secret@login.example.com"),
            "mailboxes[0].oauth.azure_ad_endpoint: https://login.example.com:443: must not carry",
        ),
        (
            xoauth2_box(scope="https://u:Secret@outlook.office365.com/.default"),
            "mailboxes[0].oauth.scope: https://outlook.office365.com:443: must not carry user:",
        ),
        (
            xoauth2_box(scope="api://app/.default?Secret"),
            "mailboxes[0].oauth.scope: api://app:80: must not carry a ?query or #fragment",
        ),
    ],
)
def test_endpoint_urls_refuse_userinfo_and_queries(box: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"mailboxes": [box], "webhook": {"url": "https://app/x"}}, env={})
    assert str(caught.value).startswith(expected)
    assert WORD not in str(caught.value) and "user" not in str(caught.value).split(":", 1)[1][:40]


def test_endpoints_with_a_path_and_a_port_load() -> None:
    box = graph_box(
        azure_ad_endpoint="https://login.example.com:8443/", graph_endpoint="https://g.example/p/"
    )
    config = parse_config({"mailboxes": [box], "webhook": {"url": "https://app/x"}}, env={})
    mailbox = config.mailboxes[0]
    assert isinstance(mailbox, GraphMailboxConfig)
    options = mailbox.inbox_options
    assert options.azure_ad_endpoint == "https://login.example.com:8443"
    assert options.graph_endpoint == "https://g.example/p"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:p@Host.example:8443/path?q=1#f", "https://host.example:8443"),
        ("http://127.0.0.1:99999/x", "http://127.0.0.1:99999"),
        ("https://app:abc/x", "https://app:?"),
        ("https://[::1]/x", "https://[::1]:443"),
        ("https://[bad/x", "(not a URL)"),
        ("http://app:0/x", "http://app:0"),
    ],
)
def test_origin(url: str, shown: str) -> None:
    assert origin(url) == shown


# -- fuzz: any YAML document gives a Config or a ConfigError, never the secret ----------------

FUZZ_SECRET = "correct horse battery staple 7Qx"
BASE = f"""\
mailboxes:
  - id: imap
    address: "incoming+%{{key}}@example.com"
    host: imap.example.com
    port: 993
    ssl: true
    user: incoming@example.com
    password: "{FUZZ_SECRET}"
  - inbox_method: microsoft_graph
    address: "incoming+%{{key}}@example.com"
    user: incoming@example.com
    inbox_options:
      tenant_id: t
      client_id: c
      client_secret: '{FUZZ_SECRET}'
      azure_ad_endpoint: https://login.example.com
webhook:
  url: https://app.example.com/hook
  basic: {{user: u, password: {FUZZ_SECRET}}}
reject_notices:
  from: noreply@example.com
  smtp:
    host: smtp.example.com
    port: 587
    start_tls: true
    user: u
    password: >-
      {FUZZ_SECRET}
"""
SNIPPETS = [
    *"*&!'\"[]{}:-#%@`|>?\\\t\n,",
    ": ",
    "- ",
    "\n  ",
    "\n    ",
    "&a ",
    "*a",
    "*nope ",
    "!!int ",
    "!!float ",
    "!!bool ",
    "!!binary ",
    "!!timestamp ",
    "!!python/name:os.system ",
    "!Secret ",
    "2024-13-01",
    "2024-01-31",
    "<<: *a\n",
    "---\n",
    "${NOPE}",
    "${HOME}",
    "_file",
    "https://u:p@h:99999/?q#f",
    "\x00",
    "\x85",
    "\ufeff",
    ".inf",
    "0x_",
    "9" * 5000,
]
mutation = st.tuples(
    st.integers(min_value=0, max_value=len(BASE)),
    st.one_of(st.sampled_from(SNIPPETS), st.text(max_size=4)),
    st.integers(min_value=0, max_value=8),
)
mutated = st.lists(mutation, min_size=1, max_size=4).map(lambda edits: _apply(BASE, edits))
leaf = st.one_of(
    st.just(FUZZ_SECRET),
    st.sampled_from(SNIPPETS),
    st.text(max_size=12),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
)
# Any key mailroom knows except the encrypted credentials' (those messages name their files).
key = st.one_of(st.sampled_from(sorted(KEYS - {"credentials"})), st.text(max_size=8))
tree = st.recursive(
    leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(key, inner, max_size=5)),
    max_leaves=25,
)
# Generated values put where the valid document has one (or anywhere, as a new key).
PLACES = [
    ("mailboxes", 0, "port"),
    ("mailboxes", 0, "password"),
    ("mailboxes", 0),
    ("mailboxes", 1, "inbox_options"),
    ("mailboxes", 1, "inbox_options", "azure_ad_endpoint"),
    ("webhook", "url"),
    ("webhook", "basic"),
    ("reject_notices", "smtp"),
    ("reject_notices", "from"),
    ("mailboxes",),
    (),
]
generated = st.builds(
    lambda place, name, value: yaml.safe_dump(_put(place, name, value), allow_unicode=True),
    st.sampled_from(PLACES),
    key,
    tree,
)


def _put(place: tuple[str | int, ...], name: str, value: Any) -> Any:
    data = yaml.safe_load(BASE)
    if not place:
        data[name] = value
        return data
    node = data
    for step in place[:-1]:
        node = node[step]
    node[place[-1]] = value
    return data


def _apply(text: str, edits: list[tuple[int, str, int]]) -> str:
    for position, insert, delete in edits:
        at = position % (len(text) + 1)
        text = text[:at] + insert + text[at + delete :]
    return text


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.one_of(mutated, generated))
@pytest.mark.slow
def test_fuzz_any_yaml_gives_a_config_or_a_config_error_without_the_secret(
    tmp_path: Path, text: str
) -> None:
    try:
        parse_config(load_yaml(text, "fuzz.yml"), env={"HOME": "/root"}, base_dir=tmp_path)
    except ConfigError as exc:
        assert FUZZ_SECRET not in str(exc)
