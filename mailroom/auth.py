"""OAuth 2.0 client-credentials tokens from Microsoft Entra ID: the only module importing msal.

One ``TokenProvider`` per app registration and scope (``TokenProviders`` shares it among every
mailbox that uses them): ``<graph_endpoint>/.default`` for Microsoft Graph,
``https://outlook.office365.com/.default`` for IMAP XOAUTH2 (Microsoft, "Authenticate an IMAP,
POP or SMTP connection using OAuth", client credentials grant flow).

msal is synchronous and its ``ConfidentialClientApplication`` constructor already does network
I/O (OpenID configuration discovery), so both the constructor and ``acquire_token_for_client``
run under a timeout on a small thread pool of their own: a token request never queues behind
the DNS lookups of a thousand connects in asyncio's default executor. Its HTTPS session trusts
what every mailroom client trusts (``mailroom.tls``). A token is kept and reused until five minutes
before it expires (the margin msal itself uses), or half its lifetime when that is shorter; a
``401`` from the resource (or an IMAP ``AccessTokenExpired``) calls ``invalidate()``.

msal returns an ``error`` dict instead of raising (RFC 6749 §5.2); it becomes a ``TokenError``
carrying Entra's ``error`` code and ``error_description``. Secrets and tokens are never logged
and never part of an exception.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, overload

import msal
import requests
import requests.adapters

from mailroom.config import GoogleOAuthConfig, ImapOAuthConfig, OAuthConfig
from mailroom.errors import TokenError
from mailroom.proxies import proxy_for
from mailroom.tls import client_context

__all__ = ["TokenProvider", "TokenProviders", "Tokens", "token_provider"]

log = logging.getLogger("mailroom.auth")

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


class _Session(requests.Session):
    """The HTTP client handed to msal and google-auth: trust decided by ``mailroom.tls``, like
    every client.

    ``trust_env = False``: requests would otherwise let ``CURL_CA_BUNDLE`` replace the trust
    (and read .netrc credentials); the proxy comes from ``mailroom.proxies`` (the config's
    ``proxy``, else ``HTTPS_PROXY``/``NO_PROXY``), and ``mailroom.tls`` honours ``SSL_CERT_FILE``,
    ``SSL_CERT_DIR`` and ``REQUESTS_CA_BUNDLE`` on top of the system store. msal applies its
    own ``timeout=`` only to the session it builds itself, so this one sets a default timeout
    on every request.
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
        return super().request(method, url, *args, **kwargs)


class _CachedToken:
    """What every token provider shares (Entra ID's here, Google's in ``google_auth``): one
    token kept until ``REFRESH_MARGIN_S`` before it expires (or half its lifetime when that
    is shorter), one acquisition at a time, its synchronous library called on the token
    thread pool under a timeout, and the HTTP session to close. A subclass implements
    ``_acquire``."""

    def __init__(self, *, label: str, scope: str, timeout_s: float) -> None:
        self.label = label  # the mailbox id, first in every log line
        self.scope = scope
        self._timeout_s = timeout_s
        self._session: _Session | None = None
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


class TokenProvider(_CachedToken):
    """Client-credentials access tokens for one app registration and one scope."""

    def __init__(
        self,
        config: OAuthConfig,
        *,
        label: str,
        scope: str | None = None,
        timeout_s: float = ACQUIRE_TIMEOUT_S,
    ) -> None:
        super().__init__(label=label, scope=scope or config.scope, timeout_s=timeout_s)
        self._config = config
        self._app: Any = None  # msal.ConfidentialClientApplication, built on first use
        self._stale = False  # invalidated: msal's own cache must be bypassed too

    def __repr__(self) -> str:
        return f"TokenProvider({self.label!r}, scope={self.scope!r})"

    def invalidate(self) -> None:
        super().invalidate()
        self._stale = True

    async def _acquire(self) -> str:
        config = self._config
        if self._app is None:
            self._app = await self._in_thread("building the msal client", self._build)
        started = time.monotonic()
        result: dict[str, Any] = await self._in_thread("requesting a token", self._request)
        if "access_token" not in result:
            code = str(result.get("error") or "unknown_error")
            description = str(result.get("error_description") or "").split("\r\n")[0]
            raise TokenError(
                f"token request to {config.authority} refused: {code}: {description or '-'}"
                f"{_hint(code)}",
                code=code,
                description=description,
            )
        lifetime = float(result.get("expires_in") or 0)
        token = self._keep(str(result["access_token"]), lifetime, started)
        self._stale = False
        if result.get("token_source") != "cache":
            self.acquisitions += 1
            log.info(
                "%s: new access token for %s (valid %.0fs, client %s)",
                self.label,
                self.scope,
                lifetime,
                config.client_id,
                extra={"mailbox": self.label},
            )
        return token

    def _build(self) -> Any:
        config = self._config
        self.close()
        self._session = _Session(config, HTTP_TIMEOUT_S)
        return msal.ConfidentialClientApplication(
            config.client_id,
            client_credential=_credential(config),
            authority=config.authority,
            http_client=self._session,
            # Instance discovery asks login.microsoftonline.com whether an unfamiliar authority
            # host is an Entra instance. The public and national clouds are known to msal
            # without it, and a private or test authority must not depend on it: off.
            instance_discovery=False,
        )

    def _request(self) -> dict[str, Any]:
        if self._stale:
            # acquire_token_for_client() serves from msal's cache and refuses force_refresh;
            # removing the app's tokens is msal's documented way to get a fresh one.
            self._app.remove_tokens_for_client()
        result: dict[str, Any] = self._app.acquire_token_for_client(scopes=[self.scope])
        return result

    async def _in_thread(self, what: str, func: Any) -> Any:
        config = self._config
        try:
            return await self._in_pool(func)
        except TimeoutError as exc:
            raise TokenError(
                f"{what}: no answer from {config.authority} within {self._timeout_s:g}s"
            ) from exc
        except requests.exceptions.SSLError as exc:
            raise TokenError(
                f"{what}: TLS certificate of {config.azure_ad_endpoint} not trusted; "
                "set ca_file to the CA that signed it"
            ) from exc
        except requests.RequestException as exc:
            raise TokenError(f"{what}: {type(exc).__name__} talking to {config.authority}") from exc
        except ValueError as exc:
            # msal: an authority it cannot use (unknown tenant, no OpenID configuration).
            raise TokenError(f"{what}: {config.authority}: {_first_line(exc)}") from exc


