"""The HTTP session handed to the synchronous token libraries (msal in ``entra``, google-auth in
``google``), whose trust is ``tls``'s and whose proxy is ``proxies'``: the one module of mailroom
that imports requests (with urllib3, 8 MiB), imported where a token provider first builds its
session, never at the start of a config without OAuth (issue 23)."""

from __future__ import annotations

from typing import Any

import requests
import requests.adapters

from mailroom.trust.proxies import proxy_for
from mailroom.trust.tls import client_context
from mailroom.trust.values import ImapOAuthConfig

__all__ = ["ANSWER_MAX_BYTES", "HttpSession"]

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
