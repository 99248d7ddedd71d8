"""The ``oauth:`` block of an IMAP mailbox (Entra ID or Google) and a Graph mailbox's app.

- ``provider: microsoft`` (the default): an Entra ID app registration with ``client_secret``
  or a certificate (``client_certificate_file``: the PEM private key and its certificate;
  ``client_certificate_thumbprint`` or the thumbprint computed from the certificate).
- ``provider: google``: a service account key with domain-wide delegation
  (``service_account_file``; it acts as the mailbox's ``user``), or an installed app's
  ``client_id``, ``client_secret`` and ``refresh_token``.

Key files are secrets: they are checked here, once, and an error says what is wrong with
one without ever showing what it holds (``load_private_key``, ``service_account_key``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from mailroom.config.reader import Section, shown
from mailroom.trust.values import (
    GOOGLE_TOKEN_URI,
    ClientCertificate,
    GoogleOAuthConfig,
    GoogleRefreshToken,
    GoogleServiceAccount,
    ImapOAuthConfig,
    OAuthConfig,
    Secret,
)

__all__ = ["entra", "imap_oauth", "load_private_key", "service_account_key"]

RSA_BITS_MIN = 2048  # Entra ID and Google both sign with RSA keys of 2048 bits or more
RSA_BITS_MAX = 8192  # checked before the key's (costly) consistency check
KEY_FILE_HELP = (
    "download a new JSON key (Google Cloud console: IAM & Admin → Service accounts → Keys → "
    "Add key → JSON)"
)
_ENTRA_ONLY = (
    "tenant_id",
    "azure_ad_endpoint",
    "client_certificate",
    "client_certificate_file",
    "client_certificate_thumbprint",
    "scope",
)
_GOOGLE_ONLY = ("service_account", "refresh_token", "token_uri")
# Google's other credential files (google.auth._default): named when found, nothing else is.
_OTHER_TYPES = frozenset(
    {"external_account", "external_account_authorized_user", "impersonated_service_account",
     "gdch_service_account"}
)  # fmt: skip
_THUMBPRINT = re.compile(r"[0-9A-F]{40}")


def imap_oauth(section: Section, *, user: str) -> ImapOAuthConfig:
    """``oauth:`` of an IMAP mailbox with ``auth: xoauth2``; ``user`` is the mailbox user."""
    provider = section.choice("provider", "microsoft", ("microsoft", "google"))
    if provider == "google":
        return _google(section, user=user)
    for key in _GOOGLE_ONLY:
        if section.has(key) or section.has(f"{key}_file"):
            section.fail(
                _written(section, key), "is a Google setting; add provider: google (or remove it)"
            )
    return entra(section, scope=None)


def _written(section: Section, key: str) -> str:
    """``key`` or ``key_file``: the secret's key as the config names it, for an error."""
    return f"{key}_file" if section.has(f"{key}_file") else key


# -- Entra ID --------------------------------------------------------------------------------


def _scope(section: Section) -> str:
    """An OAuth scope, ``<resource URI>/.default``: where the URI has a host, no
    ``user:password@``, query or fragment, as for every URL."""
    default = "https://outlook.office365.com/.default"
    scope = str(section.text("scope", default))
    if "://" in scope:
        section.url("scope", default, schemes=(scope.partition("://")[0],))
    return scope


def entra(section: Section, *, scope: str | None) -> OAuthConfig:
    """An Entra ID app: ``oauth:`` of an IMAP mailbox (``scope`` read from it) or a Graph
    mailbox's ``inbox_options`` (``scope`` given)."""
    tenant_id = section.text("tenant_id")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", tenant_id):
        section.fail("tenant_id", f"{shown(tenant_id)} is not a tenant id or domain (Entra portal)")
    secret = section.secret("client_secret", required=False)
    certificate = _client_certificate(section)
    if secret is None and certificate is None:
        section.required(
            "client_secret",
            "is required (or client_secret_file naming a file that holds it, or "
            "client_certificate_file for a certificate credential)",
        )
    if secret is not None and certificate is not None:
        section.fail(
            _written(section, "client_certificate"),
            "give either client_secret or a client certificate, not both",
        )
    return OAuthConfig(
        tenant_id=tenant_id,
        client_id=section.text("client_id"),
        client_secret=secret,
        client_certificate=certificate,
        # msal accepts only https authorities
        azure_ad_endpoint=str(
            section.url("azure_ad_endpoint", "https://login.microsoftonline.com")
        ).rstrip("/"),
        scope=scope or _scope(section),
        ca_file=section.ca_file(),
        tls_verify=section.flag("tls_verify", True),
        proxy=section.proxy(),
    )


