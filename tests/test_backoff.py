"""The one retry helper: the Backoff policy (delays, jitter, the Retry-After clamp) and Retry
(attempts, the give-up deadline), on a fake clock."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailroom.backoff import ONCE_MORE, Backoff, Retry, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delays_double_up_to_the_cap_with_equal_jitter() -> None:
    exact = Backoff(initial_s=1.0, max_s=10.0, jitter=False)
    assert [exact.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    jittered = Backoff(initial_s=1.0, max_s=10.0)
    for attempt, ceiling in ((1, 1.0), (3, 4.0), (40, 10.0)):
        for _ in range(50):  # half fixed, half random: never below half, never above the cap
            assert ceiling / 2 <= jittered.delay(attempt) <= ceiling


def test_retry_after_is_honoured_within_the_clamp() -> None:
    policy = Backoff(initial_s=1.0, max_s=60.0, jitter=False)
    assert policy.delay(1, retry_after_s=30.0) == 30.0  # later than the backoff: as asked
    assert policy.delay(3, retry_after_s=0.0) == 4.0  # sooner: never below the backoff
    assert policy.delay(1, retry_after_s=3600.0) == 60.0  # capped at max_s by default


def test_retry_after_zero_cannot_spin_and_a_long_one_is_capped() -> None:
    # Graph's: a Retry-After of 0 (or a past date) still waits the floor; beyond the cap, the cap.
    graph = Backoff(initial_s=0.01, max_s=300.0, retry_after_min_s=1.0, retry_after_max_s=900.0)
    assert graph.delay(1, retry_after_s=0.0) == 1.0
    assert graph.delay(1, retry_after_s=86_400.0) == 900.0
    assert graph.delay(1, retry_after_s=600.0) == 600.0  # above max_s, under its own cap
    assert graph.delay(1) <= 0.01  # without a Retry-After, the floor does not apply


def test_a_policy_without_delay_must_cap_its_attempts() -> None:
    with pytest.raises(ValueError, match="spin"):
        Backoff(initial_s=0.0, max_s=0.0)
    with pytest.raises(ValueError, match="initial_s <= max_s"):
        Backoff(initial_s=2.0, max_s=1.0)
    with pytest.raises(ValueError, match="at least 1"):
        Backoff(initial_s=1.0, max_s=1.0, attempts=0)


def test_retry_gives_up_before_the_deadline_would_pass() -> None:
    clock = Clock()
    retry = Retry(Backoff(initial_s=2.0, max_s=2.0, give_up_after_s=5.0, jitter=False), clock=clock)
    delays = []
    while True:
        retry.begin()
        assert retry.left_s is not None
        delay = retry.delay()
        if delay is None:
            break
        delays.append(delay)
        clock.now += delay  # the wait, then the next attempt fails at once
    # At 4 s a third 2 s wait would end past the 5 s deadline: given up after 3 attempts.
    assert delays == [2.0, 2.0] and retry.attempt == 3 and retry.elapsed_s == 4.0
    assert retry.left_s == 1.0


def test_retry_gives_up_after_its_attempts_and_never_without_a_limit() -> None:
    capped = Retry(Backoff(initial_s=0.2, max_s=2.0, attempts=3))
    outcomes = []
    for _ in range(3):
        capped.begin()
        outcomes.append(capped.delay() is not None)
    assert outcomes == [True, True, False]
    endless = Retry(Backoff(initial_s=0.1, max_s=0.1))
    for _ in range(10_000):
        endless.begin()
        assert endless.delay() is not None
    assert endless.left_s is None


def test_once_more_allows_one_more_attempt_at_once() -> None:
    retry = Retry(ONCE_MORE)
    retry.begin()
    assert retry.delay() == 0.0
    retry.begin()
    assert retry.delay() is None


def test_retry_log_fields_say_what_failed_which_attempt_and_what_next() -> None:
    retry = Retry(Backoff(initial_s=1.0, max_s=1.0, jitter=False))
    retry.begin()
    assert retry.extra(TimeoutError("slow"), 1.0) == {
        "attempt": 1,
        "error": "TimeoutError",
        "delay_s": 1.0,
    }
    assert retry.extra(None, None) == {"attempt": 1}


async def test_a_retry_says_what_failed_which_attempt_and_what_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    retry = Retry(Backoff(initial_s=0.01, max_s=0.01, jitter=False))
    retry.begin()
    retry.begin()
    logger = logging.getLogger("mailroom.test")
    with caplog.at_level(logging.WARNING, logger="mailroom.test"):
        await retry.wait(logger, logging.WARNING, "box: uid 7: webhook", TimeoutError("slow"),
                         delay_s=0.01, fields={"mailbox": "box"})  # fmt: skip
    (record,) = caplog.records
    assert record.getMessage() == "box: uid 7: webhook attempt 2 failed: slow; retrying in 0.0s"
    fields = {name: getattr(record, name) for name in ("mailbox", "attempt", "error", "delay_s")}
    assert fields == {"mailbox": "box", "attempt": 2, "error": "TimeoutError", "delay_s": 0.01}


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("120") == 120.0
    assert retry_after(" 7 ") == 7.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # past: at once (then clamped)
    assert retry_after("²") is None and retry_after("soon") is None and retry_after(None) is None


@given(
    attempt=st.integers(min_value=-5, max_value=10_000),
    initial=st.floats(min_value=0.001, max_value=100),
    spread=st.floats(min_value=1, max_value=1000),
    asked=st.none() | st.floats(min_value=0, max_value=1e9),
)
def test_every_delay_stays_within_its_bounds(
    attempt: int, initial: float, spread: float, asked: float | None
) -> None:
    policy = Backoff(initial_s=initial, max_s=initial * spread, retry_after_min_s=0.5)
    delay = policy.delay(attempt, asked)
    assert 0 < delay <= max(policy.max_s, 0.5)
    if asked is None:
        assert initial / 2 <= delay <= policy.max_s
