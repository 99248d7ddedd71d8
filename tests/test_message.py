"""message.parse on .eml fixtures: exact fields, and never an exception on damaged mail."""

from __future__ import annotations

import base64
import email.feedparser
import email.utils
import random
import re
import tracemalloc
from dataclasses import fields
from datetime import UTC, datetime
from email import policy
from email.message import Message
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom.mail import mime
from mailroom.mail.message import (
    MAX_ADDRESSES,
    Address,
    Attachment,
    ParsedMessage,
    _base64_size,
    _iso_date,
    _params,
    _size,
    decode_bytes,
    decode_words,
    parse,
    scan_addresses,
)
from mailroom.mail.mime import Part, header_fields

EML = Path(__file__).parent / "eml"
ALL_FIXTURES = sorted(p.name for p in EML.glob("*.eml"))
KEY_ADDRESS = "incoming+k-auto@incoming.example.com"


def load(name: str) -> bytes:
    return (EML / name).read_bytes()


def strings(parsed: ParsedMessage) -> list[str]:
    """Every str reachable from ``parsed`` (fields, headers, addresses, attachments)."""
    found: list[str] = []

    def visit(value: object) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, tuple):
            for item in value:
                visit(item)
        elif isinstance(value, Address | Attachment):
            visit(tuple(getattr(value, f.name) for f in fields(value)))

    for f in fields(parsed):
        if f.init:
            visit(getattr(parsed, f.name))
    return found


def test_plain_message() -> None:
    raw = load("plain_2k.eml")
    parsed = parse(raw)
    assert parsed.raw is raw
    assert parsed.message_id == "plain2k@example.org"
    assert parsed.from_ == Address("Alice Example", "alice@example.org")
    assert parsed.to == (Address("", "incoming+k-plain@incoming.example.com"),)
    assert parsed.subject == "A plain message of about two kilobytes"
    assert parsed.date == "2024-01-01T10:00:00+00:00"
    lorem = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n"
    assert parsed.text == lorem * 20  # CRLF on the wire, LF in str
    assert parsed.html is None
    assert parsed.attachments == ()
    assert parsed.return_path == "alice@example.org"
    assert parsed.content_type == "text/plain"
    assert parsed.param("charset") == "utf-8"
    assert len(parsed.authentication_results) == 1
    assert parsed.defects == ()
    assert parsed.unparsable is False
    # Folded Received header comes out unfolded, whitespace after each fold kept.
    assert parsed.first("received") == (
        "from mail.example.org (mail.example.org [192.0.2.1])\tby mx.example.com with ESMTPS "
        "id 4Xyz\tfor <incoming+k-plain@incoming.example.com>; Mon, 01 Jan 2024 10:00:01 +0000"
    )


def test_multipart_bodies_and_attachments() -> None:
    parsed = parse(load("multipart_alternative.eml"))
    assert parsed.text == "Café au lait"  # quoted-printable, iso-8859-1
    assert parsed.html == "<p>Café</p>"  # the CRLF before a boundary belongs to it
    assert parsed.attachments == (Attachment("Résumé.pdf", "application/pdf", 130),)
    assert parsed.cc == (Address("Bob", "bob@example.net"),)
    assert parsed.reply_to == (Address("Alice Replies", "replies@example.org"),)
    assert parsed.content_type == "multipart/mixed"


def test_rfc2231_filename_outside_ascii() -> None:
    parsed = parse(load("rfc2231_filename.eml"))
    assert parsed.attachments == (Attachment("€.pdf", "application/pdf", 5),)
    assert parsed.text == "See attached."  # the CRLF before a boundary belongs to it


def test_encoded_folded_to() -> None:
    parsed = parse(load("key_to_encoded_folded.eml"))
    assert parsed.to == (
        Address("Jürgen Müller", "incoming+k-enc@incoming.example.com"),
        Address("Bob", "bob@example.net"),
    )


