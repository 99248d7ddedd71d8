"""Hostile mail, generated and mutated, through parse → decide → payload → notice (issue 13).

Bounded: a few hundred messages built from the .eml fixtures and the fragments the adversarial
probe used (encoded-words carrying CR/LF, UTF-7 surrogates, quoted parameters before runs of
";", RFC 2231 values in odd charsets, part and header floods, deep nesting, 8-bit bytes). For
every one: no exception, a strict-JSON payload, a notice without stray CR/LF or extra fields,
and time and Python heap within a generous bound per input byte (the bench measures them).
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailroom.delivery.notices import build_notice, notice_recipient
from mailroom.mail import routing
from mailroom.mail.message import parse
from mailroom.mail.routing import AddressTemplate, RoutingRules
from tests.hostile import NOW, SENDER, assert_safe_notice, assert_strict_payload

pytestmark = pytest.mark.slow  # 200 hostile messages through the whole pipeline: seconds

EML = Path(__file__).parent / "eml"
SEEDS = [path.read_bytes() for path in sorted(EML.glob("*.eml"))]
RULES = RoutingRules(
    address=AddressTemplate.parse("incoming+%{key}@incoming.example.com"),
    own_addresses=frozenset({"noreply@example.com"}),
)
# Generous: the hostile shapes cost at most ~35 bytes of heap a byte (bench/parse_worst.py,
# which also measures their time: ~2.5 µs a byte at most).
PER_BYTE_HEAP = 200
FIXED_HEAP = 4 << 20

NAMES = [
    b"Subject",
    b"From",
    b"To",
    b"Cc",
    b"Reply-To",
    b"Return-Path",
    b"Message-ID",
    b"In-Reply-To",
    b"References",
    b"Date",
    b"Content-Type",
    b"Content-Disposition",
    b"Content-Transfer-Encoding",
    b"Auto-Submitted",
    b"Received",
    b"Authentication-Results",
]
FRAGMENTS = [
    b"=?utf-8?q?Hi=0D=0ABcc:_v@evil.example=0D=0A=0D=0AInjected ?=",
    b"=?utf-8?b?PT91dGYtOD9xP0hpPTBEPTBBQmNjOl92QGV2aWwuZXhhbXBsZT0wRD0wQT0wRD0wQUluamVjdGVkPz0=?=",
    b"=?utf-8?q?Gr=C3=BC=C\t3=9Fe?=",
    b"=?utf-8?b?SGkNCkJjYzogeA0KDQpJbmplY3RlZA==?=",
    b"=?utf-7?q?+2D0-?=",
    b"=?unicode-escape?q?=5Cud83d?=",
    b"=?utf-8?q?=C2=85=E2=80=A8?=",
    b'text/plain; a="x' + b";" * 3000,
    b'multipart/mixed; boundary="z' + b";" * 3000,
    b'multipart/mixed; boundary="z"',
    b"multipart/alternative; boundary=z",
    b"multipart/digest; boundary=z",
    b"message/rfc822",
    b"text/plain; charset=utf-7",
    b"text/html; charset=unicode-escape",
    b"text/plain; charset=base64",
    b"attachment; filename*=utf-7''%2B2D0-.pdf",
    b"attachment; filename*0*=raw-unicode-escape''%5Cud83d; filename*1=.pdf",
    b"attachment; filename*=utf-8''%C3%A9%0D%0A.pdf",
    b'attachment; filename="=?utf-8?q?a=0D=0AX:_y?="',
    b"alice@b\xc3\xbccher.example",
    b"<alice@example.org>",
    b"<>",
    b"MAILER-DAEMON@example.org",
    b'"a, b" <c@example.org>, =?utf-8?q?=0D=0A?= <d@example.org>',
    b"<=?utf-8?q?a=0D=0AX:_y?=@example.org>",
    b"incoming+k@incoming.example.com",
    b"(" * 300,
    b"<" * 300,
    b"caf\xe9 \xff\xfe\x00",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"\r\n ",
    b"--z\r\n",
    b"--z--\r\n",
    b"--z\n\n" * 2000,
    b"Cc: a@example.org\r\n" * 500,
    b"X: y\n" * 1000,
    b'Content-Type: multipart/mixed; boundary="z"\n\n--z\n' * 40,
    b"Content-Type: message/rfc822\n\n" * 40,
    b"x\n" * 5000,
    b"+2D0-" * 100,
    b"base64",
    b"quoted-printable",
    b"=\r\n=0D=0A=",
]

fragment = st.sampled_from(FRAGMENTS)
text = st.one_of(fragment, st.binary(max_size=40))
value = st.lists(text, min_size=1, max_size=4).map(b" ".join)


@st.composite
def generated(draw: st.DrawFn) -> bytes:
    """A message of hostile header fields and a body of fragments."""
    fields = draw(st.lists(st.tuples(st.sampled_from(NAMES), value), max_size=10))
    head = b"".join(name + b": " + field + b"\r\n" for name, field in fields)
    body = b"".join(draw(st.lists(text, max_size=8)))
    return head + b"\r\n" + body


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A fixture with fragments inserted, ranges deleted or repeated, bytes replaced."""
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(raw)))
        end = min(len(raw), at + draw(st.integers(0, 200)))
        how = draw(st.sampled_from(["insert", "delete", "repeat", "byte"]))
        if how == "insert":
            raw[at:at] = draw(fragment)
        elif how == "delete":
            del raw[at:end]
        elif how == "repeat":
            raw[at:at] = raw[at:end] * draw(st.integers(2, 50))
        elif at < len(raw):
            raw[at] = draw(st.integers(0, 255))
    return bytes(raw)


reasons = st.one_of(st.just(routing.UNKNOWN_INCOMING_EMAIL), st.text(max_size=200))


def through_the_pipeline(raw: bytes, reason: str) -> None:
    parsed = parse(raw)
    assert not [d for d in parsed.defects if d.startswith("InternalError")]
    routing.decide(parsed, RULES)
    assert_strict_payload(parsed)
    recipient = notice_recipient(parsed, RULES).address
    for address in {recipient, "alice@example.org"} - {None}:
        assert address is not None
        notice = build_notice(parsed, recipient=address, reason=reason, sender=SENDER, now=NOW)
        assert_safe_notice(notice)


def within_bounds(raw: bytes, reason: str) -> None:
    """The pipeline, under tracemalloc for its heap peak."""
    tracemalloc.start()
    try:
        through_the_pipeline(raw, reason)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < FIXED_HEAP + PER_BYTE_HEAP * len(raw), (peak, len(raw))


FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


@FUZZ
@given(raw=generated(), reason=reasons)
def test_generated_mail(raw: bytes, reason: str) -> None:
    within_bounds(raw, reason)


@FUZZ
@given(raw=mutated(), reason=reasons)
def test_mutated_fixtures(raw: bytes, reason: str) -> None:
    within_bounds(raw, reason)