def _credential(config: OAuthConfig) -> str | dict[str, str]:
    """msal's ``client_credential``: the secret, or a certificate's key and SHA-1 thumbprint
    (msal signs a client assertion with them, ``private_key_jwt``, RFC 7523 §2.2)."""
    if config.client_certificate is not None:
        certificate = config.client_certificate
        return {
            "private_key": certificate.private_key.reveal(),
            "thumbprint": certificate.thumbprint,
        }
    assert config.client_secret is not None  # one of the two, checked at load
    return config.client_secret.reveal()


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _hint(code: str) -> str:
    # Entra's codes (RFC 6749 §5.2 plus AADSTS numbers in the description).
    return {
        "invalid_client": (
            "; check client_id and client_secret or the certificate (secrets and certificates "
            "expire in Entra; the certificate must be uploaded to this app registration)"
        ),
        "unauthorized_client": "; is the app registered in this tenant?",
        "invalid_scope": "; check graph_endpoint / scope (it must end in /.default)",
        "invalid_request": "; check tenant_id",
    }.get(code, "")


class Tokens(Protocol):
    """What a source needs of a token provider (Entra ID's ``TokenProvider`` or Google's)."""

    label: str
    scope: str
    acquisitions: int

    async def token(self) -> str: ...

    def invalidate(self) -> None: ...

    def close(self) -> None: ...


@overload
def token_provider(config: OAuthConfig, *, label: str) -> TokenProvider: ...
@overload
def token_provider(config: ImapOAuthConfig, *, label: str) -> Tokens: ...
def token_provider(config: ImapOAuthConfig, *, label: str) -> Tokens:
    """A new provider for ``config``: Entra ID through msal, or Google through google-auth."""
    if isinstance(config, GoogleOAuthConfig):
        # Imported here: google_auth builds on this module (its session and thread pool), and
        # google-auth is loaded only when a config names Google.
        from mailroom.google_auth import GoogleTokenProvider  # noqa: PLC0415

        return GoogleTokenProvider(config, label=label)
    return TokenProvider(config, label=label)


class TokenProviders:
    """The token providers of one process: one per app registration (authority, client id and
    credential) and scope, or per Google credential and the user it acts as, shared by every
    mailbox that names them."""

    def __init__(self) -> None:
        self._providers: dict[tuple[ImapOAuthConfig, str], Tokens] = {}

    @overload
    def get(self, config: OAuthConfig, *, label: str) -> TokenProvider: ...
    @overload
    def get(self, config: ImapOAuthConfig, *, label: str) -> Tokens: ...
    def get(self, config: ImapOAuthConfig, *, label: str) -> Tokens:
        """The provider for ``config`` (made on first use; ``label`` names it in logs)."""
        key = (config, config.scope)
        provider = self._providers.get(key)
        if provider is None:
            provider = self._providers[key] = token_provider(config, label=label)
        return provider

    def retain(self, configs: Iterable[ImapOAuthConfig]) -> None:
        """Close and forget the providers no longer named by ``configs`` (after a reload)."""
        keep = {(config, config.scope) for config in configs}
        for key in [key for key in self._providers if key not in keep]:
            self._providers.pop(key).close()

    def close(self) -> None:
        self.retain(())
