"""Running mailroom against the test servers: in-process, or as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailroom.config import Config, parse_config
from mailroom.kinds import KINDS
from mailroom.runtime import supervisor
from tests.servers.imap import Account, ImapServer

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ROOT = Path(__file__).resolve().parent.parent


def mailbox_dict(server: ImapServer, account: Account, **overrides: Any) -> dict[str, Any]:
    """One mailbox on ``server`` (Dovecot, Cyrus, Courier) over implicit TLS, trusting the
    test CA."""
    box: dict[str, Any] = {
        "id": account.user,
        "address": "incoming+%{key}@example.com",
        "host": server.host,
        "port": server.tls_port,
        "ssl": True,
        "ca_file": str(server.ca_file),
        "user": account.user,
        "password": account.password,
        "idle_timeout": 60,
        "delete_after_delivery": False,
    }
    box.update(overrides)
    return box


def config_dict(
    mailboxes: list[dict[str, Any]],
    webhook_url: str,
    *,
    reject_notices: dict[str, Any] | None = None,
    **webhook: Any,
) -> dict[str, Any]:
    hook: dict[str, Any] = {
        "url": webhook_url,
        "signing_secret": WHSEC,
        "retry": {"initial": 0.05, "max": 0.2},
        "timeout": 5,
    }
    hook.update(webhook)
    config = {"mailboxes": mailboxes, "webhook": hook, "shutdown_timeout": 5}
    if reject_notices is not None:
        config["reject_notices"] = reject_notices
    return config


def make_config(
    server: ImapServer,
    account: Account,
    webhook_url: str,
    *,
    webhook: dict[str, Any] | None = None,
    reject_notices: dict[str, Any] | None = None,
    **mailbox: Any,
) -> Config:
    return parse_config(
        config_dict(
            [mailbox_dict(server, account, **mailbox)],
            webhook_url,
            reject_notices=reject_notices,
            **(webhook or {}),
        ),
        env={},
    )


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[asyncio.Event]:
    """Run mailroom in this event loop; stop it (gracefully, bounded) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(supervisor.run(config, stop, kinds=KINDS), name="mailroom")
    try:
        yield stop
    finally:
        stop.set()
        async with asyncio.timeout(config.shutdown_timeout_s + 15):
            assert await task == 0


def message(n: int, *, to: str = "incoming+key{n}@example.com", size: int = 0) -> bytes:
    """A small, distinct test message; ``size`` pads the body to about that many bytes."""
    body = f"Message number {n}.\r\n"
    if size > len(body):
        line = "x" * 76 + "\r\n"
        body += line * ((size - len(body)) // len(line))
    return (
        f"From: Sender {n} <sender{n}@example.org>\r\n"
        f"To: {to.format(n=n)}\r\n"
        f"Subject: test {n}\r\n"
        f"Message-ID: <m{n}.{time.time_ns()}@example.org>\r\n"
        f"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n" + body
    ).encode()


async def wait_until(
    check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 15.0, what: str = "condition"
) -> None:
    """Poll the real server state until ``check`` (a coroutine function or a plain one) holds;
    bounded in time and count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        held = check()
        if await held if inspect.isawaitable(held) else held:
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    """The captured log messages that contain ``text``, in order."""
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


class Process:
    """``python -m mailroom -c FILE`` as a real process (for SIGKILL and SIGTERM tests)."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.path = workdir / "mailroom.yml"
        self.path.write_text(yaml.safe_dump(config))
        self.log = workdir / "mailroom.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailroom", "-c", str(self.path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")