def _client_certificate(section: Section) -> ClientCertificate | None:
    """``client_certificate_file`` (PEM: the private key and its certificate) and the
    optional ``client_certificate_thumbprint``; None when neither is given."""
    pem = section.secret("client_certificate", required=False)
    given = section.text("client_certificate_thumbprint", None)
    if pem is None:
        if given is not None:
            section.fail(
                "client_certificate_thumbprint",
                "goes with client_certificate_file (the PEM file with the app's private key "
                "and certificate); add it, or remove the thumbprint",
            )
        return None
    key = _written(section, "client_certificate")
    if section.offline:  # a stand-in: nothing to load
        return ClientCertificate(private_key=pem, thumbprint=_OFFLINE_THUMBPRINT)
    try:
        private_key, computed = load_private_key(pem.reveal(), with_certificate=True)
    except ValueError as exc:
        section.fail(key, str(exc))
    thumbprint = computed
    if given is not None:
        thumbprint = re.sub(r"[\s:]", "", given).upper()
        if not _THUMBPRINT.fullmatch(thumbprint):
            section.fail(
                "client_certificate_thumbprint",
                "is not a SHA-1 thumbprint (40 hex digits, as the app registration's "
                "Certificates & secrets page shows it)",
            )
        if computed is not None and computed != thumbprint:
            section.fail(
                "client_certificate_thumbprint",
                f"is not the thumbprint of the certificate in {key} ({computed}); remove "
                "client_certificate_thumbprint, or put the certificate registered in Entra in "
                "the file",
            )
    if thumbprint is None:
        section.fail(
            key,
            "holds no certificate (-----BEGIN CERTIFICATE-----) to compute the thumbprint "
            "from; add the certificate uploaded to the app registration, or give "
            "client_certificate_thumbprint",
        )
    return ClientCertificate(private_key=Secret(private_key), thumbprint=thumbprint)


def load_private_key(pem: str, *, with_certificate: bool = False) -> tuple[str, str | None]:
    """The unencrypted RSA private key in ``pem`` (as PKCS#8 PEM) and, ``with_certificate``,
    the SHA-1 thumbprint of the certificate of that key found beside it (None: none there).

    ``ValueError`` says what is wrong in words of its own: never a part of ``pem``.
    """
    # here: cryptography's x509 and RSA, 10 MiB at start that configs without a key never need
    from cryptography import x509  # noqa: PLC0415
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    data = pem.encode("utf-8", "replace")
    what = "the app's private key and its certificate" if with_certificate else "a private key"
    try:
        # The size first: the consistency check of a huge key takes minutes.
        key = serialization.load_pem_private_key(
            data, password=None, unsafe_skip_rsa_key_validation=True
        )
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size <= RSA_BITS_MAX:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(
            "holds an encrypted private key; mailroom needs it unencrypted (openssl pkey -in "
            "FILE -out NEW), in a file only mailroom can read"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(
            "holds no private key that loads (-----BEGIN PRIVATE KEY----- or -----BEGIN RSA "
            f"PRIVATE KEY-----, PEM); it must hold {what}"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("holds a private key that is not RSA; it must be an RSA key")
    if not RSA_BITS_MIN <= key.key_size <= RSA_BITS_MAX:
        raise ValueError(f"holds an RSA key of {key.key_size} bits; use one of 2048 to 8192")
    text = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    if not with_certificate or b"-----BEGIN CERTIFICATE-----" not in data:
        return text, None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(
            "holds a certificate that does not load; put the certificate (PEM) that belongs to "
            "the private key in the file"
        ) from None
    mine = key.public_key().public_numbers()
    for certificate in certificates:
        public = certificate.public_key()
        if isinstance(public, rsa.RSAPublicKey) and public.public_numbers() == mine:
            # The SHA-1 thumbprint (x5t, RFC 7515 §4.1.7) is what Entra shows and matches.
            return text, certificate.fingerprint(hashes.SHA1()).hex().upper()
    raise ValueError(
        "holds a certificate of another key; put the certificate that belongs to the private "
        "key in the file"
    )


# -- Google ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceAccountKey:
    """What a service account's JSON key file says, checked (its ``private_key`` loads)."""

    client_email: str
    client_id: str
    token_uri: str | None


# What an offline read (``mailroom route``) has instead of a certificate or a key file it
# does not read.
_OFFLINE_THUMBPRINT = "0" * 40
_OFFLINE_ACCOUNT = ServiceAccountKey(
    client_email="not-read@offline.invalid", client_id="0", token_uri=None
)


def service_account_key(text: str) -> ServiceAccountKey:
    """Check a service account's JSON key file; ``ValueError`` says what is wrong with it,
    in words of its own (never a part of the file)."""
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"is not JSON (line {exc.lineno}, column {exc.colno}); it should be the service "
            f"account's JSON key: {KEY_FILE_HELP}"
        ) from None
    except (ValueError, RecursionError):  # a number of 5000 digits, 10000 nested lists
        raise ValueError(f"is not a JSON key that mailroom can read; {KEY_FILE_HELP}") from None
    if not isinstance(info, dict):
        raise ValueError(f"holds {_json_kind(info)}, not a service account key; {KEY_FILE_HELP}")
    if info.get("type") != "service_account":
        raise ValueError(_wrong_type(info))
    for field in ("client_email", "client_id", "private_key"):
        value = info.get(field)
        if not isinstance(value, str) or not value.strip():
            why = f"its {field} is {_json_kind(value)}" if field in info else f"has no {field}"
            if field == "client_id":
                why += (
                    " (domain-wide delegation is granted to this client ID in the Google Admin "
                    "console)"
                )
            raise ValueError(f"{why}; {KEY_FILE_HELP}")
    email, client_id = info["client_email"], info["client_id"]
    if not re.fullmatch(r"[^@\s]+@[^@\s]+", email) or not re.fullmatch(r"[0-9]+", client_id):
        field = "client_id" if "@" in email and "\n" not in email else "client_email"
        raise ValueError(f"its {field} is not one of a service account; {KEY_FILE_HELP}")
    try:
        load_private_key(info["private_key"])
    except ValueError as exc:
        raise ValueError(f"its private_key {exc}; {KEY_FILE_HELP}") from None
    token_uri = info.get("token_uri")
    if token_uri is not None and not _https_url(token_uri):
        raise ValueError(
            "its token_uri is not an https URL; set it to https://oauth2.googleapis.com/token "
            "or download a new key"
        )
    if info.get("universe_domain", "googleapis.com") != "googleapis.com":
        raise ValueError("is for another universe than googleapis.com: Gmail is not there")
    return ServiceAccountKey(client_email=email, client_id=client_id, token_uri=token_uri)


def _wrong_type(info: dict[object, object]) -> str:
    if "installed" in info or "web" in info:
        return (
            "is an OAuth client file (client_secret_....json), not a service account key; for "
            "an installed app give client_id, client_secret and refresh_token instead"
        )
    found = info.get("type")
    if found == "authorized_user":
        return (
            "holds a user's credentials (type authorized_user), not a service account key; "
            "give its client_id, client_secret and refresh_token instead of service_account_file"
        )
    known = isinstance(found, str) and found in _OTHER_TYPES
    what = f"type {found}" if known else "no type service_account"
    return f"has {what}; it must be a service account key: {KEY_FILE_HELP}"


def _json_kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else "nothing")


