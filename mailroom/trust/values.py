"""The values trust works with: secrets and the OAuth settings of the token providers.

``config`` builds them from the YAML (checked at load); ``entra``, ``google`` and ``providers``
take them as they are. They live here, not in ``config``, so that trust needs nothing above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "GMAIL_SCOPE",
    "GOOGLE_TOKEN_URI",
    "ClientCertificate",
    "GoogleOAuthConfig",
    "GoogleRefreshToken",
    "GoogleServiceAccount",
    "ImapOAuthConfig",
    "OAuthConfig",
    "Secret",
]


class Secret:
    """A secret string that never shows itself in ``repr``, ``str`` or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientCertificate:
    """An Entra ID certificate credential: the app signs a client assertion with this key
    (``private_key_jwt``, RFC 7523 §2.2) and Entra finds the certificate uploaded to the app
    registration by its thumbprint. Checked at load: an RSA key that loads."""

    private_key: Secret = field(repr=False)  # PEM (PKCS#8, unencrypted), without the certificate
    thumbprint: str  # SHA-1 of the certificate (DER): 40 upper-case hex digits, as Entra shows it


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthConfig:
    """An Entra ID app registration asking for client-credentials tokens (RFC 6749 §4.4), with
    a client secret or a certificate (exactly one of them, checked at load)."""

    tenant_id: str
    client_id: str
    client_secret: Secret | None = field(default=None, repr=False)
    client_certificate: ClientCertificate | None = None
    azure_ad_endpoint: str = "https://login.microsoftonline.com"  # authority host, no tenant
    scope: str = "https://outlook.office365.com/.default"
    ca_file: str | None = None  # trusted on top of the system store, for a private CA
    tls_verify: bool = True
    proxy: str | None = field(default=None, repr=False)  # None: the environment; "direct"

    @property
    def authority(self) -> str:
        return f"{self.azure_ad_endpoint}/{self.tenant_id}"

    @property
    def client(self) -> str:
        """Who asks for tokens, for log lines and messages (no secret)."""
        return f"client {self.client_id}"


GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
GMAIL_SCOPE = "https://mail.google.com/"  # the only scope that Gmail's IMAP accepts


@dataclass(frozen=True, slots=True, kw_only=True)
class GoogleServiceAccount:
    """A Google service account's JSON key (a secret) for domain-wide delegation; checked at
    load (``type``, ``client_email``, ``client_id``, an RSA ``private_key`` that loads)."""

    key: Secret = field(repr=False)  # the key file's JSON text
    client_email: str
    client_id: str  # the "unique ID" that the Admin console's domain-wide delegation names


@dataclass(frozen=True, slots=True, kw_only=True)
class GoogleRefreshToken:
    """An installed (desktop) app's OAuth client and the refresh token a user granted it
    (RFC 6749 §6)."""

    client_id: str
    client_secret: Secret = field(repr=False)
    refresh_token: Secret = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class GoogleOAuthConfig:
    """``oauth: {provider: google}``: Gmail and Google Workspace access tokens for XOAUTH2.

    A service account acts as ``subject`` (the mailbox's ``user``); a refresh token acts as
    the user who granted it, and ``subject`` is None. One token source per (credential,
    subject): mailboxes that name the same share it."""

    credential: GoogleServiceAccount | GoogleRefreshToken
    subject: str | None = None
    token_uri: str = GOOGLE_TOKEN_URI
    scope: str = GMAIL_SCOPE
    ca_file: str | None = None  # trusted on top of the system store, for a private CA
    tls_verify: bool = True
    proxy: str | None = field(default=None, repr=False)  # None: the environment; "direct"

    @property
    def client(self) -> str:
        """Who asks for tokens, for log lines and messages (no secret)."""
        credential = self.credential
        if isinstance(credential, GoogleServiceAccount):
            return f"service account {credential.client_email} as {self.subject}"
        return f"client {credential.client_id}"


ImapOAuthConfig = OAuthConfig | GoogleOAuthConfig