def test_references_forms() -> None:
    spaced = parse(load("key_references.eml"))
    assert spaced.references == ("abc@example.org", "reply-k-ref@incoming.example.com")
    assert spaced.in_reply_to == "abc@example.org"
    exchange = parse(load("key_references_exchange.eml"))  # one comma-joined string
    assert exchange.references == ("abc@example.org", "reply-k-exch@incoming.example.com")


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_never_raises_and_text_is_clean(name: str) -> None:
    raw = load(name)
    parsed = parse(raw)
    assert parsed.raw == raw
    for text in strings(parsed):
        text.encode("utf-8")  # no lone surrogates left from 8-bit bytes
        assert "\x00" not in text or name == "garbage.eml"


def test_no_content_type() -> None:
    parsed = parse(load("no_content_type.eml"))
    assert parsed.content_type == "text/plain"
    assert parsed.text == "Plain body without MIME headers.\n"


def test_broken_content_type_is_text_plain() -> None:
    parsed = parse(load("broken_content_type.eml"))  # "text/; charset=\"utf-8"
    assert parsed.content_type == "text/plain"
    assert parsed.text == "Grüße\n"


def test_illegal_8bit_bytes() -> None:
    parsed = parse(load("illegal_8bit.eml"))
    assert parsed.subject == "café crème"  # Latin-1 bytes: not UTF-8, read as cp1252
    assert parsed.from_ == Address("Jürgen", "juergen@example.org")  # raw UTF-8 (RFC 6532)
    assert parsed.text == "naïve \ufffdÿ body\n"  # NUL replaced


def test_unknown_charset_falls_back() -> None:
    parsed = parse(load("unknown_charset.eml"))
    assert parsed.param("charset") == "x-klingon"
    assert parsed.text == "Grüße\n"


def test_broken_rfc2047_words_stay_as_written() -> None:
    parsed = parse(load("broken_rfc2047.eml"))
    assert parsed.subject == "=?utf-8?B?not*base64?= café =?utf-8?q?unterminated"
    assert parsed.from_ == Address("é =?utf-8?b?!!broken?=", "alice@example.org")


def test_broken_base64() -> None:
    parsed = parse(load("broken_base64.eml"))
    assert parsed.text is not None
    assert parsed.attachments == (Attachment("a.pdf", "application/pdf", 5),)


def test_nested_200_levels() -> None:
    parsed = parse(load("nested_200.eml"))  # its time: bench/parse_worst.py, nested_levels
    assert parsed.to == (Address("", KEY_ADDRESS),)
    assert parsed.text is None  # the text part sits below MAX_DEPTH (16): not read
    assert parsed.truncated == ("nesting",)


def test_nesting_beyond_the_stdlib_parser_is_cut_at_max_depth() -> None:
    depth = 3000  # the stdlib parser would raise RecursionError at about 1000
    body = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(depth)
    )
    raw = f"From: a@example.org\nTo: {KEY_ADDRESS}\nSubject: deep\n{body}".encode()
    parsed = parse(raw)  # its time: bench/parse_worst.py, nested_levels
    assert parsed.truncated == ("nesting",)
    assert parsed.to == (Address("", KEY_ADDRESS),)
    assert parsed.text is None
    assert parsed.unparsable is False


def test_no_from() -> None:
    parsed = parse(load("no_from.eml"))
    assert parsed.from_ is None
    assert parsed.return_path is None
    assert parsed.unparsable is False


@pytest.mark.parametrize("name", ["empty.eml", "garbage.eml"])
def test_unparsable(name: str) -> None:
    parsed = parse(load(name))
    assert parsed.unparsable is True
    assert parsed.headers == ()
    assert parsed.defects == ("NoHeaders",)


def test_header_block_only() -> None:
    # What a source hands over for a message over max_message_bytes: headers, no body.
    parsed = parse(load("headers_only_large.eml"))
    assert parsed.subject == "Big scans"
    assert parsed.message_id == "m1@example.org"
    assert parsed.content_type == "multipart/mixed"
    assert parsed.text == ""
    assert parsed.unparsable is False


