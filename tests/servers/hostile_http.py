"""A hostile HTTP server: a webhook receiver, a Graph endpoint or a token endpoint that
misbehaves by mode (issue 18).

Modes, each the answer to every request (a Graph ``$value`` gets a small message, and PATCH,
DELETE and move ``{}``, so a poll can go on to settle what it listed):

- ``status_garbage``: a status line that is no HTTP;
- ``long_header``: a header line of 16 KiB;
- ``bad_chunk``: ``Transfer-Encoding: chunked`` with a chunk size that is no number;
- ``huge_json``: 200, a JSON listing without end (no Content-Length);
- ``huge_error``: 500, a body without end;
- ``huge_length``: 200, ``Content-Length`` of 2 GB, then bytes without end;
- ``deep_json``: 200, ``{"value":`` and 200,000 ``[``;
- ``value_null``: 200, a listing of ``null``, ``7``, ``{"id": 5}``, an id of 5,000 digits and
  one good message;
- ``value_string``: 200, ``{"value": "abc"}``;
- ``dot_ids``: 200, messages with the ids ``..`` and ``.``;
- ``huge_reject``: 422, a ``{"reject": ...}`` body without end (a webhook's answer).

Every stream is bounded: at most ``--max-bytes`` and ``--max-seconds`` per connection. With
``--cert`` and ``--key`` it serves TLS (Graph and token endpoints must be https; ``HostileHttp``
hands it the test CA's certificate for 127.0.0.1). Each request's method and path are printed
(``REQUEST GET /v1.0/...``) after the ``PORT <n>`` line; ``HostileHttp`` collects them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.servers.process import ServerProcess
from tests.servers.tls import write_server_cert

MODES = (
    "status_garbage",
    "long_header",
    "bad_chunk",
    "huge_json",
    "huge_error",
    "huge_length",
    "deep_json",
    "value_null",
    "value_string",
    "dot_ids",
    "huge_reject",
)
MAX_BYTES = 256 * 1024 * 1024
MAX_SECONDS = 20.0
CHUNK = 64 * 1024
MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: incoming+hostile@example.com\r\n"
    b"Subject: listed by a hostile Graph\r\nMessage-ID: <hostile-graph@example.org>\r\n\r\nHi.\r\n"
)


def _head(status: str, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers, "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


def _json(document: object) -> bytes:
    body = json.dumps(document).encode()
    return _head("200 OK", "Content-Type: application/json", f"Content-Length: {len(body)}") + body


def answer(mode: str, method: str, path: str) -> Iterator[bytes]:
    """The bytes of the answer to one request, in chunks, without end where ``mode`` has
    none."""
    if path.endswith("/$value"):
        yield _head("200 OK", "Content-Type: message/rfc822", f"Content-Length: {len(MESSAGE)}")
        yield MESSAGE
        return
    if method != "GET" and mode in ("dot_ids", "value_null"):
        yield _json({})  # settling what was listed
        return
    if mode == "status_garbage":
        yield b"HELLO THERE, THIS IS NO HTTP\r\n\r\n"
    elif mode == "long_header":
        yield _head("500 Oops", "X-Long: " + "a" * 16384, "Content-Length: 0")
    elif mode == "bad_chunk":
        yield _head("500 Oops", "Transfer-Encoding: chunked") + b"ZZZ\r\nabc\r\n"
    elif mode == "huge_json":
        yield _head("200 OK", "Content-Type: application/json") + b'{"value": ['
        yield from itertools.repeat(b'{"id": "AAMkAGI2TG93AAA="}, ' * (CHUNK // 27))
    elif mode in ("huge_error", "huge_length", "huge_reject"):
        status, length = {
            "huge_error": ("500 Oops", []),
            "huge_length": ("200 OK", ["Content-Length: 2000000000"]),
            "huge_reject": ("422 Unprocessable", []),
        }[mode]
        head = _head(status, "Content-Type: application/json", *length)
        yield head + (b'{"reject": "' if mode == "huge_reject" else b"")
        yield from itertools.repeat(b"x" * CHUNK)
    elif mode == "deep_json":
        yield _head("200 OK", "Content-Type: application/json") + b'{"value": ' + b"[" * 200_000
    elif mode == "value_null":
        yield _json({"value": [None, 7, {"id": 5}, {"id": "9" * 5000}, {"id": "AAM1"}]})
    elif mode == "value_string":
        yield _json({"value": "abc"})
    elif mode == "dot_ids":
        yield _json({"value": [{"id": ".."}, {"id": "."}]})
    else:
        raise ValueError(f"no such mode: {mode}")


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str] | None:
    """The method and path of the next request (its body read and dropped), or None."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")  # the StreamReader's limit bounds it
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = [*lines[0].split(" "), "", ""][:3]
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            with contextlib.suppress(asyncio.IncompleteReadError):
                await reader.readexactly(min(int(value), 64 * 1024 * 1024))
    return method, path


async def serve(
    mode: str, port: int, *, cert: str | None, key: str | None, max_bytes: int, max_seconds: float
) -> None:
    context = None
    if cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            request = await _read_request(reader)
            if request is not None:
                method, path = request
                print(f"REQUEST {method} {path}", flush=True)
                sent, deadline = 0, time.monotonic() + max_seconds
                for chunk in answer(mode, method, path):
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
                    if sent > max_bytes or time.monotonic() > deadline:
                        break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=context, limit=64 * 1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


class HostileHttp(ServerProcess):
    """``python -m tests.servers.hostile_http`` as a process of its own; ``requests`` lists
    the ``(method, path)`` of what it was asked."""

    def __init__(
        self,
        mode: str,
        *,
        tls: bool = False,
        max_bytes: int = MAX_BYTES,
        max_seconds: float = MAX_SECONDS,
    ) -> None:
        assert mode in MODES, mode
        self.mode = mode
        self.tls = tls
        self._dir = tempfile.TemporaryDirectory(prefix="hostile-http-")
        args = ["--mode", mode, "--max-bytes", str(max_bytes), "--max-seconds", str(max_seconds)]
        if tls:  # the test CA is this process's: its certificate goes to the server
            files = write_server_cert(Path(self._dir.name))
            args += ["--cert", str(files.cert), "--key", str(files.key)]
        super().__init__("tests.servers.hostile_http", args)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        found = [line.removeprefix("REQUEST ").partition(" ") for line in self.lines]
        return [(method, path) for method, _, path in found]

    def stop(self) -> None:
        super().stop()
        self._dir.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS)
    args = parser.parse_args()
    coroutine = serve(
        args.mode,
        args.port,
        cert=args.cert,
        key=args.key,
        max_bytes=args.max_bytes,
        max_seconds=args.max_seconds,
    )
    asyncio.run(coroutine)


if __name__ == "__main__":
    main()
