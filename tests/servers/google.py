"""A mock of Google's OAuth 2.0 token endpoint over HTTPS (aiohttp, trustme CA) on 127.0.0.1.

It answers what mailroom asks of ``https://oauth2.googleapis.com/token`` and checks what Google
checks (Google, "Using OAuth 2.0 for Server to Server Applications", "... for Installed
Applications"):

- the jwt-bearer grant of a service account (RFC 7523 §2.1, ``grant_type=urn:ietf:params:oauth:
  grant-type:jwt-bearer``, ``assertion``): an RS256 JWT whose signature verifies with the public
  key of the key id (``kid``) the account holds, ``iss`` the account's ``client_email``, ``aud``
  ``https://oauth2.googleapis.com/token``, ``iat``/``exp`` at most an hour apart and current,
  ``scope``, and ``sub`` a user of the domain, which the account's client ID may act for with
  that scope (the Admin console's domain-wide delegation: ``delegate``);
- the refresh_token grant of an installed app (RFC 6749 §6): ``client_id`` and
  ``client_secret``, a refresh token granted to that client, ``scope`` among those granted.

Errors as Google words them, ``{"error", "error_description"}``. ``POST /introspect`` (RFC 7662)
answers Dovecot's oauth2 passdb: ``username`` is the user the token acts for. Every request is
recorded; ``fail_next`` injects failures; ``wait_for`` awaits a condition on the records.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from tests.servers.https import HttpsMock
from tests.servers.keys import KeyPair, key_pair

GOOGLE_AUDIENCE = "https://oauth2.googleapis.com/token"  # what google-auth puts in ``aud``
GMAIL_SCOPE = "https://mail.google.com/"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass
class ServiceAccount:
    """A service account and its one key."""

    client_email: str
    client_id: str  # the numeric "unique ID" the Admin console delegates to
    key_id: str
    keys: KeyPair

    def key_file(self, token_uri: str = GOOGLE_AUDIENCE, **changes: Any) -> dict[str, Any]:
        """The JSON key file Google's console hands out (``changes`` edit or, as None, drop)."""
        info: dict[str, Any] = {
            "type": "service_account",
            "project_id": "mailroom-test",
            "private_key_id": self.key_id,
            "private_key": self.keys.key_pem,
            "client_email": self.client_email,
            "client_id": self.client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        }
        info.update(changes)
        return {k: v for k, v in info.items() if v is not None}


@dataclass
class InstalledApp:
    """An OAuth client of the Desktop app type."""

    client_id: str
    client_secret: str
    grants: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)  # token → user


@dataclass(frozen=True)
class Token:
    value: str
    user: str
    client_id: str
    scope: str
    expires_at: float  # time.monotonic()


@dataclass(frozen=True)
class Request:
    kind: str  # "token", "introspect", "other"
    form: dict[str, str]
    status: int
    answer: dict[str, Any]
    at: float