def _https_url(value: object) -> bool:
    if not isinstance(value, str) or any(c in value for c in "\r\n\0 "):
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        return False
    return parts.scheme == "https" and bool(parts.hostname) and "@" not in parts.netloc


def _google(section: Section, *, user: str) -> GoogleOAuthConfig:
    """``provider: google``: a service account acting as ``user``, or an installed app."""
    for key in _ENTRA_ONLY:
        if section.has(key):
            if key == "scope":
                section.fail(key, "Gmail's IMAP takes https://mail.google.com/ only; remove it")
            section.fail(key, "is an Entra ID (provider: microsoft) setting; remove it")
    account = section.secret("service_account", required=False)
    app_keys = ("client_id", "client_secret", "client_secret_file", "refresh_token")
    app = [key for key in (*app_keys, "refresh_token_file") if section.has(key)]
    token_uri = section.url("token_uri", None)
    if account is not None:
        if app:
            section.fail(
                app[0],
                "belongs to an installed app's refresh token; a service account "
                "(service_account_file) needs none of client_id, client_secret and "
                "refresh_token: remove them",
            )
        credential, found_uri = _service_account(section, account, user=user)
        return GoogleOAuthConfig(
            credential=credential,
            subject=user,
            token_uri=token_uri or found_uri or GOOGLE_TOKEN_URI,
            ca_file=section.ca_file(),
            tls_verify=section.flag("tls_verify", True),
            proxy=section.proxy(),
        )
    if not app:
        section.required(
            "service_account",
            "is required with provider: google (service_account_file: a service account key "
            "with domain-wide delegation), or client_id, client_secret and refresh_token of "
            "an installed app",
        )
    return GoogleOAuthConfig(
        credential=_refresh_token(section),
        token_uri=token_uri or GOOGLE_TOKEN_URI,
        ca_file=section.ca_file(),
        tls_verify=section.flag("tls_verify", True),
        proxy=section.proxy(),
    )


def _service_account(
    section: Section, account: Secret, *, user: str
) -> tuple[GoogleServiceAccount, str | None]:
    """The service account's key, checked, and the ``token_uri`` it names; it acts as ``user``
    by domain-wide delegation."""
    key = _written(section, "service_account")
    try:
        found = _OFFLINE_ACCOUNT if section.offline else service_account_key(account.reveal())
    except ValueError as exc:
        section.fail(key, str(exc))
    if not re.fullmatch(r"[^@\s]+@[^@\s]+", user):
        section.fail(
            key,
            f"acts as the mailbox's user by domain-wide delegation, and user {shown(user)} "
            "is not an email address; set user to the mailbox's address",
        )
    credential = GoogleServiceAccount(
        key=account, client_email=found.client_email, client_id=found.client_id
    )
    return credential, found.token_uri


def _refresh_token(section: Section) -> GoogleRefreshToken:
    """An installed app's ``client_id``, ``client_secret`` and ``refresh_token``."""
    client_secret = section.secret("client_secret", required=True)
    refresh_token = section.secret("refresh_token", required=True)
    if client_secret.reveal().lstrip().startswith("{"):
        section.fail(
            _written(section, "client_secret"),
            "holds JSON (Google's downloaded client file?); give only the client secret, the "
            "value of its client_secret field",
        )
    return GoogleRefreshToken(
        client_id=section.text("client_id"),
        client_secret=client_secret,
        refresh_token=refresh_token,
    )
