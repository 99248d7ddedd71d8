"""The oauth blocks' keys and key files: Google (service account, installed app) and Entra ID
certificates. Every bad input is a ConfigError naming the key and what to do, never showing a
secret; the parsers of key files and of token endpoint answers are fuzzed."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import requests
import requests.adapters
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailroom.config import (
    ConfigError,
    GoogleOAuthConfig,
    GoogleRefreshToken,
    GoogleServiceAccount,
    GraphMailboxConfig,
    ImapMailboxConfig,
    OAuthConfig,
    parse_config,
)
from mailroom.config.oauth import load_private_key, service_account_key
from mailroom.errors import TokenError
from mailroom.trust.google import GoogleTokenProvider, refusal
from tests.servers.google import ServiceAccount, key_file_text
from tests.servers.keys import key_pair

SECRET = "s3cr3t-client-secret"
REFRESH = "1//0g-refresh-token-value"
ACCOUNT = ServiceAccount(
    client_email="mailroom@project.iam.gserviceaccount.com",
    client_id="100000000000000000001",
    key_id="0123abcd",
    keys=key_pair("google"),
)


def imap(oauth: dict[str, Any], **box: Any) -> dict[str, Any]:
    mailbox = {
        "address": "incoming+%{key}@example.com",
        "host": "imap.gmail.com",
        "port": 993,
        "ssl": True,
        "user": "incoming@example.com",
        "auth": "xoauth2",
        "oauth": oauth,
        **box,
    }
    return {"mailboxes": [mailbox], "webhook": {"url": "https://app.internal/incoming"}}


def graph(options: dict[str, Any]) -> dict[str, Any]:
    mailbox = {
        "inbox_method": "microsoft_graph",
        "address": "incoming+%{key}@example.com",
        "user": "incoming@example.com",
        "inbox_options": {"tenant_id": "t", "client_id": "c", **options},
    }
    return {"mailboxes": [mailbox], "webhook": {"url": "https://app.internal/incoming"}}


def error_of(data: dict[str, Any], base_dir: Path | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, env={}, base_dir=base_dir)
    text = str(caught.value)
    for secret in (
        SECRET,
        REFRESH,
        ACCOUNT.keys.key_pem[60:90],
        key_pair("entra-app").key_pem[60:90],
    ):
        assert secret not in text
    return text


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


def key_file(directory: Path, **changes: Any) -> str:
    return write(directory, "key.json", key_file_text(ACCOUNT.key_file(**changes)))


def the_oauth(data: dict[str, Any], base_dir: Path | None = None) -> Any:
    (box,) = parse_config(data, env={}, base_dir=base_dir).mailboxes
    if isinstance(box, GraphMailboxConfig):
        return box.inbox_options.oauth
    assert isinstance(box, ImapMailboxConfig)
    return box.oauth


# -- Google ----------------------------------------------------------------------------------


def test_a_service_account_acts_as_the_mailbox_user(tmp_path: Path) -> None:
    oauth = the_oauth(imap({"provider": "google", "service_account_file": key_file(tmp_path)}))
    assert isinstance(oauth, GoogleOAuthConfig)
    assert isinstance(oauth.credential, GoogleServiceAccount)
    assert oauth.subject == "incoming@example.com"
    assert (oauth.token_uri, oauth.scope) == (
        "https://oauth2.googleapis.com/token",
        "https://mail.google.com/",
    )
    assert oauth.credential.client_id == ACCOUNT.client_id
    assert "PRIVATE" not in repr(oauth) and ACCOUNT.client_email in oauth.client


def test_an_installed_app_and_its_refresh_token(tmp_path: Path) -> None:
    block = {
        "provider": "google",
        "client_id": "123-abc.apps.googleusercontent.com",
        "client_secret_file": write(tmp_path, "secret", SECRET + "\n"),
        "refresh_token_file": write(tmp_path, "refresh", REFRESH + "\n"),
        "token_uri": "https://oauth2.example.test/token",
    }
    oauth = the_oauth(imap(block))
    assert isinstance(oauth, GoogleOAuthConfig)
    assert isinstance(oauth.credential, GoogleRefreshToken)
    assert oauth.credential.refresh_token.reveal() == REFRESH and oauth.subject is None
    assert oauth.token_uri == "https://oauth2.example.test/token"
    assert SECRET not in repr(oauth) and REFRESH not in repr(oauth)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("not json at all", "is not JSON (line 1, column 1); it should be the service account's"),
        ("[1, 2]", "holds a list, not a service account key; download a new JSON key"),
        (
            json.dumps({"type": "authorized_user", "client_id": "x", "refresh_token": REFRESH}),
            "holds a user's credentials (type authorized_user), not a service account key; "
            "give its client_id, client_secret and refresh_token instead",
        ),
        (
            json.dumps({"installed": {"client_id": "x", "client_secret": SECRET}}),
            "is an OAuth client file (client_secret_....json), not a service account key",
        ),
        (
            key_file_text(ACCOUNT.key_file(client_id=None)),
            "has no client_id (domain-wide delegation is granted to this client ID in the "
            "Google Admin console); download a new JSON key",
        ),
        (key_file_text(ACCOUNT.key_file(client_email=7)), "its client_email is a number"),
        (
            key_file_text(ACCOUNT.key_file(private_key=ACCOUNT.keys.key_pem[:200])),
            "its private_key holds no private key that loads",
        ),
        (
            key_file_text(ACCOUNT.key_file(token_uri="http://oauth2.googleapis.com/token")),
            "its token_uri is not an https URL",
        ),
        ("[" * 100_000, "is not a JSON key that mailroom can read"),
    ],
)
def test_a_key_file_that_cannot_be_used(tmp_path: Path, content: str, expected: str) -> None:
    if len(content) > 60_000:
        content = content[:60_000]
    path = write(tmp_path, "key.json", content)
    text = error_of(imap({"provider": "google", "service_account_file": path}))
    assert text.startswith("mailboxes[0].oauth.service_account_file: ")
    assert expected in text


@pytest.mark.parametrize(
    ("block", "box", "expected"),
    [
        (
            {"service_account_file": "/nonexistent/key.json"},
            {},
            "mailboxes[0].oauth.service_account_file: the file it names does not exist",
        ),
        (
            {"service_account_file": "KEY"},
            {"user": "incoming"},
            "mailboxes[0].oauth.service_account_file: acts as the mailbox's user by domain-wide "
            "delegation, and user 'incoming' is not an email address",
        ),
        (
            {"service_account_file": "KEY", "token_uri": "http://127.0.0.1:9/token"},
            {},
            "mailboxes[0].oauth.token_uri: is not an https URL (http://127.0.0.1:9); write it",
        ),
        (
            {"service_account_file": "KEY", "refresh_token": REFRESH},
            {},
            "mailboxes[0].oauth.refresh_token: belongs to an installed app's refresh token",
        ),
        (
            {},
            {},
            "mailboxes[0].oauth.service_account: is required with provider: google "
            "(service_account_file: a service account key with domain-wide delegation), or "
            "client_id, client_secret and refresh_token of an installed app",
        ),
        (
            {"client_id": "c", "client_secret": SECRET},
            {},
            "mailboxes[0].oauth.refresh_token: is required (or refresh_token_file naming",
        ),
        (
            {"client_id": "c", "client_secret": '{"installed": {}}', "refresh_token": REFRESH},
            {},
            "mailboxes[0].oauth.client_secret: holds JSON (Google's downloaded client file?)",
        ),
        (
            {"service_account_file": "KEY", "scope": "https://mail.google.com/"},
            {},
            "mailboxes[0].oauth.scope: Gmail's IMAP takes https://mail.google.com/ only",
        ),
        (
            {"service_account_file": "KEY", "tenant_id": "t"},
            {},
            "mailboxes[0].oauth.tenant_id: is an Entra ID (provider: microsoft) setting",
        ),
        (
            {"service_account_file": ["key.json"]},
            {},
            "mailboxes[0].oauth.service_account_file: expected a string, got a list",
        ),
        (
            {"provider": "gogle"},
            {},
            "mailboxes[0].oauth.provider: 'gogle' is not one of: microsoft, google; did you "
            "mean google?",
        ),
        (
            {"provider": "microsoft", "service_account_file": "KEY"},
            {},
            "mailboxes[0].oauth.service_account_file: is a Google setting; add provider: google",
        ),
    ],
)
def test_google_block_errors(
    tmp_path: Path, block: dict[str, Any], box: dict[str, Any], expected: str
) -> None:
    block = {"provider": "google", **block}
    if block.get("service_account_file") == "KEY":
        block["service_account_file"] = key_file(tmp_path)
    assert error_of(imap(block, **box)).startswith(expected)


# -- Entra ID certificates -------------------------------------------------------------------


def test_a_certificate_gives_the_key_and_its_thumbprint(tmp_path: Path) -> None:
    keys = key_pair("entra-app")
    pem = write(tmp_path, "app.pem", keys.certificate_pem + keys.key_pem)
    for data in (imap({"tenant_id": "t", "client_id": "c", "client_certificate_file": pem}),
                 graph({"client_certificate_file": pem})):  # fmt: skip
        oauth = the_oauth(data)
        assert isinstance(oauth, OAuthConfig) and oauth.client_secret is None
        assert oauth.client_certificate is not None
        assert oauth.client_certificate.thumbprint == keys.thumbprint
        assert "PRIVATE" not in repr(oauth)
    # The key alone, with the thumbprint the portal shows.
    alone = write(tmp_path, "key.pem", keys.key_pem)
    oauth = the_oauth(
        graph({"client_certificate_file": alone, "client_certificate_thumbprint": keys.thumbprint})
    )
    assert oauth.client_certificate is not None
    assert oauth.client_certificate.thumbprint == keys.thumbprint


def _ec_key() -> str:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


def _encrypted_key() -> str:
    return (
        key_pair("entra-app")
        .key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
        .decode()
    )


def _small_key() -> str:
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=1024)
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


@pytest.mark.parametrize(
    ("content", "more", "expected"),
    [
        ("-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n", {},
         "client_certificate_file: holds no private key that loads (-----BEGIN PRIVATE KEY----- "
         "or -----BEGIN RSA PRIVATE KEY-----, PEM); it must hold the app's private key and its "
         "certificate"),
        ("ENCRYPTED", {}, "client_certificate_file: holds an encrypted private key; mailroom "
         "needs it unencrypted"),
        ("EC", {}, "client_certificate_file: holds a private key that is not RSA"),
        ("SMALL", {}, "client_certificate_file: holds an RSA key of 1024 bits"),
        ("OTHER", {}, "client_certificate_file: holds a certificate of another key"),
        ("KEY", {}, "client_certificate_file: holds no certificate (-----BEGIN CERTIFICATE-----) "
         "to compute the thumbprint from"),
        ("BOTH", {"client_certificate_thumbprint": "AB" * 20},
         "client_certificate_thumbprint: is not the thumbprint of the certificate in "
         "client_certificate_file ("),
        ("BOTH", {"client_certificate_thumbprint": "not-a-thumbprint"},
         "client_certificate_thumbprint: is not a SHA-1 thumbprint (40 hex digits"),
        ("BOTH", {"client_secret": SECRET}, "client_certificate_file: give either client_secret "
         "or a client certificate, not both"),
        (None, {"client_certificate_thumbprint": "AB" * 20},
         "client_certificate_thumbprint: goes with client_certificate_file"),
        (None, {}, "client_secret: is required (or client_secret_file naming a file that holds "
         "it, or client_certificate_file for a certificate credential)"),
    ],
)  # fmt: skip
def test_certificate_errors(
    tmp_path: Path, content: str | None, more: dict[str, Any], expected: str
) -> None:
    keys, other = key_pair("entra-app"), key_pair("another")
    texts = {
        "ENCRYPTED": _encrypted_key(),
        "EC": _ec_key(),
        "SMALL": _small_key(),
        "OTHER": keys.key_pem + other.certificate_pem,
        "KEY": keys.key_pem,
        "BOTH": keys.key_pem + keys.certificate_pem,
    }
    options = dict(more)
    if content is not None:
        options["client_certificate_file"] = write(tmp_path, "app.pem", texts.get(content, content))
    assert error_of(graph(options)).startswith(f"mailboxes[0].inbox_options.{expected}")
    text = error_of(imap({"tenant_id": "t", "client_id": "c", **options}))
    assert text.startswith(f"mailboxes[0].oauth.{expected}")


# -- fuzz: key files and token endpoint answers ----------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
_MARKER = "Zq9x-stranger-text-Zq9x"


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        _JSON.map(json.dumps),
        st.dictionaries(
            st.sampled_from(["type", "client_email", "client_id", "private_key", "token_uri",
                             "universe_domain", "installed"]),
            _JSON | st.just(_MARKER) | st.just("service_account"),
            max_size=7,
        ).map(json.dumps),
    )
)  # fmt: skip
def test_fuzz_service_account_key_files(text: str) -> None:
    try:
        found = service_account_key(text)
    except ValueError as exc:
        assert _MARKER not in str(exc)
    else:
        assert found.client_email and found.client_id.isdigit()


_PEM_BODY = st.binary(max_size=300).map(
    lambda b: (
        f"-----BEGIN PRIVATE KEY-----\n{base64.encodebytes(b).decode()}-----END PRIVATE KEY-----\n"
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.text(max_size=300)
    | _PEM_BODY
    | st.integers(100, 1700).map(lambda n: key_pair("entra-app").key_pem[:n])
)
def test_fuzz_private_key_files(text: str) -> None:
    try:
        load_private_key(text, with_certificate=True)
    except ValueError as exc:
        assert str(exc).startswith("holds ")
        assert text[30:60] not in str(exc) or len(text) < 60


@settings(max_examples=200, deadline=None)
@given(st.lists(_JSON, max_size=3).map(tuple))
def test_fuzz_refusal_of_any_answer(args: tuple[Any, ...]) -> None:
    code, description = refusal(args)
    assert code is None or (code.isprintable() and 0 < len(code) <= 64)
    assert len(description) <= 203 and description.isprintable()


class _Canned(requests.adapters.BaseAdapter):
    """One canned HTTP answer for every request (below mailroom's session, above the wire)."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__()
        self.status, self.body = status, body

    def send(
        self, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        response = requests.Response()
        response.status_code, response._content = self.status, self.body
        response.headers["Content-Type"] = "application/json"
        response.request, response.url = request, str(request.url)
        return response

    def close(self) -> None:
        pass


_RETRIED = {"internal_failure", "server_error", "temporarily_unavailable"}  # google-auth retries
_ANSWER = st.dictionaries(
    st.sampled_from(["access_token", "expires_in", "error", "error_description", "token_type"]),
    _JSON.filter(lambda v: not (isinstance(v, str) and v in _RETRIED))
    | st.just("ya29.a0Af-token")
    | st.just(_MARKER),
    max_size=5,
)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([200, 400, 401, 403]), _ANSWER | st.binary(max_size=100))
def test_fuzz_token_endpoint_answers(status: int, answer: dict[str, Any] | bytes) -> None:
    body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
    config = parse_config(
        imap(
            {
                "provider": "google",
                "client_id": "c.apps.googleusercontent.com",
                "client_secret": SECRET,
                "refresh_token": REFRESH,
            }
        ),
        env={},
    ).mailboxes[0]
    assert isinstance(config, ImapMailboxConfig) and isinstance(config.oauth, GoogleOAuthConfig)
    session = requests.Session()
    session.mount("https://", _Canned(status, body))
    provider = GoogleTokenProvider(config.oauth, label="fuzz")
    issued = answer.get("access_token") if isinstance(answer, dict) else None
    try:
        with mock.patch("mailroom.trust.google.HttpSession", lambda *args: session):
            token = asyncio.run(provider.token())
    except TokenError as exc:
        assert SECRET not in str(exc) and REFRESH not in str(exc)
        said = (
            (answer.get("error"), answer.get("error_description"))
            if isinstance(answer, dict)
            else ()
        )
        if isinstance(issued, str) and len(issued) > 3 and issued not in said:
            assert issued not in str(exc)  # an access token never shows
    else:
        assert status == 200 and token == issued
    finally:
        session.close()