class GoogleOAuth(HttpsMock):
    """The mock token endpoint; ``async with GoogleOAuth() as google``."""

    name = "mock Google"

    def __init__(self) -> None:
        super().__init__()
        self.users: set[str] = set()  # the Workspace domain's users (valid ``sub``)
        self.accounts: dict[str, ServiceAccount] = {}  # client_email → account
        self.delegations: dict[str, frozenset[str]] = {}  # client ID → scopes (Admin console)
        self.apps: dict[str, InstalledApp] = {}
        self.tokens: dict[str, Token] = {}
        self.token_lifetime_s = 3599
        self.requests: list[Request] = []
        self.introspected: list[tuple[str, bool]] = []
        self._failures: list[tuple[int, dict[str, Any]]] = []

    @property
    def token_uri(self) -> str:
        return f"https://127.0.0.1:{self.port}/token"

    @property
    def introspection_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/introspect"

    # -- controls ----------------------------------------------------------------------------

    def add_service_account(
        self, name: str = "mailroom", *, key_name: str = "google"
    ) -> ServiceAccount:
        """A service account (not yet delegated) whose key is ``key_pair(key_name)``."""
        account = ServiceAccount(
            client_email=f"{name}@mailroom-test.iam.gserviceaccount.com",
            client_id=str(100_000_000_000_000_000_000 + len(self.accounts)),
            key_id=secrets.token_hex(20),
            keys=key_pair(key_name),
        )
        self.accounts[account.client_email] = account
        return account

    def delegate(self, account: ServiceAccount, *scopes: str) -> None:
        """Domain-wide delegation of ``scopes`` (default: Gmail's) to the account's client ID."""
        self.delegations[account.client_id] = frozenset(scopes or (GMAIL_SCOPE,))

    def add_installed_app(self) -> InstalledApp:
        n = len(self.apps)
        app = InstalledApp(
            f"{n}-mock.apps.googleusercontent.com", f"GOCSPX-{secrets.token_hex(14)}"
        )
        self.apps[app.client_id] = app
        return app

    def grant(self, app: InstalledApp, user: str, *scopes: str) -> str:
        """The refresh token ``user`` granted ``app`` after the consent screen."""
        refresh_token = f"1//0g{secrets.token_urlsafe(40)}"
        app.grants[refresh_token] = (user, frozenset(scopes or (GMAIL_SCOPE,)))
        return refresh_token

    def revoke(self, token: str) -> None:
        """Make an access token invalid at once (as if it expired early)."""
        old = self.tokens[token]
        self.tokens[token] = Token(old.value, old.user, old.client_id, old.scope, 0.0)

    def fail_next(self, status: int, answer: dict[str, Any] | None = None, n: int = 1) -> None:
        """Answer the next ``n`` token requests with ``status`` and ``answer`` as JSON."""
        self._failures.extend([(status, answer or {"error": "internal_failure"})] * n)

    def of_kind(self, kind: str) -> list[Request]:
        return [r for r in self.requests if r.kind == kind]

    # -- server ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        kind = {"/token": "token", "/introspect": "introspect"}.get(request.path, "other")
        if request.method != "POST" or kind == "other":
            status, answer = 404, {"error": "not_found"}
        elif kind == "token" and self._failures:
            status, answer = self._failures.pop(0)
        elif kind == "token":
            status, answer = self._token(form)
        else:
            status, answer = self._introspect(form)
        self.requests.append(Request(kind, form, status, answer, time.monotonic()))
        await self._changed_now()
        return web.json_response(answer, status=status)

    def _token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("grant_type") == JWT_BEARER:
            return self._jwt_bearer(form.get("assertion", ""))
        if form.get("grant_type") == "refresh_token":
            return self._refresh(form)
        return _error(400, "unsupported_grant_type", "Invalid grant_type: ")

    def _jwt_bearer(self, assertion: str) -> tuple[int, dict[str, Any]]:
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return _error(400, "invalid_request", "Invalid JWT: not a JWT")
        account = self.accounts.get(str(unverified.get("iss")))
        if account is None or header.get("kid") != account.key_id:
            return _error(400, "invalid_grant", "Invalid grant: account not found")
        try:
            claims = jwt.decode(
                assertion,
                account.keys.key.public_key(),
                algorithms=["RS256"],
                audience=GOOGLE_AUDIENCE,
                options={"require": ["iss", "aud", "iat", "exp", "scope"]},
            )
        except jwt.InvalidSignatureError:
            return _error(400, "invalid_grant", "Invalid JWT Signature.")
        except jwt.PyJWTError as exc:
            return _error(400, "invalid_grant", f"Invalid JWT: {type(exc).__name__}")
        if claims["exp"] - claims["iat"] > 3600:
            return _error(
                400,
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            )
        user, scopes = claims.get("sub"), set(str(claims["scope"]).split())
        if user is None:
            return _error(400, "invalid_scope", "Gmail requires a user (sub) for this scope")
        if user not in self.users:
            return _error(400, "invalid_grant", "Invalid email or User ID")
        if not scopes or not scopes <= self.delegations.get(account.client_id, frozenset()):
            return _error(
                401,
                "unauthorized_client",
                "Client is unauthorized to retrieve access tokens using this method, or client "
                "not authorized for any of the scopes requested.",
            )
        return self._issue(str(user), account.client_id, " ".join(sorted(scopes)))

    def _refresh(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        app = self.apps.get(form.get("client_id", ""))
        if app is None:
            return _error(401, "invalid_client", "The OAuth client was not found.")
        if not secrets.compare_digest(form.get("client_secret", ""), app.client_secret):
            return _error(401, "invalid_client", "Unauthorized")
        grant = app.grants.get(form.get("refresh_token", ""))
        if grant is None:
            if any(form.get("refresh_token") in a.grants for a in self.apps.values()):
                return _error(400, "unauthorized_client", "Unauthorized")
            return _error(400, "invalid_grant", "Token has been expired or revoked.")
        user, granted = grant
        scopes = set(form.get("scope", " ".join(granted)).split())
        if not scopes <= granted:
            return _error(400, "invalid_scope", "Bad Request")
        return self._issue(user, app.client_id, " ".join(sorted(scopes)))

    def _issue(self, user: str, client_id: str, scope: str) -> tuple[int, dict[str, Any]]:
        value = f"ya29.{secrets.token_urlsafe(32)}"
        lifetime = self.token_lifetime_s
        self.tokens[value] = Token(value, user, client_id, scope, time.monotonic() + lifetime)
        return 200, {
            "access_token": value,
            "expires_in": lifetime,
            "scope": scope,
            "token_type": "Bearer",
        }

    def _introspect(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        value = form.get("token", "")
        found = self.tokens.get(value)
        active = found is not None and found.expires_at > time.monotonic()
        self.introspected.append((value, active))
        if found is None or not active:
            return 200, {"active": False}  # RFC 7662 §2.2
        return 200, {"active": True, "username": found.user, "scope": found.scope}


def _error(status: int, error: str, description: str) -> tuple[int, dict[str, Any]]:
    return status, {"error": error, "error_description": description}


def key_file_text(info: dict[str, Any]) -> str:
    """A key file's text as Google writes it (indented JSON)."""
    return json.dumps(info, indent=2) + "\n"
