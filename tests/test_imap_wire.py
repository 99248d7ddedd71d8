"""Pure IMAP wire helpers: sequence sets, mailbox names, FETCH response parsing, the id
keyword."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailroom.errors import ImapLimitError
from mailroom.sources.imap_wire import (
    BodyLimits,
    FetchedMessage,
    Framer,
    Hierarchy,
    capability_code,
    fetch_flags,
    id_keyword,
    literal_slack,
    login_segments,
    mailbox_name,
    parse_fetch,
    parse_list_delimiter,
    parse_namespace,
    told_capabilities,
    uid_set,
)
from tests.servers.hostile_imap import MESSAGE, MODES, stream


@pytest.mark.parametrize(
    ("uids", "expected"),
    [([5], "5"), ([3, 1, 2], "1:3"), ([1, 2, 3, 7, 9, 10], "1:3,7,9:10"), ([4, 4, 5], "4:5")],
)
def test_uid_set(uids: list[int], expected: str) -> None:
    assert uid_set(uids) == expected


def test_uid_set_refuses_nothing() -> None:
    with pytest.raises(ValueError, match="empty UID set"):
        uid_set([])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("inbox", "INBOX"),
        ("Failed", '"Failed"'),
        ("Tom & Jerry", '"Tom &- Jerry"'),
        ("Entwürfe", '"Entw&APw-rfe"'),  # RFC 3501 §5.1.3 modified UTF-7
        ("日本語", '"&ZeVnLIqe-"'),
        ('say "hi"\\', '"say \\"hi\\"\\\\"'),
    ],
)
def test_mailbox_name(name: str, expected: str) -> None:
    assert mailbox_name(name) == expected


def test_parse_fetch_as_aioimaplib_delivers_it() -> None:
    lines = [
        b"1 FETCH (UID 7 RFC822.SIZE 5 BODY[] {5}",
        bytearray(b"Hello"),
        b")",
        b"2 FETCH (UID 9 RFC822.SIZE 3 BODY[] {3}",
        bytearray(b"abc"),
        b" FLAGS (\\Recent))",
        b"Fetch completed (0.001 + 0.000 secs).",
    ]
    assert parse_fetch(lines) == [
        FetchedMessage(uid=7, size=5, body=b"Hello"),
        FetchedMessage(uid=9, size=3, body=b"abc"),
    ]


def test_parse_fetch_finds_items_after_the_literal() -> None:
    lines = [b"4 FETCH (BODY[] {2}", bytearray(b"hi"), b" UID 12 RFC822.SIZE 2)", b"OK"]
    assert parse_fetch(lines) == [FetchedMessage(uid=12, size=2, body=b"hi")]


def test_parse_fetch_skips_unsolicited_flag_updates_even_with_a_uid() -> None:
    lines = [
        b"3 FETCH (UID 5 FLAGS (\\Seen))",  # another client's change, not an answer
        b"6 FETCH (UID 21 RFC822.SIZE 1834)",
        b"OK",
    ]
    assert parse_fetch(lines) == [FetchedMessage(uid=21, size=1834, body=None)]


def test_parse_fetch_ignores_a_literal_that_looks_like_a_fetch_line() -> None:
    body = bytearray(b"1 FETCH (UID 99 RFC822.SIZE 1)\r\n")
    lines = [b"1 FETCH (UID 2 RFC822.SIZE 31 BODY[] {31}", body, b")", b"OK"]
    assert parse_fetch(lines) == [FetchedMessage(uid=2, size=31, body=bytes(body))]


def test_parse_fetch_merges_data_items_split_over_two_responses() -> None:
    lines = [
        b"4 FETCH (UID 12 RFC822.SIZE 2)",
        b"4 FETCH (BODY[] {2}",
        bytearray(b"hi"),
        b")",
        b"OK",
    ]
    assert parse_fetch(lines) == [FetchedMessage(uid=12, size=2, body=b"hi")]


def test_the_id_keyword_carries_the_webhook_id_through_flags() -> None:
    webhook_id = "msg_" + "3bf48351ba6cdf075b308a6201c374ca"
    keyword = id_keyword(webhook_id)
    assert keyword == "$MailroomId_" + webhook_id.removeprefix("msg_")
    assert len(keyword) <= 50  # Dovecot's default mail_max_keyword_length
    head = f"1 FETCH (UID 7 RFC822.SIZE 2 FLAGS (\\Recent {keyword}) BODY[] {{2}}".encode()
    lines = [head, bytearray(b"hi"), b")", b"OK"]
    assert parse_fetch(lines) == [FetchedMessage(7, 2, b"hi", webhook_id=webhook_id)]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (b"", None),
        (b"\\Seen $MailroomFailed", None),
        (b"$MailroomId_" + b"ab" * 16, "msg_" + "ab" * 16),
        (b"$MAILROOMID_" + b"AB" * 16, "msg_" + "ab" * 16),  # a server that changes case
        (b"$MailroomId_" + b"ab" * 15, None),  # too short
        (b"$MailroomId_" + b"ab" * 16 + b"0", None),  # too long
        (b"$MailroomId_" + b"zz" * 16, None),  # not hex
        (b"$MailroomId_" + b"f" * 32 + b" $MailroomId_" + b"0" * 32, "msg_" + "0" * 32),
    ],
)
def test_the_id_keyword_is_read_exactly(flags: bytes, expected: str | None) -> None:
    lines = [b"1 FETCH (UID 3 RFC822.SIZE 9 FLAGS (" + flags + b"))", b"OK"]
    assert parse_fetch(lines)[0].webhook_id == expected


def test_a_later_flag_update_of_the_same_message_wins() -> None:
    keyword = b"$MailroomId_" + b"1" * 32
    lines = [
        b"1 FETCH (UID 3 RFC822.SIZE 9 FLAGS (" + keyword + b"))",
        b"1 FETCH (FLAGS (\\Seen))",  # another client removed the keyword meanwhile
        b"OK",
    ]
    assert parse_fetch(lines)[0].webhook_id is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            b"30-Nov-2026 00:15:24 +0000",
            datetime.datetime(2026, 11, 30, 0, 15, 24, tzinfo=datetime.UTC),
        ),
        (b" 1-Dec-2026 10:00:00 +0130", datetime.datetime(2026, 12, 1, 8, 30, tzinfo=datetime.UTC)),
        (b"01-jan-2027 23:00:00 -0500", datetime.datetime(2027, 1, 2, 4, 0, tzinfo=datetime.UTC)),
        (b"31-Feb-2026 00:00:00 +0000", None),  # no such day
        (b"01-Foo-2026 00:00:00 +0000", None),
        (b"01-Jan-2026 00:00:00 +2400", None),  # an offset of a day
    ],
)
def test_internaldate(text: bytes, expected: datetime.datetime | None) -> None:
    lines = [b'1 FETCH (UID 3 RFC822.SIZE 9 INTERNALDATE "' + text + b'")', b"OK"]
    assert parse_fetch(lines)[0].internal_date == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"* 3 FETCH (FLAGS ())", frozenset()),
        (b"* 3 FETCH (UID 9 MODSEQ (12) FLAGS (\\Seen $X))", frozenset({b"\\seen", b"$x"})),
        (b"* 3 EXISTS", None),
        (b"* OK [ALERT] FLAGS (\\Seen)", None),
        (b"* 3 FETCH (UID 9)", None),
        (b"* 3 FETCH (FLAGS (\\Seen", None),  # never closed
    ],
)
def test_fetch_flags_of_an_idle_push(line: bytes, expected: frozenset[bytes] | None) -> None:
    assert fetch_flags(line) == expected


_WIRE = st.lists(
    st.sampled_from(
        [
            *(b"1 FETCH (", b"UID 4 ", b"RFC822.SIZE 9 ", b"FLAGS (", b"$MailroomId_", b"ab" * 16),
            *(b'INTERNALDATE "', b"30-Nov-2026 00:15:24 +0000", b'"', b")", b" ", b"{2}", b"("),
        ]
    ),
    max_size=40,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_WIRE, st.binary(max_size=60), _WIRE.map(bytearray)), max_size=8))
def test_fuzz_parse_fetch_never_fails(lines: list[bytes]) -> None:
    for item in parse_fetch([*lines, b"OK"]):
        assert item.webhook_id is None or len(item.webhook_id) == 36
    for line in lines:
        fetch_flags(bytes(line))


def test_many_unclosed_flags_stay_linear() -> None:
    line = b"1 FETCH (UID 1 RFC822.SIZE 1 " + b"FLAGS (" * 200_000
    assert parse_fetch([line, b"OK"])[0].webhook_id is None
    assert fetch_flags(b"* " + line) is None


# -- the framer, fed by the hostile server's modes (issue 18) --------------------------------


def _wire(mode: str, size: int) -> bytes:
    """The first ``size`` bytes ``mode`` sends, after a well-formed answer."""
    good = (
        b"* 1 FETCH (UID 1 RFC822.SIZE %d BODY[] {%d}\r\n" % (len(MESSAGE), len(MESSAGE))
        + MESSAGE
        + b")\r\n"
    )
    chunks = [good]
    for chunk in stream(mode):
        chunks.append(chunk)
        if sum(map(len, chunks)) >= size:
            break
    return b"".join(chunks)[:size]


def _feed(framer: Framer, wire: bytes, cuts: list[int]) -> list[bytes | bytearray]:
    """Feed ``wire`` split at ``cuts``; the events, until the framer refuses."""
    out: list[bytes | bytearray] = []
    start = 0
    for end in [*sorted(set(cuts)), len(wire)]:
        for event in framer.feed(wire[start:end]):
            out.append(event if isinstance(event, bytearray) else event[0])
        start = end
    return out


@settings(max_examples=150, deadline=None)
@given(
    mode=st.sampled_from([m for m in MODES if m != "healthy"]),
    size=st.integers(min_value=1, max_value=300_000),
    cuts=st.lists(st.integers(min_value=0, max_value=300_000), max_size=12),
    noise=st.binary(max_size=40),
    at=st.integers(min_value=0, max_value=300_000),
)
def test_fuzz_the_framer_with_hostile_modes(
    mode: str, size: int, cuts: list[int], noise: bytes, at: int
) -> None:
    wire = _wire(mode, size)
    at = min(at, len(wire))
    wire = wire[:at] + noise + wire[at:]
    framer = Framer()
    framer.limits = BodyLimits(len(MESSAGE), {1: len(MESSAGE)})
    framer.limits.line_bytes = 4096
    framer.limits.response_bytes = 128 * 1024
    try:
        events = _feed(framer, wire, [c for c in cuts if c < len(wire)])
    except ImapLimitError as exc:
        assert exc.size is None or exc.size > framer.limits.cap
        return
    kept = sum(len(e) for e in events) + len(framer._partial)
    assert kept <= len(wire)
    assert len(framer._partial) <= 4096
    for event in events:
        if isinstance(event, bytearray):
            assert len(event) <= len(MESSAGE) + literal_slack(len(MESSAGE))
    lines = [e if isinstance(e, bytearray) else e.removeprefix(b"* ") for e in events]
    skipped: list[str] = []
    for item in parse_fetch([*lines, b"OK"], malformed=skipped.append):
        assert 0 < item.uid < 2**32 and 0 <= item.size < 2**63


@pytest.mark.parametrize("mode", [m for m in MODES if m != "healthy"])
def test_every_hostile_mode_is_refused_or_harmless(mode: str) -> None:
    """Each mode, fed whole (up to a few MiB): it breaks a bound, or yields what is harmless."""
    framer = Framer()
    framer.limits = BodyLimits(len(MESSAGE), {1: len(MESSAGE)})
    try:
        events = _feed(framer, _wire(mode, 24 * 1024 * 1024), [])
    except ImapLimitError:
        assert mode.partition("@")[0] in ("line", "literal", "lie", "flood", "parens")
        return
    assert mode.partition("@")[0] in ("bignum", "control", "inject")
    skipped: list[str] = []
    lines = [e if isinstance(e, bytearray) else e.removeprefix(b"* ") for e in events]
    for item in parse_fetch([*lines, b"OK"], malformed=skipped.append):
        assert item.uid == 1
    assert bool(skipped) == (mode == "bignum@fetch")


# -- folder names against the server's hierarchy (issue 21 item 3) -------------------------------

CYRUS_NAMESPACE = b'(("INBOX." ".")) (("user." ".")) (("" "."))'
COURIER_NAMESPACE = b'(("INBOX." ".")) NIL (("#shared." ".")("shared." "."))'
DOVECOT_NAMESPACE = b'(("" "/")) NIL NIL'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CYRUS_NAMESPACE, Hierarchy(".", "INBOX.", ("user.", ""))),
        (COURIER_NAMESPACE, Hierarchy(".", "INBOX.", ("#shared.", "shared."))),
        (DOVECOT_NAMESPACE, Hierarchy("/")),
        (b'(("" NIL)) NIL NIL', Hierarchy(None)),  # a flat server
        (b'(("" "/" "X-PARAM" ("a" "b"))) NIL NIL', Hierarchy("/")),  # RFC 2342 extensions
        (b'(("Pers\\"o\\\\nal/" "/")) NIL NIL', Hierarchy("/", 'Pers"o\\nal/')),
        (b"NIL NIL NIL", None),  # no personal namespace: LIST "" "" decides
        (b'(("" "/")) NIL', None),
        (b'(("" "/"))) NIL NIL', None),
        (b"{5}\r\n", None),  # a literal: not worth parsing
        (b"", None),
    ],
)
def test_parse_namespace(text: bytes, expected: Hierarchy | None) -> None:
    assert parse_namespace(text) == expected


@pytest.mark.parametrize(
    ("name", "dovecot", "cyrus"),
    [
        ("Failed", "Failed", "INBOX.Failed"),
        ("INBOX/Failed", "INBOX/Failed", "INBOX.Failed"),
        ("INBOX.Failed", "INBOX/Failed", "INBOX.Failed"),
        ("inbox.Failed.Sub", "INBOX/Failed/Sub", "INBOX.Failed.Sub"),
        ("Failed/Mailroom", "Failed/Mailroom", "INBOX.Failed.Mailroom"),
        ("Failed.2026", "Failed.2026", "INBOX.Failed.2026"),  # "." is Cyrus's separator
        ("/Failed//x/", "Failed/x", "INBOX.Failed.x"),
        ("user.bob.Failed", "user.bob.Failed", "user.bob.Failed"),  # another namespace
        ("Entwürfe", "Entwürfe", "INBOX.Entwürfe"),
        ("inbox", "inbox", "inbox"),  # INBOX is INBOX, however spelled
    ],
)
def test_folder_names_resolve_against_the_hierarchy(name: str, dovecot: str, cyrus: str) -> None:
    assert parse_namespace(DOVECOT_NAMESPACE).resolve(name) == dovecot  # type: ignore[union-attr]
    assert parse_namespace(CYRUS_NAMESPACE).resolve(name) == cyrus  # type: ignore[union-attr]
    assert Hierarchy(None).resolve(name) == name


def test_a_personal_prefix_spelled_in_lower_case_still_means_inbox() -> None:
    assert Hierarchy(".", "inbox.").resolve("Failed") == "INBOX.Failed"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'(\\Noselect) "/" ""', (True, "/")),
        (b'(\\Noselect) "." ""', (True, ".")),
        (b'(\\Noselect) "\\\\" ""', (True, "\\")),
        (b'(\\Noselect) NIL ""', (True, None)),
        (b"List completed.", (False, None)),
    ],
)
def test_parse_list_delimiter(line: bytes, expected: tuple[bool, str | None]) -> None:
    assert parse_list_delimiter(line) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"(", b")", b" ", b"NIL", b'"', b"\\", b'"INBOX."', b'"."', b"x", b"{3}"]),
        max_size=60,
    ),
    st.text(max_size=40),
)
def test_namespace_and_names_from_strangers_never_raise(parts: list[bytes], name: str) -> None:
    found = parse_namespace(b"".join(parts))
    resolved = (found or Hierarchy("/")).resolve(name)
    assert isinstance(resolved, str)
    parse_list_delimiter(b"".join(parts))


def test_parse_namespace_of_a_megabyte() -> None:
    """A megabyte of namespace descriptions parses (its time is bench/parse_worst.py's)."""
    described = b'("p' + b"x" * 50 + b'" ".")'
    text = b"(" + described * 20_000 + b") NIL NIL"  # 1 MB
    assert parse_namespace(text) == Hierarchy(".", "p" + "x" * 50)


# -- credentials on the wire (issue 21 item 4) ---------------------------------------------------


@pytest.mark.parametrize(
    ("user", "password", "literal_plus", "expected"),
    [
        ("alice", "s3cret", False, ['LOGIN "alice" "s3cret"']),
        ("a b", 'p"a\\ss', False, ['LOGIN "a b" "p\\"a\\\\ss"']),
        ("alice", "pässwörd", False, ['LOGIN "alice" {10}', "pässwörd"]),
        ("alice", "pässwörd", True, ['LOGIN "alice" {10+}\r\npässwörd']),
        ("jörg", "pässwörd", False, ["LOGIN {5}", "jörg {10}", "pässwörd"]),
        ("alice", "tab\there", False, ['LOGIN "alice" {8}', "tab\there"]),  # not printable
    ],
)
def test_login_segments_never_quote_8_bit(
    user: str, password: str, literal_plus: bool, expected: list[str]
) -> None:
    assert login_segments(user, password, literal_plus=literal_plus) == expected


def test_capabilities_told_in_a_greeting_or_an_answer_are_read() -> None:
    greeting = b"* OK [CAPABILITY IMAP4rev1 IDLE AUTH=PLAIN] Dovecot ready."
    assert capability_code(greeting) == {"IMAP4rev1", "IDLE", "AUTH=PLAIN"}
    assert capability_code(b"* OK [CAPABILITY IDLE] no IMAP4rev1") is None  # then asked
    assert capability_code(b"* OK ready") is None
    login = [b"CAPABILITY IMAP4rev1 OLD", b"[CAPABILITY imap4rev1 MOVE] Logged in"]
    assert told_capabilities(login) == {"imap4rev1", "MOVE"}  # the last told counts
    assert told_capabilities([b"CAPABILITY IMAP4rev1 X", b"Logged in"]) == {"IMAP4rev1", "X"}
    assert told_capabilities([b"Logged in"]) is None
    many = b"[CAPABILITY " * 100_000  # no closing bracket: one pass, not one per "["
    assert capability_code(many) is None


@given(
    st.lists(st.sampled_from([b"[", b"]", b" ", b"CAPABILITY ", b"IMAP4rev1", b"x"]), max_size=80)
)
def test_fuzz_capability_codes_never_fail_and_stay_linear(parts: list[bytes]) -> None:
    line = b"".join(parts)
    for told in (capability_code(line), told_capabilities([line, bytearray(line)])):
        assert told is None or "IMAP4REV1" in {word.upper() for word in told}