@pytest.mark.parametrize(
    ("header", "expected"),
    [("Return-Path: <>", ""), ("Return-Path: <MAILER-DAEMON>", "MAILER-DAEMON"), ("X: y", None)],
)
def test_return_path(header: str, expected: str | None) -> None:
    assert parse(f"{header}\nSubject: s\n\nbody\n".encode()).return_path == expected


def test_headers_are_case_insensitive_in_order() -> None:
    parsed = parse(b"X-A: 1\nx-a: 2\nSubject: s\n\n")
    assert parsed.header("X-A") == ("1", "2")
    assert parsed.first("x-A") == "1"
    assert parsed.header("Missing") == ()


def test_invalid_date() -> None:
    parsed = parse(b"Date: the day after tomorrow\nSubject: s\n\n")
    assert parsed.date is None
    assert parsed.defects == ("InvalidDate",)


def test_address_list_edge_cases() -> None:
    parsed = parse(b'To: "Doe, John" <j@example.org>, Alice a@example.org, <b@example.org>\n\n')
    assert parsed.to == (
        Address("Doe, John", "j@example.org"),
        Address("", "a@example.org"),
        Address("", "b@example.org"),
    )


def test_huge_address_list_is_scanned_not_parsed() -> None:
    addresses = [f"user{i}@example.org" for i in range(900)]  # ~18 KB
    parsed = parse(f"To: {', '.join(addresses)}\n\n".encode())
    assert [a.address for a in parsed.to] == addresses
    assert parsed.truncated == ()


