"""What every OAuth token provider shares: one cached token, one acquisition at a time, the
token thread pool (the HTTP session handed to the synchronous libraries is ``http``'s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:  # built where a provider first asks for a token (requests, 8 MiB)
    from mailroom.trust.http import HttpSession

__all__ = [
    "ACQUIRE_TIMEOUT_S",
    "HTTP_TIMEOUT_S",
    "CachedToken",
    "Tokens",
]

HTTP_TIMEOUT_S = 15.0  # one request to the identity provider
ACQUIRE_TIMEOUT_S = 45.0  # the whole constructor or acquisition, retries of msal included
REFRESH_MARGIN_S = 300.0  # msal treats a token with less than 5 minutes left as expired
EXECUTOR_THREADS = 4
_executor: ThreadPoolExecutor | None = None
_T = TypeVar("_T")


def _pool() -> ThreadPoolExecutor:
    global _executor  # noqa: PLW0603  (one small pool per process, made on first use)
    if _executor is None:
        _executor = ThreadPoolExecutor(EXECUTOR_THREADS, thread_name_prefix="mailroom-token")
    return _executor


class CachedToken:
    """What every token provider shares (Entra ID's in ``entra``, Google's in ``google``): one
    token kept until ``REFRESH_MARGIN_S`` before it expires (or half its lifetime when that
    is shorter), one acquisition at a time, its synchronous library called on the token
    thread pool under a timeout, and the HTTP session to close. A subclass implements
    ``_acquire``."""

    def __init__(self, *, label: str, scope: str, timeout_s: float) -> None:
        self.label = label  # the mailbox id, first in every log line
        self.scope = scope
        self._timeout_s = timeout_s
        self._session: HttpSession | None = None
        self._token: str | None = None
        self._refresh_at = 0.0  # time.monotonic() after which the token is fetched anew
        self._lock = asyncio.Lock()
        self.acquisitions = 0  # tokens issued by the identity provider to this provider

    async def token(self) -> str:
        """A valid access token: the cached one, or a new one from the identity provider."""
        async with self._lock:
            if self._token is not None and time.monotonic() < self._refresh_at:
                return self._token
            return await self._acquire()

    def close(self) -> None:
        """Close the HTTP connections to the identity provider (the provider stays usable)."""
        if self._session is not None:
            self._session.close()

    def invalidate(self) -> None:
        """Forget the cached token (the resource refused it); the next ``token()`` asks anew."""
        self._token = None

    async def _acquire(self) -> str:
        raise NotImplementedError

    def _keep(self, token: str, lifetime_s: float, started: float) -> str:
        """Cache ``token``, valid ``lifetime_s`` from ``started`` (``time.monotonic()``)."""
        self._token = token
        self._refresh_at = started + max(lifetime_s - REFRESH_MARGIN_S, lifetime_s / 2)
        return token

    async def _in_pool(self, func: Callable[[], _T]) -> _T:
        """``func()`` on the token thread pool; ``TimeoutError`` after ``timeout_s``. The
        worker thread cannot be cancelled: it finishes on its own (``HTTP_TIMEOUT_S``)."""
        async with asyncio.timeout(self._timeout_s):
            return await asyncio.get_running_loop().run_in_executor(_pool(), func)


class Tokens(Protocol):
    """What a source needs of a token provider (Entra ID's ``TokenProvider`` or Google's)."""

    label: str
    scope: str
    acquisitions: int

    async def token(self) -> str: ...

    def invalidate(self) -> None: ...

    def close(self) -> None: ...
