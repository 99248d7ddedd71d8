"""OAuth 2.0 client-credentials tokens from Microsoft Entra ID: the only module importing msal.

One ``TokenProvider`` per app registration and scope (``providers.TokenProviders`` shares it
among every mailbox that uses them): ``<graph_endpoint>/.default`` for Microsoft Graph,
``https://outlook.office365.com/.default`` for IMAP XOAUTH2 (Microsoft, "Authenticate an IMAP,
POP or SMTP connection using OAuth", client credentials grant flow).

msal is synchronous and its ``ConfidentialClientApplication`` constructor already does network
I/O (OpenID configuration discovery), so both the constructor and ``acquire_token_for_client``
run under a timeout on a small thread pool of their own: a token request never queues behind
the DNS lookups of a thousand connects in asyncio's default executor. Its HTTPS session trusts
what every mailroom client trusts (``tls``). A token is kept and reused until five minutes
before it expires (the margin msal itself uses), or half its lifetime when that is shorter; a
``401`` from the resource (or an IMAP ``AccessTokenExpired``) calls ``invalidate()``.

msal returns an ``error`` dict instead of raising (RFC 6749 §5.2); it becomes a ``TokenError``
carrying Entra's ``error`` code and ``error_description``. Secrets and tokens are never logged
and never part of an exception.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mailroom.errors import TokenError
from mailroom.trust.tokens import ACQUIRE_TIMEOUT_S, HTTP_TIMEOUT_S, CachedToken
from mailroom.trust.values import OAuthConfig

__all__ = ["TokenProvider"]

log = logging.getLogger("mailroom.auth")


class TokenProvider(CachedToken):
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
        # here: requests and msal, 15 MiB at start that IMAP alone never needs
        import msal  # noqa: PLC0415

        from mailroom.trust.http import HttpSession  # noqa: PLC0415

        self._session = HttpSession(config, HTTP_TIMEOUT_S)

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
        import requests  # noqa: PLC0415  # imported by _build already (a dict lookup)

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
    if config.client_secret is None:  # the config gives one of the two (checked at load)
        raise TokenError(f"{config.client}: neither a client secret nor a certificate given")
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
