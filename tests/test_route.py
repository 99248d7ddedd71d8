"""``mailroom route -c FILE message.eml``: the decision on one message, without the network."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom import cli
from mailroom.check import route
from mailroom.config import parse_config

EML = Path(__file__).parent / "eml"
NOTICES = {"from": "noreply@example.com", "smtp": {"host": "smtp.example.com", "start_tls": True}}


def config_data(**box: Any) -> dict[str, Any]:
    mailbox = {
        "id": "incoming",
        "address": "incoming+%{key}@incoming.example.com",
        "host": "imap.example.com",
        "ssl": True,
        "user": "incoming@example.com",
        "password": "imap-password-xyzzy",
        **box,
    }
    return {
        "mailboxes": [mailbox, {**mailbox, "id": "desk", "address": "desk@incoming.example.com"}],
        "webhook": {"url": "https://app.example.com/in?token=hook-token-xyzzy"},
        "reject_notices": NOTICES,
    }


def lines_for(name: str, mailbox: int = 0, **box: Any) -> list[str]:
    config = parse_config(config_data(**box), env={})
    raw = (EML / name).read_bytes()
    return route.describe(raw, config.mailboxes[mailbox], config)


def test_deliver_shows_the_header_the_key_and_the_payload() -> None:
    lines = lines_for("key_to.eml")
    assert lines[:5] == [
        "mailbox:  incoming (address incoming+%{key}@incoming.example.com)",
        "matched:  To",
        "key:      k-to",
        "decision: deliver: POST to https://app.example.com:443 (webhook.url), format json",
        "payload:  (the id stands in for the one the mailbox gives)",
    ]
    payload = json.loads("\n".join(lines[5:]))
    assert (payload["key"], payload["matched_header"], payload["mailbox"]) == (
        "k-to",
        "To",
        "incoming",
    )
    assert payload["from"] == {"name": "Alice Example", "address": "alice@example.org"}
    assert payload["id"].startswith("msg_") and len(payload["id"]) == 36
    assert payload["raw"].endswith(" characters of base64)")
    assert "hook-token-xyzzy" not in "\n".join(lines)


def test_a_reply_to_a_dedicated_address_and_format_raw() -> None:
    lines = lines_for("key_in_reply_to.eml", mailbox=1)
    assert lines[1:3] == ["matched:  In-Reply-To", "key:      k-irt"]
    config = parse_config({**config_data(), "webhook": {"url": "https://a/x", "format": "raw"}})
    raw = (EML / "key_to.eml").read_bytes()
    assert route.describe(raw, config.mailboxes[0], config)[-1] == (
        f"payload:  the message itself, {len(raw)} bytes (format: raw)"
    )


def test_reject_says_why_and_who_gets_the_notice() -> None:
    assert lines_for("no_key.eml")[1:] == [
        "matched:  nothing: no address in To, References, Delivered-To, X-Delivered-To, "
        "Envelope-To, X-Envelope-To, Received, X-Original-To, X-Forwarded-To, Cc fits "
        "incoming+%{key}@incoming.example.com",
        "decision: reject: unknown incoming email",
        "notice:   a reject notice to alice@example.org (at most one per sender and reason a day)",
    ]
    assert lines_for("no_key.eml", mailbox=1)[1] == (
        "matched:  nothing: no reply id reply-<key>@incoming.example.com in References or "
        "In-Reply-To (a dedicated address takes replies only)"
    )
    config = parse_config({**config_data(), "reject_notices": None}, env={})
    raw = (EML / "no_key.eml").read_bytes()
    assert route.describe(raw, config.mailboxes[0], config)[-1] == (
        "notice:   none: reject_notices is not configured"
    )


def test_ignore_names_the_rule_and_the_key_that_switches_it_off() -> None:
    assert lines_for("auto_submitted.eml")[1:] == [
        "decision: ignore: auto-generated, rule auto_submitted "
        "(ignore_auto_generated.auto_submitted); no webhook, no notice"
    ]
    assert lines_for("null_sender.eml")[1] == (
        "decision: ignore: auto-generated, rule null_sender (ignore_auto_generated.null_sender); "
        "no webhook, no notice"
    )
    off = lines_for("null_sender.eml", ignore_auto_generated={"null_sender": False})
    assert off[1:3] == ["matched:  To", "key:      k-auto"]


def test_dead_letters_unparsable_and_too_large() -> None:
    assert lines_for("garbage.eml")[1:] == [
        "decision: dead-letter: unparsable message (NoHeaders); flagged $MailroomFailed and "
        "\\Seen, left in place (no failed_folder)"
    ]
    lines = lines_for("plain_2k.eml", max_message_bytes=1024, failed_folder="Failed")
    assert lines[1:] == [
        "decision: dead-letter: too large; moved to Failed (failed_folder)",
        "notice:   a reject notice to alice@example.org (at most one per sender and reason a day)",
    ]


def test_every_fixture_gets_the_routing_decision() -> None:
    config = parse_config(config_data(), env={})
    for path in sorted(EML.glob("*.eml")):
        verdict = route.decide(path.read_bytes(), config.mailboxes[0])
        assert verdict.action in route.Action
        assert route.describe(path.read_bytes(), config.mailboxes[0], config)


# -- the command ---------------------------------------------------------------------------


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "mailroom.yml"
    path.write_text(yaml.safe_dump(config_data()))
    return path


def test_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(write_config(tmp_path))
    assert cli.main(["route", "-c", path, str(EML / "key_to.eml")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("(mailbox incoming, the first of 2; --mailbox ID for another)\n")
    assert "\nkey:      k-to\n" in out and err == ""

    raw = (EML / "key_in_reply_to.eml").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw)))
    assert cli.main(["route", "-c", path, "--mailbox", "desk", "-"]) == 0
    assert "\nkey:      k-irt\n" in capsys.readouterr().out

    assert cli.main(["route", "-c", path, "--mailbox", "dsek", "x.eml"]) == 2
    assert capsys.readouterr().err == "mailroom: no mailbox has the id dsek; did you mean desk?\n"
    assert cli.main(["route", "-c", path, str(tmp_path / "missing.eml")]) == 1
    assert "cannot read " in capsys.readouterr().err
    assert cli.main(["route", str(EML / "key_to.eml")]) == 2
    assert capsys.readouterr().err.startswith("mailroom: -c FILE is required")
    for secret in ("imap-password-xyzzy", "hook-token-xyzzy"):
        assert secret not in out


def test_route_needs_no_secret_and_no_ca_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A production config on a laptop: the environment sets nothing and none of the secret
    files or CA bundles exists here. route touches no network, so it needs none of them; run
    and check still name each one."""
    gone = "/run/secrets/not-on-this-machine"
    data = config_data(password="${IMAP_PASSWORD}", ca_file=f"{gone}/ca.pem")
    data["webhook"] |= {
        "signing_secret_file": f"{gone}/webhook",
        "jwt": {"secret_file": f"{gone}/jwt", "secret_encoding": "base64"},
        "basic": {"user": "app", "password": "${HOOK_PASSWORD}"},
    }
    smtp = {"host": "smtp.example.com", "start_tls": True, "user": "u"}
    data["reject_notices"] = {"from": "noreply@example.com", "smtp": smtp}
    smtp["password_file"] = f"{gone}/smtp"
    data["mailboxes"][1] = {
        "id": "desk",
        "inbox_method": "microsoft_graph",
        "address": "desk@incoming.example.com",
        "user": "desk@example.com",
        "inbox_options": {
            "tenant_id": "contoso.onmicrosoft.com",
            "client_id": "c",
            "client_certificate_file": f"{gone}/entra.pem",
        },
    }
    path = tmp_path / "mailroom.yml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["route", "-c", str(path), str(EML / "key_to.eml")]) == 0
    out, err = capsys.readouterr()
    assert "\nkey:      k-to\n" in out and err == ""
    assert cli.main(["route", "-c", str(path), "--mailbox", "desk", str(EML / "key_to.eml")]) == 0
    assert "decision: reject: unknown incoming email" in capsys.readouterr().out

    assert cli.main(["check", "-c", str(path)]) == 2
    failed = capsys.readouterr().out
    assert "7 settings cannot be read" in failed and "IMAP_PASSWORD is not set" in failed


def test_route_still_needs_what_routing_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mailroom.yml"
    path.write_text(yaml.safe_dump(config_data(address="${INCOMING_ADDRESS}")))
    assert cli.main(["route", "-c", str(path), str(EML / "key_to.eml")]) == 2
    assert "environment variable INCOMING_ADDRESS is not set" in capsys.readouterr().err


def test_forward_all_says_that_nothing_matched_and_it_is_posted_all_the_same() -> None:
    """GitLab's routing: forward_all posts what matches no address too: no "None" shown."""
    data = {**config_data(address="other+%{key}@elsewhere.example.com"), "routing": {}}
    data["routing"]["mode"] = "forward_all"
    config = parse_config(data, env={})
    lines = route.describe((EML / "key_to.eml").read_bytes(), config.mailboxes[0], config)
    assert lines[1:4] == [
        "matched:  nothing fits other+%{key}@elsewhere.example.com; routing: forward_all posts "
        "it all the same (the application matches it)",
        "key:      none",
        "decision: deliver: POST to https://app.example.com:443 (webhook.url), format json",
    ]
    assert json.loads("\n".join(lines[5:]))["key"] is None
