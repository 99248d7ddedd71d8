"""The shared pieces under every source: the budget, the circuit breaker, supervision."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from mailroom.backoff import Backoff
from mailroom.config import parse_config
from mailroom.config.model import ImapMailboxConfig
from mailroom.delivery.circuit import PROBE_MAX_S, Circuit
from mailroom.envelope import Envelope, Outcome
from mailroom.errors import ImapAuthError, ImapConnectionLost, TokenError
from mailroom.observe.monitor import AuthFailure, Monitor
from mailroom.sources.budget import Budget
from mailroom.sources.imap import search_criteria
from mailroom.sources.lifecycle import AUTH_BACKOFF, Source, wait_any
from tests.helpers import config_dict

# -- wait_any ---------------------------------------------------------------------------------


async def test_wait_any_wakes_on_any_event_future_or_the_time_and_leaves_no_waiter() -> None:
    first, second, lost = asyncio.Event(), asyncio.Event(), asyncio.Event()
    events = (first, second, lost)
    loop = asyncio.get_running_loop()
    waiting = asyncio.ensure_future(wait_any(events, timeout_s=60))
    await asyncio.sleep(0)
    assert not waiting.done()
    second.set()
    assert await asyncio.wait_for(waiting, 10) is False  # woken, not timed out
    assert [len(e._waiters) for e in events] == [0, 0, 0]
    assert await wait_any(events) is False  # one is set already: at once
    second.clear()
    assert await wait_any(events, timeout_s=0.01) is True  # nothing came: timed out
    future: asyncio.Future[None] = loop.create_future()
    waiting = asyncio.ensure_future(wait_any(events, futures=(future,), timeout_s=60))
    await asyncio.sleep(0)
    future.set_result(None)
    assert await asyncio.wait_for(waiting, 10) is False
    waiting = asyncio.ensure_future(wait_any(events, futures=(future2 := loop.create_future(),)))
    await asyncio.sleep(0)
    waiting.cancel()  # cancelled while waiting: neither the events nor the future keep it
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert [len(e._waiters) for e in events] == [0, 0, 0] and not future2.cancelled()
    first.set()  # and a later set() finds no stale waiter to resolve
    assert not future2.done()


# -- the budget -------------------------------------------------------------------------------


async def test_reservations_are_granted_in_order_as_room_frees() -> None:
    budget = Budget(messages=3, size=1000)
    first = budget.reserve(2, 600)
    second = budget.reserve(2, 100)  # does not fit beside the first
    third = budget.reserve(1, 100)  # would fit, but waits its turn: no starvation
    assert first.done() and not second.done() and not third.done()
    assert (budget.messages, budget.bytes, budget.waiting) == (2, 600, 2)
    assert budget.room() == (0, 0)  # others wait: a new request would queue behind them
    budget.use(first, 1, 500)  # one message of 500 bytes fetched, the rest given back
    assert second.done() and not third.done()
    assert (budget.messages, budget.bytes) == (3, 600)
    budget.release(1, 500)
    assert third.done() and (budget.messages, budget.bytes) == (3, 200)
    budget.release(2, 150)
    assert budget.room() == (2, 950)


async def test_a_reservation_larger_than_the_budget_waits_until_nothing_is_in_flight() -> None:
    budget = Budget(messages=10, size=1000)
    small = budget.reserve(1, 10)
    huge = budget.reserve(1, 5000)
    assert small.done() and not huge.done()
    budget.cancel(small)
    assert huge.done() and budget.bytes == 5000


async def test_cancel_gives_back_a_granted_reservation_and_withdraws_a_waiting_one() -> None:
    budget = Budget(messages=1, size=100)
    granted = budget.reserve(1, 50)
    waiting = budget.reserve(1, 50)
    budget.cancel(waiting)
    budget.cancel(waiting)  # twice is harmless
    assert budget.waiting == 0 and budget.messages == 1
    budget.cancel(granted)
    budget.cancel(granted)
    assert (budget.messages, budget.bytes) == (0, 0)


async def test_hold_is_a_semaphore_that_can_be_resized() -> None:
    budget = Budget(messages=2, size=0)
    inside = 0
    most = 0
    gate = asyncio.Event()

    async def worker() -> None:
        nonlocal inside, most
        async with budget.hold():
            inside += 1
            most = max(most, inside)
            await gate.wait()
            inside -= 1

    tasks = [asyncio.create_task(worker()) for _ in range(6)]
    for _ in range(100):
        await asyncio.sleep(0)
    assert most == 2 and budget.waiting == 4
    budget.resize(messages=3, size=0)
    for _ in range(100):
        await asyncio.sleep(0)
    assert most == 3
    gate.set()
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)
    assert (budget.messages, budget.waiting) == (0, 0)


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    budget = Budget(messages=1, size=0)
    held = budget.reserve(1, 0)

    async def waiter() -> None:
        async with budget.hold():
            raise AssertionError("never granted")

    task = asyncio.create_task(waiter())
    for _ in range(10):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    budget.cancel(held)
    assert (budget.messages, budget.waiting) == (0, 0)


# -- the circuit breaker ----------------------------------------------------------------------


class Events(Monitor):
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []

    def circuit(self, webhook: str, *, is_open: bool) -> None:
        self.seen.append(("circuit", is_open))

    def restarted(self, mailbox: str) -> None:
        self.seen.append(("restarted", mailbox))

    def auth_error(self, mailbox: str, failure: AuthFailure) -> None:
        self.seen.append(("auth_error", failure.value))


async def test_the_circuit_opens_once_probes_one_at_a_time_and_closes_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailroom")
    events = Events()
    circuit = Circuit("https://hook:443", Backoff(initial_s=0.01, max_s=0.02), monitor=events)
    for _ in range(4):
        assert await circuit.admit()
        circuit.failed("HTTP 503")
    assert not circuit.is_open
    assert await circuit.admit()
    circuit.failed("HTTP 503")
    assert circuit.is_open and events.seen == [("circuit", True)]
    # Many deliveries wait; exactly one is let through as the probe.
    admitted: list[int] = []
    arrivals: asyncio.Queue[int] = asyncio.Queue()

    async def delivery(n: int) -> None:
        if await circuit.admit():
            admitted.append(n)
            arrivals.put_nowait(n)

    waiting = [asyncio.create_task(delivery(n)) for n in range(20)]
    async with asyncio.timeout(5):
        await arrivals.get()
    assert len(admitted) == 1
    circuit.failed("HTTP 503")  # the probe failed: still open, the next probe later
    async with asyncio.timeout(5):
        await arrivals.get()
    assert len(admitted) == 2 and circuit.is_open
    circuit.answered()  # the probe got an answer: every waiting delivery goes
    async with asyncio.timeout(5):
        await asyncio.gather(*waiting)
    assert sorted(admitted) == list(range(20)) and not circuit.is_open
    assert events.seen == [("circuit", True), ("circuit", False)]
    opened = [r for r in caplog.records if "failures in a row" in r.getMessage()]
    closed = [r for r in caplog.records if "answering again" in r.getMessage()]
    assert len(opened) == 1 and len(closed) == 1
    assert opened[0].getMessage().startswith("webhook https://hook:443: 5 failures in a row")


async def test_an_abandoned_probe_lets_the_next_one_go_and_admit_can_time_out() -> None:
    circuit = Circuit("h", Backoff(initial_s=0.01, max_s=0.01), failures_to_open=1)
    circuit.failed("timeout", retry_after_s=3600)  # a long Retry-After is honoured (capped)
    assert not await circuit.admit(timeout_s=0.0)
    async with asyncio.timeout(5):
        assert await circuit.admit()  # max_s caps the wait
    waiter = asyncio.create_task(circuit.admit())
    await asyncio.sleep(0)
    assert not waiter.done()  # the probe is out
    circuit.abandoned()
    async with asyncio.timeout(5):
        assert await waiter


def test_probes_come_within_seconds_however_long_the_outage_and_honour_retry_after() -> None:
    """Issue 23: with retry.max 600 s, the probes' backoff grew to minutes, and a webhook
    that came back waited that long for its first delivery."""
    policy = Backoff(initial_s=1.0, max_s=600.0)
    circuit = Circuit("h", policy, failures_to_open=1)
    # The breaker's n-th failed probe waits circuit.backoff.delay(n + 1).
    delays = [circuit.backoff.delay(attempt) for attempt in range(1, 60)]
    assert max(delays) <= PROBE_MAX_S and min(delays[10:]) >= PROBE_MAX_S / 2
    # A Retry-After still counts, up to the policy's own cap (retry.max).
    assert circuit.backoff.delay(30, retry_after_s=120) == 120
    assert circuit.backoff.delay(30, retry_after_s=3600) == 600


# -- supervision -------------------------------------------------------------------------------


def _imap_config() -> ImapMailboxConfig:
    box = {"id": "box", "address": "a+%{key}@example.com", "host": "h", "user": "u",
           "password": "p"}  # fmt: skip
    config = parse_config(config_dict([box], "http://127.0.0.1:1/"), env={})
    mailbox = config.mailboxes[0]
    assert isinstance(mailbox, ImapMailboxConfig)
    return mailbox


class Scripted(Source[ImapMailboxConfig, int, None]):
    """A source whose connections fail as scripted, then serve until stopped."""

    max_in_flight = 4
    backoff = Backoff(initial_s=0.001, max_s=0.002)

    def __init__(self, failures: list[Exception], **kwargs: Any) -> None:
        self.submitted: list[Envelope] = []
        super().__init__(_imap_config(), self.submitted.append, logger=logging.getLogger("t"),
                         **kwargs)  # fmt: skip
        self.failures = failures
        self.serves = 0
        self.serving = asyncio.Event()

    async def _serve(self) -> None:
        self.serves += 1
        if self.failures:
            raise self.failures.pop(0)
        self._set_connected()
        self.serving.set()
        await self._stopping.wait()
        await self._drained.wait()

    async def _apply_settlements(self) -> None:
        for settlement in self._take_settlements():
            self._settled(settlement)


async def test_an_unexpected_error_is_logged_counted_and_the_source_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = Events()
    stopping, drained = asyncio.Event(), asyncio.Event()
    source = Scripted(
        [RuntimeError("a bug"), ImapConnectionLost("gone")],
        stopping=stopping,
        drained=drained,
        monitor=events,
    )
    task = asyncio.create_task(source.run())
    async with asyncio.timeout(5):
        await source.serving.wait()
    assert source.serves == 3
    stopping.set()
    drained.set()
    async with asyncio.timeout(5):
        await task
    assert source.restarts == 1 and events.seen == [("restarted", "box")]
    bug = next(r for r in caplog.records if "a bug" in r.getMessage())
    assert bug.levelno == logging.ERROR and bug.exc_info is not None
    assert bug.getMessage().startswith("box: RuntimeError: a bug; restarting in")
    lost = next(r for r in caplog.records if "gone" in r.getMessage())
    assert lost.levelno == logging.WARNING and not lost.exc_info
    assert "reconnecting in" in lost.getMessage()


async def test_refused_logins_and_missing_tokens_are_counted_apart() -> None:
    events = Events()
    stopping, drained = asyncio.Event(), asyncio.Event()
    failures: list[Exception] = [
        ImapAuthError("login as u refused"),
        TokenError("Entra ID unreachable"),  # (a refusal, twice running, backs off for minutes)
        ImapConnectionLost("gone"),  # not a credentials problem
    ]
    source = Scripted(failures, stopping=stopping, drained=drained, monitor=events)
    task = asyncio.create_task(source.run())
    async with asyncio.timeout(5):
        await source.serving.wait()
    stopping.set()
    drained.set()
    async with asyncio.timeout(5):
        await task
    assert events.seen == [("auth_error", "login"), ("auth_error", "token")]


async def test_repeated_refused_logins_back_off_for_minutes() -> None:
    source = Scripted([], stopping=asyncio.Event(), drained=asyncio.Event())
    refused = ImapAuthError("login as u refused")
    first = source._delay_after(refused)
    second = source._delay_after(refused)
    third = source._delay_after(refused)
    assert first <= Scripted.backoff.max_s  # an expired token or a restart: retried at once
    assert AUTH_BACKOFF.initial_s / 2 <= second <= AUTH_BACKOFF.initial_s
    assert third >= AUTH_BACKOFF.initial_s
    source._set_connected()  # a login that works ends the run
    assert source._delay_after(refused) <= Scripted.backoff.max_s
    # An identity provider that refuses the app counts too; one that is unreachable does not.
    assert source._delay_after(TokenError("refused", code="invalid_client")) >= 30
    assert source._delay_after(TokenError("no answer")) <= Scripted.backoff.max_s


async def test_a_forgotten_hand_out_leaves_a_new_message_under_the_same_key_alone() -> None:
    budget = Budget(messages=10, size=10_000)
    source = Scripted([], stopping=asyncio.Event(), drained=asyncio.Event(), budget=budget)

    def hand_out(size: int) -> Envelope:
        budget.charge(1, size)  # a source takes the budget before it fetches
        source._hand_out(7, ref="uid 7", idempotency_key=f"msg_{size}", raw=b"x", size=size,
                         charged=size, too_large=False, tag=None)  # fmt: skip
        return source.submitted[-1]

    old = hand_out(100)
    source._release_all()  # a new UIDVALIDITY: UID 7 names another message from now on
    assert (source.pending, budget.messages, budget.bytes) == (0, 0, 0)
    new = hand_out(200)
    # The old message's delivery ends after the new one was handed out under the same UID.
    settling = asyncio.create_task(old.settle(Outcome.DELIVERED))
    await asyncio.sleep(0)
    await source._apply_settlements()
    async with asyncio.timeout(5):
        await settling
    old.release(hold=True)
    assert (source.pending, budget.messages, budget.bytes) == (1, 1, 200)
    assert 7 not in source._stuck
    new.release(hold=False)
    assert (source.pending, budget.messages, budget.bytes) == (0, 0, 0)


# -- search_command ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "exact", "criteria"),
    [
        ("UNSEEN", False, "UNSEEN NOT KEYWORD $MailroomFailed"),
        ("ALL", False, "ALL UNSEEN NOT KEYWORD $MailroomFailed"),
        ("NEW", False, "NEW NOT KEYWORD $MailroomFailed"),
        ("CHARSET UTF-8 SUBJECT x", False, "CHARSET UTF-8 SUBJECT x UNSEEN NOT KEYWORD "
         "$MailroomFailed"),
        ("OR FROM a FROM b", False, "OR FROM a FROM b UNSEEN NOT KEYWORD $MailroomFailed"),
        ("ALL", True, "ALL"),
    ],
)  # fmt: skip
def test_search_command_is_combined_with_unseen_and_not_failed(
    command: str, exact: bool, criteria: str
) -> None:
    box = {"id": "b", "address": "a+%{key}@example.com", "host": "h", "user": "u",
           "password": "p", "search_command": command, "search_command_exact": exact}  # fmt: skip
    mailbox = parse_config(config_dict([box], "http://127.0.0.1:1/"), env={}).mailboxes[0]
    assert isinstance(mailbox, ImapMailboxConfig)
    assert search_criteria(mailbox) == criteria
