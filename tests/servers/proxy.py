"""An HTTP proxy on 127.0.0.1 for the proxy tests: CONNECT tunnels (https) and absolute-form
requests (http), each recorded, as a company proxy would see them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, Self
from urllib.parse import urlsplit

__all__ = ["HttpProxy", "TcpRelay", "TcpServer", "pump"]


class TcpServer:
    """A TCP server on a free 127.0.0.1 port, its connections' tasks cancelled at exit."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class HttpProxy(TcpServer):
    """``seen`` records ``CONNECT host:port`` or ``GET http://...`` per request line."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def targets(self) -> list[str]:
        """host:port of every request that went through."""
        found = []
        for line in self.seen:
            method, target = line.split(" ", 2)[:2]
            if method == "CONNECT":
                found.append(target)
            else:
                parts = urlsplit(target)
                found.append(f"{parts.hostname}:{parts.port or 80}")
        return found

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        request_line, _, rest = head.decode("latin-1").partition("\r\n")
        self.seen.append(request_line)
        method, target, version = request_line.split(" ", 2)
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        else:  # http: forward in origin form, one request per connection
            parts = urlsplit(target)
            upstream_reader, upstream_writer = await asyncio.open_connection(
                parts.hostname, parts.port or 80
            )
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            headers = "\r\n".join(
                line for line in rest.split("\r\n") if not line.lower().startswith("proxy-")
            )
            upstream_writer.write(f"{method} {path} {version}\r\n{headers}".encode("latin-1"))
        self.spawn(pump(reader, upstream_writer))
        self.spawn(pump(upstream_reader, writer))


class TcpRelay(TcpServer):
    """Relays each connection to ``host:port``; ``sent`` records what the clients sent, to
    look at the wire (an IMAP client's commands on a plain connection), and ``turns`` both
    directions in the order they came: (True: from the client, its bytes), one entry for what
    one side sent before the other answered."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.target = (host, port)
        self.sent = bytearray()
        self.turns: list[tuple[bool, bytearray]] = []

    def _turn(self, client: bool, data: bytes) -> None:
        if not self.turns or self.turns[-1][0] != client:
            self.turns.append((client, bytearray()))
        self.turns[-1][1].extend(data)

    def _from_client(self, data: bytes) -> None:
        self.sent.extend(data)
        self._turn(True, data)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        self.spawn(pump(reader, upstream_writer, self._from_client))
        self.spawn(pump(upstream_reader, writer, lambda data: self._turn(False, data)))


async def pump(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    watch: Callable[[bytes], None] | None = None,
) -> None:
    """Copy ``source`` to ``sink`` until it ends (``watch`` sees every chunk first)."""
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        while data := await source.read(65536):
            if watch is not None:
                watch(data)
            sink.write(data)
            await sink.drain()
    sink.close()
