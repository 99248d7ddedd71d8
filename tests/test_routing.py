"""routing.decide on .eml fixtures: candidate headers, their order, auto-generated mail."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from mailroom.mail.message import parse
from mailroom.mail.routing import (
    AUTO_GENERATED_RULES,
    CANDIDATE_HEADERS,
    AddressTemplate,
    Deliver,
    Ignore,
    Reject,
    RoutingRules,
    decide,
    warnings,
)

EML = Path(__file__).parent / "eml"
TEMPLATE = AddressTemplate.parse("incoming+%{key}@incoming.example.com")
RULES = RoutingRules(address=TEMPLATE)
DEDICATED = RoutingRules(address=AddressTemplate.parse("support@incoming.example.com"))


def load(name: str) -> bytes:
    return (EML / name).read_bytes()


def route(raw: bytes, rules: RoutingRules = RULES) -> Deliver | Reject | Ignore:
    return decide(parse(raw), rules)


def drop_headers(raw: bytes, *names: str) -> bytes:
    """``raw`` without the named header fields (and their folded lines)."""
    pattern = b"|".join(re.escape(n.encode()) for n in names)
    return re.sub(rb"(?im)^(?:" + pattern + rb"):.*\n(?:[ \t].*\n)*", b"", raw)


def with_header(raw: bytes, line: str) -> bytes:
    return line.encode() + b"\n" + raw


@pytest.mark.parametrize(
    ("name", "key", "header"),
    [
        ("key_to.eml", "k-to", "To"),
        ("key_to_bare_upper.eml", "k-bare", "To"),
        ("key_to_encoded_folded.eml", "k-enc", "To"),
        ("key_references.eml", "k-ref", "References"),
        ("key_references_exchange.eml", "k-exch", "References"),
        ("key_in_reply_to.eml", "k-irt", "In-Reply-To"),
        ("key_delivered_to.eml", "k-dt", "Delivered-To"),
        ("key_x_delivered_to.eml", "k-xdt", "X-Delivered-To"),
        ("key_envelope_to.eml", "k-et", "Envelope-To"),
        ("key_x_envelope_to.eml", "k-xet", "X-Envelope-To"),
        ("key_received.eml", "k-rcv", "Received"),
        ("key_x_original_to.eml", "k-xot", "X-Original-To"),
        ("key_x_forwarded_to.eml", "k-xft", "X-Forwarded-To"),
        ("key_cc.eml", "k-cc", "Cc"),
        ("illegal_8bit.eml", "k-8bit", "To"),
        ("nested_200.eml", "k-auto", "To"),
        ("no_from.eml", "k-auto", "To"),
        ("no_content_type.eml", "k-auto", "To"),
        ("broken_rfc2047.eml", "k-auto", "To"),
    ],
)
def test_key_in_each_candidate(name: str, key: str, header: str) -> None:
    assert route(load(name)) == Deliver(key, header)


def test_candidate_order() -> None:
    raw = load("header_order.eml")
    expected = [*CANDIDATE_HEADERS, None]
    for index, header in enumerate(expected):
        remaining = drop_headers(raw, *CANDIDATE_HEADERS[:index]) if index else raw
        if header is None:
            assert route(remaining) == Reject("unknown incoming email")
        else:
            assert route(remaining) == Deliver(header.lower(), header)


def test_references_before_in_reply_to() -> None:
    raw = with_header(load("key_in_reply_to.eml"), "References: <reply-first@incoming.example.com>")
    assert route(raw) == Deliver("first", "References")


def test_reply_host() -> None:
    raw = load("key_x_original_to.eml").replace(b"X-Original-To: incoming+k-xot", b"X-A: x")
    raw = with_header(raw, "References: <reply-k-gl@GitLab.example.com>")
    assert route(raw) == Reject("unknown incoming email")
    assert route(raw, replace(RULES, reply_host="gitlab.example.com")) == Deliver(
        "k-gl", "References"
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("key_references.eml", Deliver("k-ref", "References")),
        ("key_references_exchange.eml", Deliver("k-exch", "References")),
        ("key_in_reply_to.eml", Deliver("k-irt", "In-Reply-To")),
        ("dedicated_no_reply.eml", Reject("unknown incoming email")),
        ("key_to.eml", Reject("unknown incoming email")),  # a key address is not a reply
    ],
)
def test_dedicated_address_takes_replies_only(name: str, expected: Deliver | Reject) -> None:
    assert route(load(name), DEDICATED) == expected


def test_no_key() -> None:
    assert route(load("no_key.eml")) == Reject("unknown incoming email")


@pytest.mark.parametrize("name", ["empty.eml", "garbage.eml"])
def test_unparsable(name: str) -> None:
    assert route(load(name)) == Reject("unparsable message")


def test_pathological_received_routes() -> None:
    raw = load("key_x_original_to.eml")
    received = "Received: from a by b " + "for <" * 100_000 + "; Mon, 01 Jan 2024 10:00:00 +0000"
    raw = with_header(with_header(raw, received), "Cc: " + "<" * 100_000)
    # Its time (linear, about 0.03 s): bench/parse_worst.py, received_for.
    assert route(raw) == Deliver("k-xot", "X-Original-To")


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("auto_submitted.eml", "auto_submitted"),
        ("x_autoreply.eml", "x_autoreply"),
        ("precedence_bulk.eml", "precedence"),
        ("x_auto_response_suppress.eml", "x_auto_response_suppress"),
        ("dsn.eml", "dsn"),
        ("null_sender.eml", "null_sender"),
        ("mailer_daemon.eml", "mailer_daemon"),
        ("postmaster.eml", "mailer_daemon"),
        ("x_loop.eml", "x_loop"),
    ],
)
def test_auto_generated_rule_and_switch(name: str, rule: str) -> None:
    raw = load(name)
    assert route(raw) == Ignore(rule)
    without = replace(RULES, ignore_auto_generated=frozenset(AUTO_GENERATED_RULES) - {rule})
    assert route(raw, without) == Deliver("k-auto", "To")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Auto-Submitted: no", None),
        ("Auto-Submitted: No (a person wrote this)", None),
        ("Auto-Submitted: auto-generated", "auto_submitted"),
        ("Auto-Submitted: auto-replied; owner-email=a@example.org", "auto_submitted"),
        ("X-Autoreply: YES", "x_autoreply"),
        ("X-Autoreply: no", None),
        ("Precedence: junk", "precedence"),
        ("Precedence: LIST", "precedence"),
        ("Precedence: auto_reply", "precedence"),
        ("Precedence: first-class", None),
        ("X-Auto-Response-Suppress: OOF, All", "x_auto_response_suppress"),
        ("X-Auto-Response-Suppress: DR, RN, NRN, OOF", None),
        ("X-Loop: Incoming+Other@Incoming.Example.com", "x_loop"),
        ("X-Loop: someone@example.net", None),
    ],
)
def test_auto_generated_values(line: str, expected: str | None) -> None:
    decision = route(with_header(load("key_to.eml"), line))
    assert decision == (Deliver("k-to", "To") if expected is None else Ignore(expected))


def test_x_loop_naming_an_own_address() -> None:
    raw = with_header(load("key_to.eml"), "X-Loop: GitLab <Robot@example.com>")
    assert route(raw) == Deliver("k-to", "To")
    rules = replace(RULES, own_addresses=frozenset({"robot@example.com"}))
    assert route(raw, rules) == Ignore("x_loop")


def test_non_report_multipart_is_not_a_dsn() -> None:
    raw = load("dsn.eml").replace(b"report-type=delivery-status", b"report-type=other")
    assert route(raw) == Deliver("k-auto", "To")


def test_rules_are_checked_in_order() -> None:
    raw = with_header(load("precedence_bulk.eml"), "Auto-Submitted: auto-generated")
    assert route(raw) == Ignore("auto_submitted")


def test_unknown_rule_name() -> None:
    with pytest.raises(ValueError, match=r"unknown auto-generated rule 'dns'; known rules: "):
        RoutingRules(address=TEMPLATE, ignore_auto_generated=frozenset({"dns"}))


@pytest.mark.parametrize(
    ("template", "address", "key"),
    [
        ("incoming+%{key}@example.com", "incoming+abc@example.com", "abc"),
        ("incoming+%{key}@example.com", "Incoming+AbC@EXAMPLE.com", "AbC"),
        ("incoming+%{key}@example.com", "<incoming+abc@example.com>", "abc"),
        ("incoming+%{key}@example.com", "incoming+@example.com", None),
        ("incoming+%{key}@example.com", "incoming-abc@example.com", None),
        ("incoming+%{key}@example.com", "incoming+abc@example.com.evil", None),
        ("incoming-%{key}@example.com", "incoming-abc@example.com", "abc"),
        ("in-%{key}-box@example.com", "in-abc-box@example.com", "abc"),
        ("support@example.com", "Support@Example.com", ""),
        ("support@example.com", "support+x@example.com", None),
    ],
)
def test_template_match(template: str, address: str, key: str | None) -> None:
    assert AddressTemplate.parse(template).match(address) == key


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("incoming", "not an address template; write it like incoming+%{key}@example.com"),
        ("incoming@%{key}.example.com", "%{key} must be in the local part (before the @)"),
        ("incoming+%{ke}y@example.com", "write the placeholder whole, as %{key}"),
        ("incoming+%{key@example.com", "write the placeholder whole, as %{key}"),
        ("in%{key}+%{key}@example.com", "%{key} may appear only once"),
        ("Incoming <incoming+%{key}@example.com>", "write the bare address"),
        ("incoming+%{key}@-example-.com", "'-example-.com' is not a domain name"),
    ],
)
def test_template_errors(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        AddressTemplate.parse(template)


def test_long_prefix_warning() -> None:
    assert warnings(AddressTemplate.parse("a" * 30 + "+%{key}@example.com")) == []
    assert warnings(AddressTemplate.parse("a" * 40 + "+%{key}@example.com")) == [
        "the local part before %{key} is 41 characters; providers cap local parts at 64 "
        "(RFC 5321 §4.5.3.1.1), which leaves 23 for the key: keep it to 31 characters or fewer"
    ]
    assert warnings(AddressTemplate.parse("a" * 40 + "@example.com")) == []


def test_is_own() -> None:
    rules = replace(RULES, own_addresses=frozenset({"<Robot@Example.com>"}))
    assert rules.is_own("robot@example.com")
    assert rules.is_own("incoming+anything@INCOMING.example.com")
    assert not rules.is_own("alice@example.org")
