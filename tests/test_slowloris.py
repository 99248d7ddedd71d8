"""Issue 18, item 5: a slow client on the health port cannot stop the mail.

mailroom runs as a process under ``prlimit --nofile=256:256`` (it cannot raise that limit) while
1,000 connections drip a header byte every second into its health port: every message is
delivered, ``/healthz`` still answers, and nothing says "Too many open files".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.helpers import ROOT, config_dict, mailbox_dict, message, wait_until
from tests.servers.dovecot import Account, Dovecot, free_port
from tests.servers.webhook import WebhookReceiver

pytestmark = pytest.mark.slow  # real processes and servers, seconds each

NOFILE = 256
SLOW_CLIENTS = 1000
MESSAGES = 12


class SlowClients:
    """``count`` connections, each sending a request line and then one header byte a second,
    never finishing; a connection the server closes is opened again."""

    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.opened = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def _one(self) -> None:
        for _ in range(10_000):  # reconnects, bounded
            writer = None
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                self.opened += 1
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                for _ in range(3600):
                    await asyncio.sleep(1.0)
                    writer.write(b"a")
                    await writer.drain()
            except OSError:
                await asyncio.sleep(0.2)
            finally:
                if writer is not None:
                    writer.close()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._one()) for _ in range(self.count)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is missing")
async def test_slow_clients_on_the_health_port_stop_no_mail(
    dovecot: Dovecot, account: Account, webhook: WebhookReceiver, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = SLOW_CLIENTS + 256
    if soft < wanted:  # this test process holds the slow clients' sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    port = free_port()
    config = config_dict([mailbox_dict(dovecot, account)], webhook.url)
    config["health"] = {"listen": f"127.0.0.1:{port}"}
    config["log"] = {"format": "text", "level": "info"}
    path = tmp_path / "mailroom.yml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "mailroom.log"
    command = ["prlimit", f"--nofile={NOFILE}:{NOFILE}", sys.executable, "-m", "mailroom"]
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command,
            "-c",
            str(path),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    slow = SlowClients(port, SLOW_CLIENTS)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def healthz() -> bool:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                        return response.status == 200
                return False

            await wait_until(healthz, timeout=30, what="mailroom listening")
            slow.start()
            await wait_until(lambda: slow.opened >= SLOW_CLIENTS, timeout=60, what="1,000 open")
            for n in range(MESSAGES):
                await dovecot.aappend(account, message(n))
            await webhook.wait_for(MESSAGES, timeout=60)
            await wait_until(healthz, timeout=30, what="/healthz answering under the flood")
    finally:
        await slow.stop()
        process.terminate()
        async with asyncio.timeout(30):
            await process.wait()
    output = log.read_text(errors="replace")
    assert process.returncode == 0, output
    assert f"open files: up to {NOFILE} (hard limit {NOFILE})" in output
    assert "Too many open files" not in output
    assert len({r.headers["webhook-id"] for r in webhook.requests}) == MESSAGES