def test_an_address_list_is_cut_at_max_addresses() -> None:
    addresses = [f"user{i}@example.org" for i in range(MAX_ADDRESSES + 500)]
    to = ", ".join(addresses[: MAX_ADDRESSES // 2])
    cc = "".join(f"Cc: {a}\n" for a in addresses)
    parsed = parse(f"To: {to}\n{cc}\n".encode())
    assert [a.address for a in parsed.to] == addresses[: MAX_ADDRESSES // 2]
    assert [a.address for a in parsed.cc] == addresses[:MAX_ADDRESSES]
    assert parsed.truncated == ("addresses",)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("=?utf-8?q?a?=\n =?utf-8?q?b?=".replace("\n", ""), "ab"),  # RFC 2047 §6.2
        ("=?utf-8?q?=C3?= =?utf-8?q?=A9?=", "é"),  # a character split over two words
        ("x =?ISO-8859-1?Q?caf=E9?= y", "x café y"),
        ("=?utf-8*en?b?w6k=?=", "é"),  # RFC 2231 language suffix
        ("=?utf-8?b?w6k?=", "é"),  # missing padding
        ("=?utf-8?b?!!?=", "=?utf-8?b?!!?="),
        ("=?x-unknown?q?abc?=", "abc"),
        ("no words here", "no words here"),
    ],
)
def test_decode_words(value: str, expected: str) -> None:
    assert decode_words(value) == expected


@pytest.mark.parametrize(
    ("data", "charset", "expected"),
    [
        (b"caf\xc3\xa9", None, "café"),
        (b"caf\xe9", None, "café"),
        (b"caf\xe9", "iso-8859-1", "café"),
        (b"caf\xc3\xa9", "base64", "café"),  # not a text encoding: ignored
        (b"caf\xc3\xa9", '"UTF-8"', "café"),
        (b"\xb5\xc4\x81\x40", "gb2312", "的丂"),  # read as GBK, its superset
    ],
)
def test_decode_bytes(data: bytes, charset: str | None, expected: str) -> None:
    assert decode_bytes(data, charset) == expected


def test_scan_addresses_on_hostile_text() -> None:
    # Their time (linear): bench/parse_worst.py, address_scan; an ordinary message's parse
    # time is the first line it prints.
    assert scan_addresses("a" * 200_000) == []
    assert scan_addresses("<" * 200_000 + "x@y.z>") == ["x@y.z"]


# The fast paths (a header block read without the feed parser, MIME parameters split without
# get_params) must store exactly what the stdlib does; anything unusual takes the stdlib's way.
_BLOCKS = [  # (header block, read by the fast path)
    ("From: A <a@b.c>\r\nTo: incoming+k@example.com\r\nSubject: hi", True),
    ("Subject:\r\n folded\r\n\tagain\r\nX-Empty:   \r\nX-Tight:v", True),
    ("Subject: a\nTo: b@c.d\r\n  mixed line ends", True),
    ("Subject: trailing\r\n \t", True),
    ("Subject: caf\xe9\r\nX-Control: a\x0bb\x0cc\x1cd\x85e", True),
    ("", True),
    (" leading continuation\r\nSubject: x", False),
    ("From x@y Sat Nov 22 10:00:00 2026\r\nSubject: x", False),
    ("Subject: x\r\nnot a field\r\nTo: y", False),
    (":no name\r\nSubject: x", False),
    ("Subject: lone\rCR", False),
    ("Subject: x\r\r\nTo: y", False),
    ("X-\xe9: eight-bit name", False),
]


@pytest.mark.parametrize(("block", "fast"), _BLOCKS)
def test_header_fast_path_stores_what_the_feed_parser_does(block: str, fast: bool) -> None:
    raw = block.encode("latin-1")
    expected = BytesParser(policy=policy.compat32).parsebytes(raw + b"\r\n", headersonly=True)
    fields = header_fields(raw.decode("ascii", "surrogateescape"))
    assert (fields is not None) == fast  # None: the stdlib parser reads it
    if fields is not None:
        assert not expected.defects and expected.get_unixfrom() is None
        assert fields == list(expected.raw_items())


@pytest.mark.parametrize(
    "value",
    [
        "text/plain",
        " Text/Plain ;CHARSET = UTF-8 ; format=flowed;",
        "text/plain;; a; A=1; a=2; =x; b==c",
        'text/plain; charset="utf-8"',
        "text/plain; name*=utf-8''%E2%82%AC",
        "text/plain; name=<a>; b=c\\d",
        "text/plain;\r\n charset=x",
        "",
    ],
)
def test_params_are_what_get_params_returns(value: str) -> None:
    msg = Message()
    msg["Content-Type"] = value
    part = Part()
    part["Content-Type"] = value
    pairs = msg.get_params() or []
    assert _params(part, "content-type") == (
        str(pairs[0][0]).lower(),
        {
            k.lower(): email.utils.collapse_rfc2231_value(v) if isinstance(v, tuple) else v
            for k, v in pairs[1:]
        },
    )


@pytest.mark.parametrize(
    "value",
    [
        "Sun, 22 Nov 2026 10:00:00 +0000",
        "1 Jan 2024 23:59:59 -0800 (PST)",
        "Mon, 01 Jan 2024 00:00:00 -0000",
        "Tue, 31 Feb 2024 10:00:00 +0530",
        "Wed, 1 Mar 0099 10:00:00 +0000",
        "Thu, 2 Apr 2026 24:00:00 +0000",
        "Fri, 3 May 2026 10:00:00 +2400",
        "Sat, 4 nov 2026 10:00:00 GMT",
        "4 Nov 26 10:00 EST",
        "Mon, 01 Jan 2024 00:00:00",
        "Mon, 01 Jan 2024 00:00:00 XYZ",
    ],
)
def test_dates_read_as_the_stdlib_does_always_with_an_offset(value: str) -> None:
    """The stdlib's reading, except that a date it leaves naive (-0000, an unknown or missing
    zone: UTC, the local zone unknown) is given +00:00: a receiver parsing the payload's
    ``date`` as ISO 8601 with an offset must not meet a time without one."""
    try:
        stdlib = email.utils.parsedate_to_datetime(value)
        if stdlib.tzinfo is None:
            stdlib = stdlib.replace(tzinfo=UTC)
        expected: object = stdlib.isoformat()
    except ValueError as exc:
        expected = type(exc)
    try:
        got: object = _iso_date(value)
    except ValueError as exc:
        got = type(exc)
    assert got == expected
    if isinstance(got, str):
        assert datetime.fromisoformat(got).utcoffset() is not None


def test_a_minus_zero_date_reaches_the_payload_with_an_offset() -> None:
    parsed = parse(b"From: a@example.org\r\nDate: Mon, 01 Jan 2024 10:00:00 -0000\r\n\r\nx\r\n")
    assert parsed.date == "2024-01-01T10:00:00+00:00"


# -- large mail: decoded for the parser in slices, attachments measured without decoding -------


def _with_attachment(data: bytes) -> bytes:
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return (
        b"From: a@example.org\r\nTo: incoming+k@example.com\r\nSubject: big\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee attached.\r\n"
        b'--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename="a.pdf"'
        b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--b--\r\n"
    )


def test_large_mail_is_read_in_slices_as_the_stdlib_reads_it_whole() -> None:
    raw = _with_attachment(random.Random(1).randbytes(1024 * 1024))
    sliced, _ = mime.read(raw)  # bytes decoded a chunk at a time
    whole = mime._feed(raw.decode("ascii", "surrogateescape"), mime.ParseBudget())
    assert sliced.as_bytes() == whole.as_bytes()
    parsed = parse(raw)
    assert parsed.attachments == (Attachment("a.pdf", "application/pdf", 1024 * 1024),)
    assert parsed.text == "See attached."  # the line end before a boundary is its own


def test_large_mail_is_parsed_in_a_few_times_its_size() -> None:
    raw = _with_attachment(random.Random(2).randbytes(3 * 1024 * 1024))
    tracemalloc.start()
    try:
        parse(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3.5 * len(raw)  # 3.2 times; it was 7.7 times with parsebytes and decoding


def _base64_part(body: str, cte: str = "base64") -> Part:
    part = Part()
    part["Content-Transfer-Encoding"] = cte
    part.set_payload(body)
    return part


@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(max_size=200),
    width=st.integers(1, 80),
    newline=st.sampled_from(["\r\n", "\n", "\r", " \r\n"]),
    damage=st.text(alphabet="A=+/\r\n -.", max_size=3),
    at=st.integers(0, 400),
)
def test_base64_sizes_are_what_decoding_measures(
    data: bytes, width: int, newline: str, damage: str, at: int
) -> None:
    encoded = base64.b64encode(data).decode()
    body = newline.join(encoded[i : i + width] for i in range(0, len(encoded), width)) + newline
    body = body[:at] + damage + body[at:]
    for cte in ("base64", "BASE64", "7bit"):
        part = _base64_part(body, cte)
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        assert _size(part) == len(payload)
        if cte == "base64":  # matched a slice at a time: a size is right, None falls back
            assert {_base64_size(body, step) for step in (1, 7, 64)} <= {None, len(payload)}


@settings(max_examples=200, deadline=None)
@given(body=st.text(alphabet="AQgw+/=\r\n \x00é", max_size=60))
def test_base64_sizes_of_anything_are_what_decoding_measures(body: str) -> None:
    part = _base64_part(body)
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    assert _size(part) == len(payload)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="a\r\n", max_size=12))
def test_the_line_end_before_a_boundary_is_found_as_the_stdlib_finds_it(text: str) -> None:
    stdlib = re.compile(r"(\r\n|\r|\n)\Z").search(text)
    ours = vars(email.feedparser)["NLCRE_eol"].search(text)  # mime's, searched from the end
    assert isinstance(vars(email.feedparser)["NLCRE_eol"], mime._LineEndAtEnd)
    assert (ours and (ours.span(), ours.group(0))) == (stdlib and (stdlib.span(), stdlib.group(0)))
