"""A controllable webhook receiver (aiohttp) for the tests; also a standalone benchmark sink.

Standalone: `python -m tests.servers.webhook --port N [--count K]` prints one line per request
(arrival time), or with --count one JSON line of timings after K requests, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NoReturn

from aiohttp import web
from multidict import CIMultiDict

from tests.servers.http import serve

MAX_BODY_BYTES = 64 * 1024 * 1024  # aiohttp's default (1 MiB) would refuse large messages


@dataclass
class Received:
    """One request as the receiver saw it (`at` is time.monotonic() on arrival; `status` the
    answer it got, None while unanswered or when dropped)."""

    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes
    at: float
    status: int | None = None

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


@dataclass
class _Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class WebhookReceiver:
    """An aiohttp server on 127.0.0.1 that records every request and answers as told.

    Per request, in this order: `drop_next` (close the connection, no answer), `stall` (wait
    for `release()`), `fail_next` (the failure status), `respond_for` (by the message's key),
    else the default from `respond` (initially 200 with `{}`). Every request is recorded on
    arrival, before any waiting. `stop()` / `start()` bring the server down and up again on the
    same port.
    """

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.requests: list[Received] = []
        self._default = _Answer(200, b"{}", {"Content-Type": "application/json"})
        self._failures: list[_Answer] = []
        self._by_key: dict[str, _Answer] = {}
        self._drops = 0
        self._released = asyncio.Event()
        self._released.set()
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL; any path is accepted."""
        return f"http://127.0.0.1:{self.port}/"

    # -- controls ---------------------------------------------------------------------------

    def respond(
        self, status: int, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        """Set the default answer."""
        self._default = _Answer(status, body, dict(headers or {}))

    def respond_for(
        self, key: str, status: int, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        """Answer the requests for ``key`` (their ``X-Mailroom-Key``) with ``status``, unless a
        failure or a drop comes first."""
        self._by_key[key] = _Answer(status, body, dict(headers or {}))

    def fail_next(
        self, n: int, status: int = 503, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> None:
        """Answer the next `n` requests with `status`, then the default again."""
        self._failures = [_Answer(status, body, dict(headers or {})) for _ in range(n)]

    def drop_next(self, n: int) -> None:
        """Close the connection without any answer for the next `n` requests."""
        self._drops = n

    def stall(self) -> None:
        """Hold requests (already recorded) until `release()`."""
        self._released.clear()

    def release(self) -> None:
        """Let stalled and future requests through."""
        self._released.set()

    def delivered(self) -> list[str]:
        """The webhook-ids of the requests answered 2xx, in order of arrival."""
        return [
            r.headers["webhook-id"]
            for r in self.requests
            if r.status is not None and 200 <= r.status < 300
        ]

    async def wait_for(
        self,
        count: int,
        timeout: float | None = 10.0,
    ) -> list[Received]:
        """Wait until at least `count` requests arrived; return all of them."""
        async with self._arrived:
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait_for(lambda: len(self.requests) >= count)
            except TimeoutError:
                raise AssertionError(
                    f"webhook: expected {count} request(s) within {timeout} s, "
                    f"got {len(self.requests)}"
                ) from None
        return list(self.requests)

    # -- server -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        received = Received(
            request.method, request.path_qs, CIMultiDict(request.headers), body, time.monotonic()
        )
        async with self._arrived:
            self.requests.append(received)
            self._arrived.notify_all()
        if self._drops > 0:
            self._drops -= 1
            _drop(request)
        await self._released.wait()
        if self._runner is None:  # stopped while stalled: the server is gone, no answer
            _drop(request)
        answer = self._by_key.get(received.headers.get("X-Mailroom-Key", ""), self._default)
        if self._failures:
            answer = self._failures.pop(0)
        received.status = answer.status
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)

    async def start(self) -> None:
        """Start serving (on the same port as before after a `stop()`)."""
        if self._runner is not None:
            return
        self._runner, self.port = await serve(
            self._handle, port=self.port, client_max_size=MAX_BODY_BYTES
        )

    async def stop(self) -> None:
        """Stop serving and close all connections; stalled requests get no answer."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self.release()
            await runner.cleanup()

    async def __aenter__(self) -> WebhookReceiver:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _drop(request: web.Request) -> NoReturn:
    """Abort the connection: the client sees a connection error, never an HTTP response."""
    if request.transport is not None:
        request.transport.abort()
    raise asyncio.CancelledError  # aiohttp treats this as "connection gone"


async def _main(port: int, count: int | None) -> None:
    async with WebhookReceiver(port) as receiver:
        if count is not None:
            got = await receiver.wait_for(count, timeout=None)
            times = [r.at for r in got[:count]]
            print(
                json.dumps(
                    {
                        "count": count,
                        "first": times[0],
                        "last": times[-1],
                        "elapsed": times[-1] - times[0],
                        "arrivals": times,
                    }
                ),
                flush=True,
            )
            return
        while True:
            for r in await receiver.wait_for(1, timeout=None):
                print(f"{r.at:.6f} {r.method} {r.path} {len(r.body)}", flush=True)
            receiver.requests.clear()  # keep memory flat in long runs


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=None)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.port, args.count))


if __name__ == "__main__":
    main()
