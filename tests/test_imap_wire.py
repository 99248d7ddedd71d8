"""Pure IMAP wire helpers: sequence sets, mailbox names, FETCH response parsing."""

from __future__ import annotations

import pytest

from mailroom.sources.imap_wire import FetchedMessage, mailbox_name, parse_fetch, uid_set


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
