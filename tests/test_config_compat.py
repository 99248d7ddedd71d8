"""What a config may hold beyond the schema (``mailroom.config.compat``): ``x-`` blocks for
YAML anchors, and deprecated keys, read under their new names with a warning that ``mailroom
run`` logs and ``mailroom check`` shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom import cli
from mailroom.config import ConfigError, ImapMailboxConfig, compat, load_config, parse_config
from mailroom.config.compat import Deprecated, normalise
from mailroom.config.document import load as load_yaml
from mailroom.config.reader import KEYS
from tests.helpers import ROOT

ANCHORED = """\
x-imap: &imap                  # a block to merge into each mailbox
  host: imap.example.com
  port: 993
  ssl: true
  password: secret
  x-note: an extension key inside a merged block is dropped too
mailboxes:
  - <<: *imap
    id: sales
    address: "sales+%{key}@example.com"
    user: sales@example.com
  - <<: *imap
    id: support
    address: "support+%{key}@example.com"
    user: support@example.com
    port: 143                  # a key beside the merge wins over the merged one
    ssl: false
    start_tls: true
    x-owner: helpdesk team     # at any level
webhook:
  url: https://app.example.com/incoming
  x-comment: {any: [thing]}
"""


def test_x_blocks_at_any_level_carry_anchors_and_are_not_read() -> None:
    config = parse_config(load_yaml(ANCHORED, "mailroom.yml"), env={})
    sales, support = config.mailboxes
    assert isinstance(sales, ImapMailboxConfig) and isinstance(support, ImapMailboxConfig)
    assert (sales.host, sales.port, sales.ssl) == ("imap.example.com", 993, True)
    assert (support.host, support.port, support.start_tls) == ("imap.example.com", 143, True)
    assert config.warnings == ()


def test_an_unknown_key_is_still_an_error_beside_x_keys() -> None:
    data = load_yaml(ANCHORED.replace("  x-comment:", "  comment:"), "mailroom.yml")
    with pytest.raises(ConfigError, match=r"^webhook: unknown key comment"):
        parse_config(data, env={})


def test_the_caller_s_document_is_not_changed() -> None:
    data: dict[str, Any] = {"x-a": 1, "b": {"x-c": 2, "d": [{"x-e": 3, "f": 4}]}}
    before = yaml.safe_dump(data)
    assert normalise(data) == ({"b": {"d": [{"f": 4}]}}, ())
    assert yaml.safe_dump(data) == before


def test_blocks_shared_by_aliases_stay_shared_and_a_loop_ends() -> None:
    shared: dict[str, Any] = {"x-drop": 1, "keep": 2}
    looped: list[Any] = []
    looped.append(looped)
    out, _ = normalise({"a": shared, "b": shared, "loop": looped})
    assert out["a"] is out["b"] == {"keep": 2}
    assert out["loop"][0] is out["loop"]


RENAMED = (
    Deprecated(path="mailboxes[].idle_time", replacement="idle_timeout", since="0.2.0"),
    Deprecated(
        path="webhook.retry.maximum", replacement="max", since="0.2.0", note="in seconds, as before"
    ),
    Deprecated(path="log.colour", replacement=None, since="0.3.0"),
)


def test_a_deprecated_key_is_read_under_its_new_name_with_a_warning() -> None:
    data = {
        "mailboxes": [{"id": "a", "idle_time": 30}, {"id": "b", "idle_timeout": 40}],
        "webhook": {"url": "u", "retry": {"maximum": 60}},
        "log": {"colour": True, "level": "info"},
    }
    out, warnings = normalise(data, RENAMED)
    assert out == {
        "mailboxes": [{"id": "a", "idle_timeout": 30}, {"id": "b", "idle_timeout": 40}],
        "webhook": {"url": "u", "retry": {"max": 60}},
        "log": {"level": "info"},
    }
    assert sorted(warnings) == [
        "log.colour: deprecated since 0.3.0, and it has no effect any more: remove it "
        "(docs/upgrading.md)",
        "mailboxes[0].idle_time: deprecated since 0.2.0: rename it to idle_timeout (the old "
        "name goes in the next major release; docs/upgrading.md)",
        "webhook.retry.maximum: deprecated since 0.2.0: rename it to max (the old name goes in "
        "the next major release; docs/upgrading.md); in seconds, as before",
    ]


def test_the_old_and_the_new_name_together_are_an_error() -> None:
    data = {"mailboxes": [{"id": "a", "idle_time": 30, "idle_timeout": 40}]}
    with pytest.raises(ConfigError) as caught:
        normalise(data, RENAMED)
    assert str(caught.value) == (
        "mailboxes[0].idle_time: is the old name of idle_timeout, which is set too; remove "
        "idle_time"
    )


def test_every_deprecated_key_names_a_key_mailroom_reads() -> None:
    for entry in compat.DEPRECATED:
        assert entry.replacement is None or entry.replacement in KEYS, entry
        assert entry.key not in KEYS, f"{entry.key} is deprecated and still read"


def test_run_logs_and_check_shows_a_deprecated_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(compat, "DEPRECATED", RENAMED)
    path = tmp_path / "mailroom.yml"
    box = {
        "id": "a",
        "address": "a+%{key}@example.com",
        "host": "127.0.0.1",
        "port": 1,
        "user": "u",
        "password": "p",
        "idle_time": 30,
    }
    path.write_text(yaml.safe_dump({"mailboxes": [box], "webhook": {"url": "https://a.example"}}))
    config = load_config(path)
    (mailbox,) = config.mailboxes
    assert isinstance(mailbox, ImapMailboxConfig) and mailbox.idle_timeout_s == 30
    assert cli.main(["check", "-c", str(path)]) == 1  # nothing listens on port 1
    out = capsys.readouterr().out
    assert (
        "WARN config advice: mailboxes[0].idle_time: deprecated since 0.2.0: rename it to "
        "idle_timeout" in out
    )


keys = st.one_of(
    st.sampled_from(["x-a", "x-", "mailboxes", "id", "idle_time"]), st.text(max_size=5)
)
documents = st.recursive(
    st.one_of(st.none(), st.integers(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_any_document_is_copied_without_its_x_keys(data: Any) -> None:
    try:
        out, _ = normalise(data, RENAMED)
    except ConfigError:
        return  # an old and a new name side by side
    assert not [k for k in _keys(out) if isinstance(k, str) and k.startswith("x-")]
    plain, warnings = normalise(out, ())
    assert (plain, warnings) == (out, ())  # what is left is kept as it is


def _keys(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [*node, *(k for v in node.values() for k in _keys(v))]
    if isinstance(node, list):
        return [k for item in node for k in _keys(item)]
    return []


def test_the_documented_anchor_example_loads(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    section = page.split("## Repeated settings", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    secret = tmp_path / "imap-password"
    secret.write_text("pw\n")
    text = block.replace("/run/secrets/imap-password", str(secret))
    config = parse_config(load_yaml(text, "configuration.md"), env={})
    assert [(m.id, getattr(m, "host", None)) for m in config.mailboxes] == [
        ("sales", "imap.example.com"),
        ("support", "imap.example.com"),
    ]
