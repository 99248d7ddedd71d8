"""What the HTTPS mocks of identity providers share: an aiohttp app over TLS (the test CA) on a
free 127.0.0.1 port, and a bounded wait for a condition on what they recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Self

from aiohttp import web

from tests.servers import tls
from tests.servers.http import serve


class HttpsMock:
    """``async with Mock() as mock``: every request goes to ``_handle``, which records it and
    calls ``_changed_now`` so that ``wait_for`` re-checks its condition."""

    name = "mock"  # in the message of a wait that timed out

    def __init__(self) -> None:
        self.port = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def _changed_now(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(
        self, check: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition"
    ) -> None:
        """Wait (bounded) until ``check()`` holds; it is re-checked on every request."""
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(check)
            except TimeoutError:
                raise AssertionError(f"{self.name}: timed out after {timeout}s: {what}") from None

    async def __aenter__(self) -> Self:
        self._runner, self.port = await serve(self._handle, ssl_context=tls.server_ssl_context())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
