"""What every OAuth token provider shares: one cached token, one acquisition at a time, the
token thread pool, and the HTTP session handed to the synchronous libraries (msal in
``entra``, google-auth in ``google``), whose trust is ``tls``'s and whose proxy is ``proxies``'.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import requests
import requests.adapters

from mailroom.trust.proxies import proxy_for
from mailroom.trust.tls import client_context
from mailroom.trust.values import ImapOAuthConfig

__all__ = [
    "ACQUIRE_TIMEOUT_S",
    "HTTP_TIMEOUT_S",
    "CachedToken",
    "HttpSession",
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


ANSWER_MAX_BYTES = 1024 * 1024  # a token answer is a few KB, OpenID metadata a few more


class _Adapter(requests.adapters.HTTPAdapter):
    """Hands urllib3 mailroom's TLS context, and nothing of requests' own CA choice."""

    def __init__(self, config: ImapOAuthConfig) -> None:
        self._context = client_context(
            ca_file=config.ca_file, verify=config.tls_verify, private=True
        )
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        # Through a proxy, urllib3 builds another pool manager: the same trust for the tunnel.
        proxy_kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests would point urllib3 at certifi's bundle here; the context decides instead.
        conn.cert_reqs = "CERT_REQUIRED" if verify else "CERT_NONE"


class HttpSession(requests.Session):
    """The HTTP client handed to msal and google-auth: trust decided by ``tls``, like
    every client.

    ``trust_env = False``: requests would otherwise let ``CURL_CA_BUNDLE`` replace the trust
    (and read .netrc credentials); the proxy comes from ``proxies`` (the config's
    ``proxy``, else ``HTTPS_PROXY``/``NO_PROXY``), and ``tls`` honours ``SSL_CERT_FILE``,
    ``SSL_CERT_DIR`` and ``REQUESTS_CA_BUNDLE`` on top of the system store. msal applies its
    own ``timeout=`` only to the session it builds itself, so this one sets a default timeout
    on every request, and reads at most ``ANSWER_MAX_BYTES`` of any answer (requests would
    read an endless one whole): a larger one fails as a ``requests`` error, which the
    providers report as a failed request.
    """

    def __init__(self, config: ImapOAuthConfig, timeout_s: float) -> None:
        super().__init__()
        self.trust_env = False
        self._proxy = config.proxy
        self.verify = config.tls_verify
        self.mount("https://", _Adapter(config))
        self._timeout_s = timeout_s

    def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", self._timeout_s)
        if (proxy := proxy_for(str(url), self._proxy)) is not None:
            kwargs.setdefault("proxies", {"http": proxy, "https": proxy})
        kwargs["stream"] = True  # read here, within the bound
        response = super().request(method, url, *args, **kwargs)
        try:
            body = response.raw.read(ANSWER_MAX_BYTES + 1, decode_content=True)
        finally:
            response.close()
        if len(body) > ANSWER_MAX_BYTES:
            raise requests.exceptions.ContentDecodingError(
                f"the answer is larger than {ANSWER_MAX_BYTES} bytes"
            )
        response._content = body  # what response.content and .json() read (requests' cache)
        return response


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
