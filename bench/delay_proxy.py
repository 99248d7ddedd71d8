"""A TCP proxy on loopback that adds a round trip: a WAN between mailroom and its IMAP server.

``DelayProxy(target_host, target_port, rtt_ms)`` runs ``python -m bench.delay_proxy`` as a
process of its own (its CPU is not the bench's, nor mailroom's) listening on a free
127.0.0.1 port; each connection is relayed to the target with every chunk held ``rtt_ms / 2``
in each direction, in order. Bandwidth is not limited and nothing is buffered beyond what is
in transit: what it shows is what each round trip costs a client, as a cloud mailbox across a
real network does (issue 23: MailRoom pipelines nothing either, but its Ruby drained a backlog
at a 50 ms round trip faster than mailroom's one round trip per FETCH window).

With ``DELAY_PROXY_TRACE=FILE`` in its environment it writes a line for each chunk as it comes
in: the seconds since the first, the direction (``>`` client to server), its length, and the
IMAP command lines (``>``) or tagged responses (``<``) in it: where a client's round trips go.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_COMMAND = re.compile(rb"(?m)^([A-Za-z]*\d+ [A-Za-z]+(?: [A-Za-z0-9]+)?|DONE)")
_TAGGED = re.compile(rb"(?m)^([A-Za-z]*\d+ (?:OK|NO|BAD))")


class _Trace:
    """``DELAY_PROXY_TRACE``'s lines (the module docstring)."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "w", buffering=1)  # noqa: SIM115 (open while the proxy runs)
        self._start: float | None = None

    def chunk(self, upstream: bool, data: bytes) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        found = (_COMMAND if upstream else _TAGGED).findall(data)
        names = " | ".join(f.decode("ascii", "replace") for f in found[:8])
        more = f" (+{len(found) - 8})" if len(found) > 8 else ""
        direction = ">" if upstream else "<"
        self._file.write(f"{now - self._start:9.4f} {direction} {len(data):7d} {names}{more}\n")


_trace = _Trace(path) if (path := os.environ.get("DELAY_PROXY_TRACE")) else None


class _Leg(asyncio.Protocol):
    """One side of a relayed connection: what it receives goes to ``peer`` after ``delay_s``."""

    def __init__(self, delay_s: float, *, upstream: bool = True) -> None:
        self.delay_s = delay_s
        self.upstream = upstream  # receives from the client
        self.peer: _Leg | None = None
        self.transport: asyncio.Transport | None = None
        self._due: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._early: list[bytes] = []  # received before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if _trace is not None:
            _trace.chunk(self.upstream, data)
        self._later(data)

    def eof_received(self) -> bool:
        self._later(None)  # the peer's write side is closed in turn, in order
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is None and not self._due:
            self._later(None)

    def _later(self, data: bytes | None) -> None:
        loop = asyncio.get_running_loop()
        self._due.append((loop.time() + self.delay_s, data))
        if self._timer is None:
            self._timer = loop.call_at(self._due[0][0], self._flush)

    def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = None
        now = loop.time()
        while self._due and self._due[0][0] <= now:
            _, data = self._due.popleft()
            peer = self.peer.transport if self.peer is not None else None
            if peer is None or peer.is_closing():
                continue
            if data is not None:
                peer.write(data)
                continue
            try:
                peer.write_eof()  # half-closed, as the sender left it
            except OSError:  # the other side is gone already
                peer.close()
        if self._due:
            self._timer = loop.call_at(self._due[0][0], self._flush)


async def serve(port: int, target: tuple[str, int], rtt_ms: float) -> None:
    loop = asyncio.get_running_loop()
    delay_s = rtt_ms / 2000

    async def relay(client: _Leg) -> None:
        try:
            _, upstream = await loop.create_connection(
                lambda: _Leg(delay_s, upstream=False), *target
            )
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        client.peer, upstream.peer = upstream, client

    tasks: set[asyncio.Task[None]] = set()

    def accepted() -> _Leg:
        client = _Leg(delay_s)
        task = loop.create_task(relay(client))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return client

    server = await loop.create_server(accepted, "127.0.0.1", port)
    async with server:
        await asyncio.to_thread(sys.stdin.read)  # until the bench closes stdin


class DelayProxy:
    """The proxy process; ``port`` is where to connect instead of the target."""

    def __init__(self, host: str, port: int, rtt_ms: float) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.delay_proxy",
                str(self.port),
                host,
                str(port),
                "--rtt-ms",
                str(rtt_ms),
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # bounded: wait for the port
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            time.sleep(0.05)
        self.close()
        raise RuntimeError("the delay proxy did not start")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("port", type=int)
    parser.add_argument("host")
    parser.add_argument("target_port", type=int)
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, (args.host, args.target_port), args.rtt_ms))


if __name__ == "__main__":
    main()
