"""The webhook receiver of bench/many_mailboxes.py, in a process of its own.

``python bench/receiver.py PORT`` answers every POST with the status it is told (JSON lines on
its stdin, one JSON answer a line on its stdout) and counts its 2xx answers per ``webhook-id``,
with the time of the first (``time.monotonic()``: system-wide on Linux, comparable with the
bench's). ``Receiver`` starts it and talks to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
MAX_BODY_BYTES = 256 * 1024 * 1024


class _Counts:
    """The receiver's state: the status it answers, and what it answered."""

    def __init__(self) -> None:
        self.status = 200
        self.requests = 0
        self.refused = 0
        self.delivered: dict[str, int] = {}  # webhook-id → 2xx answers
        self.arrived: dict[str, float] = {}  # webhook-id → first 2xx, time.monotonic()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        at = time.monotonic()
        self.requests += 1
        if 200 <= self.status < 300:
            key = request.headers.get("webhook-id", "")
            self.delivered[key] = self.delivered.get(key, 0) + 1
            self.arrived.setdefault(key, at)
        else:
            self.refused += 1
        return web.Response(status=self.status)

    def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if "status" in cmd:
            self.status = int(cmd["status"])
        if "times" in cmd:
            return {"times": [self.arrived.get(key) for key in cmd["times"]]}
        if cmd.get("reset"):
            self.requests = self.refused = 0
            self.delivered.clear()
            self.arrived.clear()
        if cmd.get("span"):
            arrived = self.arrived.values()
            return {"first": min(arrived, default=None), "last": max(arrived, default=None)}
        return {
            "requests": self.requests,
            "refused": self.refused,
            "delivered": len(self.delivered),
            "answered_2xx": sum(self.delivered.values()),
        }


async def _serve(port: int) -> None:
    counts = _Counts()
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_route("POST", "/{tail:.*}", counts.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    while line := await asyncio.to_thread(sys.stdin.readline):  # until stdin closes
        print(json.dumps(counts.command(json.loads(line))), flush=True)
    await runner.cleanup()


class Receiver:
    """The receiver process and its command channel (``ask``)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(port)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # bounded: wait for the port
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.proc.kill()
        raise RuntimeError("the receiver did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def ask(self, **cmd: Any) -> dict[str, Any]:
        """Set ``status=``; ask for ``times=[webhook-ids]``, or ``span=True`` (the first and
        the last first 2xx); ``reset=True`` forgets every request; or (anyway) the counts."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the receiver ended")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def times(self, keys: list[str]) -> list[float | None]:
        """The first 2xx of each webhook-id (time.monotonic(), system-wide), or None."""
        times: list[float | None] = self.ask(times=keys)["times"]
        return times

    def wait_delivered(self, total: int, timeout_s: float) -> dict[str, Any]:
        """Until ``total`` distinct webhook-ids got a 2xx (bounded); the counts."""
        deadline = time.monotonic() + timeout_s
        while True:
            counts = self.ask()
            if counts["delivered"] >= total:
                return counts
            if time.monotonic() > deadline:
                raise RuntimeError(f"{counts['delivered']} of {total} delivered in {timeout_s} s")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def main() -> None:
    """The receiver process: ``python bench/receiver.py PORT``."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
