"""mime: linear MIME parameters, the per-message caps, and charsets that yield no surrogates."""

from __future__ import annotations

import codecs
import email.message
import email.utils
import re
from email import policy
from email.message import Message

import pytest

from mailroom.mail import mime
from mailroom.mail.mime import Part, decode_bytes, read, split_params

NO_SURROGATE = "".join(chr(c) for c in range(0xD800, 0xE000))


@pytest.mark.parametrize(
    "value",
    [
        "text/plain",
        'multipart/mixed; boundary="=_a;b\\"c"; charset=utf-8',
        "attachment; filename*0*=utf-8''%E2%82; filename*1*=%AC; filename*2=.pdf",
        'attachment; filename*0="long "; filename*1=name.pdf',
        'text/plain; name="a\\\\b"; x=<y>',
        "text/plain;;; ; =; a==b; A=2",
        'text/plain; a="unterminated; b=c',
    ],
)
def test_split_params_agrees_with_the_stdlib(value: str) -> None:
    msg = Message(policy=policy.compat32)
    msg["Content-Type"] = value
    pairs = msg.get_params() or []
    expected = [
        (k.lower(), email.utils.collapse_rfc2231_value(v) if isinstance(v, tuple) else v)
        for k, v in pairs[1:]
    ]
    main, params, truncated = split_params(value)
    assert (main, params, truncated) == (pairs[0][0].lower(), expected, False)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # RFC 2231 in a codec that yields lone surrogates (issue 13, point 3): never one here.
        ("attachment; filename*=utf-7''%2B2D0-.pdf", "\ufffd.pdf"),
        ("attachment; filename*=unicode-escape''%5Cud83d.pdf", "\\ud83d.pdf"),
        ("attachment; filename*=raw-unicode-escape''%5Cud83d.pdf", "\\ud83d.pdf"),
        ("attachment; filename*=base64''%C3%A9.pdf", "é.pdf"),
        ("attachment; filename*=x-klingon''%C3%A9.pdf", "é.pdf"),
        ("attachment; filename*=''%E9.pdf", "é.pdf"),  # no charset: UTF-8, else cp1252
        ("attachment; filename*=%E2%82%AC.pdf", "€.pdf"),  # no charset'language' at all
        ("attachment; filename*1*=b.pdf; filename*0*=utf-8''a", "ab.pdf"),  # out of order
        ("attachment; filename*=utf-8''a; filename*0=b", "ab"),  # the stdlib raises here
        ("attachment; filename*9999=x", None),  # not a continuation number we read
    ],
)
def test_rfc2231_values(value: str, expected: str | None) -> None:
    _, params, _ = split_params(value)
    assert dict(params).get("filename") == expected
    for _, text in params:
        assert not set(text) & set(NO_SURROGATE)


@pytest.mark.parametrize("n", [100_000, 200_000, 950_000])
def test_a_quote_before_many_semicolons_is_read_in_linear_time(n: int) -> None:
    # Issue 13, point 2: the stdlib took 5 s, 22 s and 444 s for these.
    main, params, truncated = split_params('text/plain; a="x' + ";" * n)
    assert main == "text/plain"
    assert params == [("a", '"x' + ";" * (mime.MAX_PARAM_CHARS - len('text/plain; a="x')))]
    assert truncated


def test_parameters_are_capped() -> None:
    main, params, truncated = split_params("text/plain" + "; a=b" * 1000)
    assert main == "text/plain"
    assert params == [("a", "b")] * mime.MAX_PARAMS
    assert truncated


def test_the_feed_parser_asks_part_for_the_boundary() -> None:
    raw = (
        b'Content-Type: multipart/mixed; boundary="x;y";' + b";" * 100_000 + b"\n\n"
        b"--x;y\nContent-Type: text/plain\n\nhello\n--x;y--\n"
    )
    msg, budget = read(raw)
    assert msg.get_boundary() == "x;y"
    children = msg.get_payload()
    assert isinstance(children, list) and len(children) == 1
    assert isinstance(children[0], Part) and children[0].get_payload() == "hello"
    assert budget.truncated == {"parameters"}


def _empty_boundary(semicolons: int) -> bytes:
    return (
        b'Content-Type: multipart/mixed; boundary=""; a="x' + b";" * semicolons + b'"\n\n'
        b"--\n\npart\n----\n"
    )


def test_the_generator_never_reaches_the_stdlib_parameter_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The feed parser takes an empty boundary; the generator, which message.parse runs to
    # measure an attached message, then calls set_boundary: 100,000 ";" took 7 s there.
    def boundaries_alike(data: bytes) -> bytes:
        return re.sub(rb"={15}[0-9]{19}==", b"B", data)

    msg, _ = read(_empty_boundary(10))
    stdlib = email.message_from_bytes(_empty_boundary(10), policy=policy.compat32)
    assert boundaries_alike(msg.as_bytes()) == boundaries_alike(stdlib.as_bytes())
    assert msg.get_boundary() != ""

    def quadratic(value: str) -> list[str]:
        raise AssertionError(f"the stdlib's parameter parser ran on {value[:30]!r}")

    monkeypatch.setattr(email.message, "_parseparam", quadratic)
    msg, budget = read(_empty_boundary(100_000))
    assert msg.as_bytes().startswith(b'Content-Type: multipart/mixed;\n boundary="=====')
    assert budget.truncated == {"parameters"}
    part = msg.get_payload(0)
    assert isinstance(part, Part) and part.get_payload() == "part"


