"""A real MTA in front of mailroom: Debian's Postfix (a private instance) relays to the LMTP
listener with the recipe's own lines (examples/lmtp/postfix-main.cf and mailroom.yml).

Mail submitted to Postfix reaches the webhook; an address mailroom refuses is refused by
Postfix at SMTP time (its address-verification probe asks mailroom); during a webhook outage
the message stays in Postfix's queue (``postqueue -j``), and ``postqueue -f`` after the
receiver is back delivers it, under the same webhook-id. Needs root (Postfix's daemons) and the
postfix package (``make postfix``; the system's Postfix service is never configured or started).
"""

from __future__ import annotations

import asyncio
import grp
import os
import shutil
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom.config import parse_config
from tests.helpers import ROOT, WHSEC, message, running, wait_until
from tests.lmtp import greets
from tests.servers.dovecot import free_port
from tests.servers.postfix import POSTFIX, Postfix
from tests.servers.webhook import WebhookReceiver

RECIPE = ROOT / "examples" / "lmtp"
SOCKET = "/var/spool/postfix/mailroom/lmtp.sock"  # the recipe's
DOMAIN = "incoming.example.com"

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]


def recipe(transport: str | None) -> str:
    """The recipe's main.cf lines; ``transport`` in place of its unix socket (lmtp:inet)."""
    lines = (RECIPE / "postfix-main.cf").read_text()
    if transport is not None:
        lines = lines.replace("lmtp:unix:mailroom/lmtp.sock", transport)
    return lines


@pytest.fixture
def postfix_factory() -> Iterator[Any]:
    if not os.path.exists(POSTFIX):
        pytest.fail(
            "postfix is missing: run `make postfix` (or `make test`) as root", pytrace=False
        )
    if os.geteuid() != 0:
        pytest.fail("a private Postfix needs root (its daemons run as the postfix user)")
    made: list[Postfix] = []

    def make(lines: str) -> Postfix:
        server = Postfix(lines)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def mailroom_config(webhook_url: str, listen: str) -> Any:
    """The recipe's mailroom.yml, listening on ``listen``, posting to the test receiver."""
    data = yaml.safe_load((RECIPE / "mailroom.yml").read_text())
    box = data["mailboxes"][0]
    if listen.startswith("unix:"):
        box["listen"] = listen
    else:
        box["listen"] = listen
        del box["socket_mode"]
    box["reply_within"] = 3
    data["webhook"] = {
        "url": webhook_url,
        "signing_secret": WHSEC,
        "retry": {"initial": 0.05, "max": 0.2},
        "timeout": 5,
    }
    del data["health"]
    data["shutdown_timeout"] = 5
    return parse_config(data, env={})


def submit(port: int, recipients: list[str], raw: bytes) -> dict[str, tuple[int, bytes]]:
    """SMTP to Postfix; the recipients it refused."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        try:
            return client.sendmail("sender@example.org", recipients, raw)
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients


@pytest.mark.parametrize("transport", ["unix", "inet"])
async def test_postfix_relays_to_mailroom_and_keeps_what_the_webhook_cannot_take(
    postfix_factory: Any, webhook: WebhookReceiver, transport: str
) -> None:
    port = free_port()
    inet = f"lmtp:inet:127.0.0.1:{port}" if transport == "inet" else None
    postfix: Postfix = postfix_factory(recipe(inet))
    postfix.start()
    if transport == "unix":  # the recipe's directory, inside this instance's queue directory
        directory = postfix.queue_dir / "mailroom"
        directory.mkdir()
        shutil.chown(directory, "root", "postfix")
        directory.chmod(0o2750)
        where: int | Path = directory / "lmtp.sock"
        listen = f"unix:{where}"
    else:
        where, listen = port, f"127.0.0.1:{port}"
    config = mailroom_config(webhook.url, listen)
    raw = message(60)
    async with running(config):
        await wait_until(lambda: greets(where), what="mailroom's listener")
        if isinstance(where, Path):
            assert grp.getgrgid(os.stat(where).st_gid).gr_name == "postfix"
        refused = await asyncio.to_thread(
            submit,
            postfix.smtp_port,
            [f"incoming+pf1@{DOMAIN}", f"nobody@{DOMAIN}", f"incoming+pf2@{DOMAIN}"],
            raw,
        )
        requests = await webhook.wait_for(2, timeout=60)
        await wait_until(lambda: queue_empty(postfix), what="Postfix's queue emptied")

        webhook.respond(503)  # the outage: mailroom answers 451, Postfix keeps the message
        await asyncio.to_thread(submit, postfix.smtp_port, [f"incoming+pf3@{DOMAIN}"], raw)
        deferred = await wait_for_deferral(postfix)
        tried = {r.headers["webhook-id"] for r in webhook.requests[2:]}

        webhook.respond(200, b"{}", {"Content-Type": "application/json"})
        for _ in range(30):  # as Postfix would on its own, sooner: postqueue -f
            before = postfix.log().count("status=deferred")
            await asyncio.to_thread(postfix.flush)
            if await wait_for_queue(postfix, before):
                break
    assert set(refused) == {f"nobody@{DOMAIN}"}
    assert refused[f"nobody@{DOMAIN}"][0] == 550  # at SMTP time: no bounce to send later
    assert sorted(r.json()["key"] for r in requests) == ["pf1", "pf2"]
    assert all(r.json()["matched_header"] == "Delivered-To" for r in requests)
    (entry,) = deferred
    assert entry["queue_name"] == "deferred"
    (recipient,) = entry["recipients"]
    assert recipient["address"] == f"incoming+pf3@{DOMAIN}"
    assert "451 4.3.0" in recipient["delay_reason"]
    assert await asyncio.to_thread(postfix.queue) == []
    assert len(tried) == 1 and webhook.delivered()[-1] in tried  # the same webhook-id
    assert "status=sent (250 2.0.0 msg_" in postfix.log()


async def queue_empty(postfix: Postfix) -> bool:
    return await asyncio.to_thread(postfix.queue) == []


async def wait_for_deferral(postfix: Postfix) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def deferred() -> bool:
        found[:] = await asyncio.to_thread(postfix.queue)
        return any(
            e["queue_name"] == "deferred" and e["recipients"][0].get("delay_reason") for e in found
        )

    await wait_until(deferred, timeout=60, what="the message deferred in Postfix's queue")
    return found


async def wait_for_queue(postfix: Postfix, before: int) -> bool:
    """After a flush: True once the queue is empty, False when the message was deferred again
    (``before``: the deferrals logged until the flush; the webhook's circuit had not let a
    probe through yet)."""
    for _ in range(600):
        if not await asyncio.to_thread(postfix.queue):
            return True
        if postfix.log().count("status=deferred") > before:
            return False
        await asyncio.sleep(0.1)
    return False
