"""OAuth 2.0 access tokens from Google for Gmail's IMAP XOAUTH2: the only module importing
google-auth.

Two credentials (Google, "Using OAuth 2.0 for Server to Server Applications" and "... for
Installed Applications"), both for the scope ``https://mail.google.com/``, the only one Gmail's
IMAP accepts:

- a service account with domain-wide delegation: a JWT signed with the account's key, naming
  the mailbox user as ``sub``, is exchanged for a token (RFC 7523 §2.1, the jwt-bearer grant);
- an installed app's refresh token (RFC 6749 §6).

The caching is ``auth.TokenProvider``'s, shared (``auth.CachedToken``): a token is kept until
five minutes before it expires (or half its lifetime when that is shorter); ``invalidate()``
after the server refused one makes the next ``token()`` ask anew. google-auth is synchronous:
its calls run under a timeout on the token thread pool of ``tokens``, through
``http.HttpSession`` (trust from ``tls``, no environment, no .netrc). Google's ``error``
and ``error_description`` (RFC 6749 §5.2) become a ``TokenError`` that says what to fix; secrets
and tokens are never logged nor part of one.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import time
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import google.oauth2.credentials
import google.oauth2.service_account
import requests

from mailroom.errors import TokenError
from mailroom.redact import origin, printable
from mailroom.trust.http import HttpSession
from mailroom.trust.tokens import ACQUIRE_TIMEOUT_S, HTTP_TIMEOUT_S, CachedToken
from mailroom.trust.values import GoogleOAuthConfig, GoogleServiceAccount

__all__ = ["GoogleTokenProvider", "refusal"]

log = logging.getLogger("mailroom.auth")

# RFC 6750 §2.1 b64token: what may follow "Bearer " (and go into the SASL XOAUTH2 string,
# whose fields are separated by ^A).
_BEARER = re.compile(r"[A-Za-z0-9._~+/-]+=*")
TOKEN_CHARS_MAX = 16 * 1024
DESCRIPTION_CHARS_MAX = 200


class _Request(google.auth.transport.requests.Request):
    """google-auth's transport with mailroom's timeout per request (it would wait 120 s)."""

    def __call__(self, url: str, method: str = "GET", *args: Any, **kwargs: Any) -> Any:
        kwargs["timeout"] = HTTP_TIMEOUT_S
        return super().__call__(url, method, *args, **kwargs)  # type: ignore[no-untyped-call]


class GoogleTokenProvider(CachedToken):
    """Access tokens for one Google credential and the user it acts as."""

    def __init__(
        self, config: GoogleOAuthConfig, *, label: str, timeout_s: float = ACQUIRE_TIMEOUT_S
    ) -> None:
        super().__init__(label=label, scope=config.scope, timeout_s=timeout_s)
        self._config = config
        self._credentials: Any = None  # google-auth's Credentials, built on first use

    def __repr__(self) -> str:
        return f"GoogleTokenProvider({self.label!r}, {self._config.client!r})"

    async def _acquire(self) -> str:
        config = self._config
        started = time.monotonic()
        where = origin(config.token_uri)
        try:
            token, lifetime = await self._in_pool(self._refresh)
        except TimeoutError as exc:
            raise TokenError(f"no answer from {where} within {self._timeout_s:g}s") from exc
        except google.auth.exceptions.RefreshError as exc:
            code, description = refusal(exc.args)
            if code is None:
                raise TokenError(
                    f"token request to {where} failed: {description}; is token_uri Google's "
                    "token endpoint?",
                    description=description,
                ) from exc
            raise TokenError(
                f"token request to {where} refused ({config.client}): {code}: "
                f"{description or '-'}{_hint(config, code, description)}",
                code=code,
                description=description,
            ) from exc
        except google.auth.exceptions.TransportError as exc:
            if isinstance(exc.__cause__, requests.exceptions.SSLError):
                raise TokenError(
                    f"TLS certificate of {where} not trusted; set ca_file to the CA that signed it"
                ) from exc
            cause = type(exc.__cause__ or exc).__name__
            raise TokenError(f"{cause} talking to {where}") from exc
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
            # google-auth reading an answer that is not what RFC 6749 §5.1 says (expires_in
            # not a number, a JSON list, ...): what it says about it may quote the answer.
            raise TokenError(f"unusable answer from {where}: not an RFC 6749 token") from exc
        self._keep(token, lifetime, started)
        self.acquisitions += 1
        log.info(
            "%s: new access token for %s (valid %.0fs, %s)",
            self.label,
            self.scope,
            lifetime,
            config.client,
            extra={"mailbox": self.label},
        )
        return token

    def _refresh(self) -> tuple[str, float]:
        """In a worker thread: a new token from Google and its lifetime in seconds."""
        if self._credentials is None:
            self._session = HttpSession(self._config, HTTP_TIMEOUT_S)
            self._credentials = self._build()
        self._credentials.refresh(_Request(self._session))
        token = self._credentials.token
        if (
            not isinstance(token, str)
            or len(token) > TOKEN_CHARS_MAX
            or not _BEARER.fullmatch(token)
        ):
            raise ValueError("the access token is not an RFC 6750 bearer token")
        expiry = self._credentials.expiry  # naive UTC (google-auth's convention), or None
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        lifetime = (expiry - now).total_seconds() if expiry is not None else 0.0
        return token, max(lifetime, 0.0)

    def _build(self) -> Any:
        config = self._config
        credential = config.credential
        if isinstance(credential, GoogleServiceAccount):
            info = json.loads(credential.key.reveal())
            info["token_uri"] = config.token_uri  # the config's, which may differ from the file's
            return google.oauth2.service_account.Credentials.from_service_account_info(
                info, scopes=[config.scope], subject=config.subject
            )
        return google.oauth2.credentials.Credentials(
            token=None,
            refresh_token=credential.refresh_token.reveal(),
            token_uri=config.token_uri,
            client_id=credential.client_id,
            client_secret=credential.client_secret.reveal(),
            scopes=[config.scope],
        )


def refusal(args: tuple[Any, ...]) -> tuple[str | None, str]:
    """Google's ``error`` code and the first line of its ``error_description`` from the
    arguments of google-auth's ``RefreshError`` (message, then the decoded answer: a dict,
    or the text when it was not JSON). Without an OAuth error: ``(None, what was seen)``."""
    answer = args[1] if len(args) > 1 else None
    if isinstance(answer, dict):
        code, description = answer.get("error"), answer.get("error_description")
        if isinstance(code, str) and re.fullmatch(r"[\x21-\x7e]{1,64}", code):
            return code, _line(description)
        if "access_token" not in answer:
            return None, "the answer holds no access_token and no OAuth error"
        return None, "the answer's access_token is not a string"
    return None, "the answer is not JSON, and no OAuth error (RFC 6749 §5.2)"


def _line(value: object) -> str:
    """The first line of ``value`` when it is text, printable and cut short: it is shown."""
    if not isinstance(value, str):
        return ""
    return printable(value.strip().split("\n", 1)[0].strip(), DESCRIPTION_CHARS_MAX)


def _hint(config: GoogleOAuthConfig, code: str, description: str) -> str:
    """What to fix for Google's ``error`` codes (RFC 6749 §5.2 and Google's descriptions)."""
    if isinstance(config.credential, GoogleServiceAccount):
        delegation = (
            "; in the Google Admin console (Security → Access and data control → API controls "
            f"→ Manage Domain Wide Delegation) give client ID {config.credential.client_id} "
            f"the scope {config.scope}"
        )
        if code == "invalid_grant" and "signature" in description.lower():
            return "; the key was deleted or disabled: create a new key for the service account"
        return {
            "unauthorized_client": delegation,
            "access_denied": delegation,
            "invalid_grant": f"; is {config.subject} a user of the Workspace domain with Gmail?",
            "invalid_client": "; the service account was deleted or disabled",
            "disabled_client": "; the service account was deleted or disabled",
        }.get(code, "")
    return {
        "invalid_grant": (
            "; the refresh token was revoked or has expired (a password change revokes it; "
            "an app whose consent screen is in testing gets tokens that expire after 7 days): "
            "run the consent flow again and replace refresh_token"
        ),
        "invalid_client": "; check client_id and client_secret (APIs & Services → Credentials)",
        "unauthorized_client": "; the refresh token was issued to another client_id",
        "invalid_scope": f"; the refresh token was not granted {config.scope}: consent again",
    }.get(code, "")
