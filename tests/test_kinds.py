"""The source-kind registry: a third kind, registered here and nowhere else, runs end to end.

``Probe`` is a push-like kind that lives only in this file: a config section of its own, a
source that hands over one message when asked and settles it, a readiness rule (while
connected: it has no poll interval, so a health module that took whatever is not IMAP for Graph
would not know when it is ready), a check, and no redrive. Through ``mailroom.kinds.KINDS``
with it added, the real supervisor runs it: ``/readyz`` follows its rule, its message reaches
the real webhook receiver and is settled as delivered; ``mailroom check`` runs its check and
``mailroom redrive`` says it does not apply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from mailroom import check, redrive
from mailroom.config import Config, MailboxConfig, parse_config
from mailroom.envelope import Outcome
from mailroom.errors import SourceError
from mailroom.kinds import KINDS, Kind
from mailroom.observe.monitor import SourceState
from mailroom.redrive.job import Options
from mailroom.runtime import supervisor
from mailroom.runtime.resources import Shares, Wiring
from mailroom.sources.lifecycle import Source, wait_any
from tests.helpers import config_dict, message, wait_until
from tests.servers.dovecot import free_port
from tests.servers.webhook import WebhookReceiver


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeMailboxConfig(MailboxConfig):
    kind = "probe"
    inbox_method = "probe"

    @property
    def dead_letter(self) -> str:
        return "answered 5xx (the probe's own way)"


class ProbeSource(Source[ProbeMailboxConfig, int, None]):
    """Connects at once; hands over what ``offer`` puts in its inbox; records settlements."""

    max_in_flight = 8
    running: list[ProbeSource] = []  # the instances the registry built, for the test to drive

    def __init__(self, config: ProbeMailboxConfig, wiring: Wiring) -> None:
        super().__init__(
            config,
            wiring.submit,
            stopping=wiring.stopping,
            drained=wiring.drained,
            monitor=wiring.monitor,
            budget=wiring.resources.budget,
            logger=logging.getLogger("tests.probe"),
        )
        self.inbox: list[bytes] = []
        self.settled: list[Outcome] = []
        self.lose = asyncio.Event()
        ProbeSource.running.append(self)

    def offer(self, raw: bytes) -> None:
        self.inbox.append(raw)
        self._wake.set()

    async def _serve(self) -> None:
        self._set_connected()
        while not self.finished():
            self._wake.clear()
            for settlement in self._take_settlements():
                self.settled.append(settlement.outcome)
                self._settled(settlement)
            while self.inbox and not self._stopping.is_set():
                raw = self.inbox.pop(0)
                key = len(self.settled) + self.pending + 1
                self._budget.charge(1, len(raw))
                self._hand_out(key, ref=f"probe {key}", idempotency_key=f"msg_probe{key:028d}",
                               raw=raw, size=len(raw), charged=len(raw), too_large=False,
                               tag=None)  # fmt: skip
            if self.lose.is_set():
                self.lose.clear()
                raise SourceError("the probe dropped its connection")
            await wait_any((self._wake, self._stopping, self._drained, self.lose))


async def _probe_check(report: check.Report, config: ProbeMailboxConfig) -> None:
    report.add(f"probe[{config.id}]", "listening", check.Status.OK, "nothing to check")


PROBE: Kind[ProbeMailboxConfig] = Kind(
    config=ProbeMailboxConfig,
    source=ProbeSource,
    shares=lambda config: Shares(),
    check=_probe_check,
    redrive=None,
)


def probe_config(webhook_url: str, port: int) -> Config:
    """A config with one probe mailbox: the top-level settings parsed as users write them, the
    mailbox built directly (the YAML knows only the kinds config.mailboxes.SECTIONS names)."""
    box = {"address": "incoming+%{key}@example.com", "host": "h", "user": "u", "password": "p"}
    data = config_dict([box], webhook_url)
    data["health"] = {"listen": f"127.0.0.1:{port}"}
    parsed = parse_config(data, env={})
    template = parsed.mailboxes[0]
    probe = ProbeMailboxConfig(id="probe", routing=template.routing, webhook=template.webhook)
    return dataclasses.replace(parsed, mailboxes=(probe,))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        yield client


async def test_a_kind_registered_in_a_test_runs_end_to_end(
    webhook: WebhookReceiver, session: aiohttp.ClientSession
) -> None:
    ProbeSource.running.clear()
    port = free_port()
    config = probe_config(webhook.url, port)
    readyz = f"http://127.0.0.1:{port}/readyz"

    async def ready() -> tuple[int, Any]:
        try:
            async with session.get(readyz) as response:
                return response.status, await response.json()
        except aiohttp.ClientConnectionError:  # not listening yet
            return 0, None

    stop = asyncio.Event()
    task = asyncio.create_task(supervisor.run(config, stop, kinds=KINDS.with_kind(PROBE)))
    try:
        await wait_until(lambda: len(ProbeSource.running) == 1, what="the probe source")
        (source,) = ProbeSource.running
        await wait_until(lambda: source.state is SourceState.CONNECTED, what="connected")
        status, body = await ready()
        assert status == 200 and body["mailboxes"]["probe"]["kind"] == "probe"
        assert body["mailboxes"]["probe"]["state"] == "connected"

        source.offer(message(1))
        (request,) = await webhook.wait_for(1)
        assert request.headers["X-Mailroom-Mailbox"] == "probe"
        assert request.json()["key"] == "key1"
        await wait_until(lambda: source.settled == [Outcome.DELIVERED], what="settled")

        source.lose.set()  # its rule is "while connected": a lost connection is not ready
        await wait_until(lambda: source.state is SourceState.RECONNECTING, what="lost")
        status, body = await ready()
        assert status == 503 and body["mailboxes"]["probe"]["state"] == "reconnecting"
        await wait_until(lambda: source.state is SourceState.CONNECTED, what="reconnected")
        assert (await ready())[0] == 200
    finally:
        stop.set()
        async with asyncio.timeout(30):
            assert await task == 0


async def test_check_and_redrive_ask_the_kind(webhook: WebhookReceiver) -> None:
    config = probe_config(webhook.url, free_port())
    kinds = KINDS.with_kind(PROBE)
    lines: list[str] = []
    report = check.Report(lines.append)
    assert await check.run(config, path="x.yml", send_test=False, report=report, kinds=kinds)
    assert "OK   probe[probe] listening: nothing to check" in lines
    out: list[str] = []
    options = Options()
    assert await redrive.run(config, config.mailboxes, options, out.append, kinds=kinds)
    assert out[0] == "probe: redrive does not apply to probe mailboxes"


def test_an_unregistered_kind_is_named_and_a_kind_registers_once() -> None:
    config = probe_config("http://127.0.0.1:1/", free_port())
    with pytest.raises(LookupError, match="probe: no kind of source is registered"):
        KINDS.of(config.mailboxes[0])
    with pytest.raises(ValueError, match="registered twice"):
        KINDS.with_kind(PROBE).with_kind(PROBE)
    assert KINDS.with_kind(PROBE).of(config.mailboxes[0]) is PROBE
