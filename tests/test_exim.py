"""A real MTA in front of mailroom: Debian's Exim (a private instance) relays to the LMTP
listener with the recipe's own router and transport (examples/lmtp/exim-socket.conf over a
unix socket, exim-tcp.conf over TCP).

Mail submitted to Exim reaches the webhook; during a webhook outage the message stays in
Exim's queue (``exim -bp``), and a queue run after the receiver is back (``exim -qff``)
delivers it, under the same webhook-id. Needs root and ``make exim`` (Exim's binary taken out
of its package, which conflicts with postfix).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, message, running, wait_until
from tests.lmtp import greets, lmtp_config
from tests.servers.dovecot import free_port
from tests.servers.exim import EXIM, USER, Exim
from tests.servers.webhook import WebhookReceiver

RECIPES = ROOT / "examples" / "lmtp"
DOMAIN = "incoming.example.com"

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def recipe(name: str, replace: dict[str, str]) -> tuple[str, str]:
    """The router and the transport of a recipe file, with ``replace`` applied."""
    text = (RECIPES / name).read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    routers, _, transports = text.partition("# -- transports --")
    return routers.partition("# -- routers --")[2], transports


@pytest.fixture
def exim_factory() -> Iterator[Any]:
    if not EXIM.exists():
        pytest.fail("exim4 is missing: run `make exim` (or `make test`) as root", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("a private Exim needs root (it runs as Debian-exim)")
    made: list[Exim] = []

    def make(routers: str, transports: str) -> Exim:
        server = Exim(routers, transports)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="mailroom-lmtp-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def submit(port: int, recipients: list[str], raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.sendmail("sender@example.org", recipients, raw)


@pytest.mark.parametrize("variant", ["socket", "tcp"])
async def test_exim_relays_to_mailroom_and_keeps_what_the_webhook_cannot_take(
    exim_factory: Any, webhook: WebhookReceiver, variant: str, socket_dir: Path
) -> None:
    port = free_port()
    if variant == "socket":
        # Exim's lmtp transport runs as Debian-exim: a directory it may enter (not under
        # pytest's tmp_path, which only root may), and the socket's group.
        directory = socket_dir
        shutil.chown(directory, "root", USER)
        directory.chmod(0o750)
        where: int | Path = directory / "lmtp.sock"
        listen, replace = f"unix:{where}", {"/run/mailroom/lmtp.sock": str(where)}
        box: dict[str, Any] = {"socket_group": USER}
    else:
        where, listen, replace, box = (
            port,
            f"127.0.0.1:{port}",
            {"port = 2424": f"port = {port}"},
            {},
        )
    exim: Exim = exim_factory(*recipe(f"exim-{variant}.conf", replace))
    exim.start()
    config = lmtp_config(
        webhook.url, listen, address=f"incoming+%{{key}}@{DOMAIN}", reply_within=3, **box
    )
    raw = message(90)
    async with running(config):
        await wait_until(lambda: greets(where), what="mailroom's listener")
        await asyncio.to_thread(
            submit, exim.smtp_port, [f"incoming+ex1@{DOMAIN}", f"incoming+ex2@{DOMAIN}"], raw
        )
        requests = await webhook.wait_for(2, timeout=60)

        webhook.respond(503)
        await asyncio.to_thread(submit, exim.smtp_port, [f"incoming+ex3@{DOMAIN}"], raw)
        await wait_until(lambda: "451 4.3.0" in exim.log(), timeout=60, what="the deferral")
        queued = await asyncio.to_thread(exim.queue)
        tried = {r.headers["webhook-id"] for r in webhook.requests[2:]}

        webhook.respond(200, b"{}", {"Content-Type": "application/json"})

        async def delivered() -> bool:
            await asyncio.to_thread(exim.flush)  # as Exim's retry would, sooner
            return (await asyncio.to_thread(exim.queue)).strip() == ""

        await wait_until(delivered, timeout=60, what="the queued message delivered")
    assert sorted(r.json()["key"] for r in requests) == ["ex1", "ex2"]
    assert f"incoming+ex3@{DOMAIN}" in queued
    assert len(tried) == 1 and webhook.delivered()[-1] in tried  # the same webhook-id
    assert 'C="250 2.0.0 msg_' in exim.log()