def test_get_param_and_get_params_keep_the_stdlib_contract() -> None:
    part = Part()
    part.set_raw(
        "Content-Type", "Text/Plain; Charset=\"utf-8\"; charset=latin1; name*=utf-8''%C3%A9"
    )
    assert part.get_params() == [
        ("text/plain", ""),
        ("charset", "utf-8"),
        ("charset", "latin1"),
        ("name", "é"),
    ]
    assert part.get_param("CHARSET") == "utf-8"  # the first, as the stdlib
    assert part.get_content_charset() == "utf-8"
    assert part.get_param("missing", "default") == "default"
    assert part.get_params(header="content-disposition") is None
    assert part.get_filename() == "é"


def test_parts_are_capped() -> None:
    raw = b'Content-Type: multipart/mixed; boundary="z"\n\n' + b"--z\n\n" * 190_000 + b"--z--\n"
    msg, budget = read(raw)
    assert budget.truncated == {"parts"}
    children = msg.get_payload()
    assert isinstance(children, list)
    # Checked after each 8 KB fed: a few thousand over at most.
    assert mime.MAX_PARTS <= len(children) < mime.MAX_PARTS + 2000


def test_header_fields_are_capped_over_all_parts() -> None:
    raw = b"Subject: s\n" + b"Cc: a@example.org\n" * 100_000 + b"\nbody\n"
    msg, budget = read(raw)
    assert budget.truncated == {"header_fields"}
    assert len(msg.keys()) == mime.MAX_HEADER_FIELDS
    assert msg["Subject"] == "s"
    part = b"--z\n" + b"X-A: b\n" * 100 + b"\nx\n"
    raw = b'Content-Type: multipart/mixed; boundary="z"\n\n' + part * 200 + b"--z--\n"
    msg, budget = read(raw)
    assert budget.truncated == {"header_fields"}
    assert budget.fields == mime.MAX_HEADER_FIELDS


def test_lines_are_capped() -> None:
    raw = b'Content-Type: multipart/mixed; boundary="z"\n\n--z\n\n' + b"x\n" * 600_000
    _, budget = read(raw)
    assert budget.truncated == {"lines"}


def test_a_single_part_is_not_read_line_by_line() -> None:
    _, budget = read(b"Subject: s\n\n" + b"x\n" * 600_000)
    assert budget.truncated == set()


def test_nesting_is_capped() -> None:
    levels = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(40)
    )
    msg, budget = read(f"Subject: s\n{levels}Content-Type: text/plain\n\nhi\n".encode())
    assert budget.truncated == {"nesting"}
    depth, part = 0, msg
    while isinstance(children := part.get_payload(), list):
        assert isinstance(children[0], Part)
        part, depth = children[0], depth + 1
    assert (depth, part.opaque) == (mime.MAX_DEPTH, True)
    assert part.get_content_type() == "application/octet-stream"


@pytest.mark.parametrize(
    ("data", "charset", "expected"),
    [
        (b"+2D0-", "utf-7", "\ufffd"),  # a lone high surrogate, scrubbed
        (b"+2D3eAA-", "utf-7", "\U0001f600"),  # a pair is a character
        (b"\\ud83d", "unicode-escape", "\\ud83d"),  # not a mail charset: read as UTF-8
        (b"\\ud83d", "raw_unicode_escape", "\\ud83d"),
        (b"caf\xc3\xa9", "rot13", "café"),
        (b"caf\xc3\xa9", "punycode", "café"),
        (b"caf\xe9", "windows-1252", "café"),
        (b"\x3d\xd8", "utf-16-le", "\ufffd"),  # a lone surrogate in UTF-16: replaced
        (b"\xa4", "iso-8859-15", "€"),
        (b"\x82\xa0", "shift_jis", "あ"),
        (b'\x1b$B$"\x1b(B', "iso-2022-jp", "あ"),
    ],
)
def test_decode_bytes_only_with_mail_charsets(data: bytes, charset: str, expected: str) -> None:
    assert decode_bytes(data, charset) == expected


def test_the_mail_charsets_are_the_names_python_gives_their_codecs() -> None:
    """Written out rather than looked up at import (70 codec modules, issue 23): each must be a
    codec's own name, or a declared charset of it would never match."""
    assert len(mime._MAIL_CODECS) == 63
    assert sorted(n for n in mime._MAIL_CODECS if codecs.lookup(n).name != n) == []
    labels = ("ISO-8859-2", "EUC-JP", "Shift-JIS-2004", "ISO-2022-KR", "utf-16le", "latin2")
    assert {codecs.lookup(label).name for label in labels} <= mime._MAIL_CODECS
