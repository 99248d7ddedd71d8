"""YAML → a frozen, validated ``Config`` tree, built once.

Every string value may use ``${ENV_VAR}``; every secret ``x`` may instead be given as
``x_file`` (Docker/Kubernetes secrets). Unknown keys are errors. A ``ConfigError`` names the
dotted path (``mailboxes[1].port``) and says what to do; it never contains a secret.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

import yaml

from mailroom import credentials, routing
from mailroom.errors import ConfigError, CredentialsError

__all__ = [
    "BasicAuth",
    "Config",
    "ConfigError",
    "CredentialsConfig",
    "GraphInboxOptions",
    "GraphMailboxConfig",
    "HealthConfig",
    "ImapMailboxConfig",
    "JwtConfig",
    "LogConfig",
    "MailboxConfig",
    "OAuthConfig",
    "RejectNoticesConfig",
    "RetryConfig",
    "Secret",
    "SmtpConfig",
    "WebhookConfig",
    "credentials_config",
    "load_config",
    "parse_config",
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
class RetryConfig:
    """Capped exponential backoff for transient webhook failures."""

    initial_s: float = 1.0
    max_s: float = 600.0
    give_up_after_s: float | None = None  # None: never give up


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtConfig:
    """GitLab-compatible JWT header (HS256) on every webhook request."""

    header: str = "Gitlab-Mailroom-Api-Request"
    issuer: str = "gitlab-mailroom"
    algorithm: Literal["HS256"] = "HS256"
    secret: Secret = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class BasicAuth:
    user: str
    password: Secret = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookConfig:
    """Where and how messages are POSTed (ARCHITECTURE.md, Webhook contract)."""

    url: str
    format: Literal["json", "raw"] = "json"
    timeout_s: float = 30.0
    concurrency: int = 8
    signing_secret: Secret | None = field(default=None, repr=False)
    jwt: JwtConfig | None = None
    token: Secret | None = field(default=None, repr=False)
    basic: BasicAuth | None = None
    tls_verify: bool = True
    ca_file: str | None = None
    retry: RetryConfig = RetryConfig()


@dataclass(frozen=True, slots=True, kw_only=True)
class ImapMailboxConfig:
    """One IMAP mailbox, in the vocabulary of GitLab's ``incoming_email`` settings."""

    id: str
    routing: routing.RoutingRules  # the address template and the routing switches
    host: str
    port: int
    ssl: bool = False
    start_tls: bool = False
    tls_verify: bool = True
    ca_file: str | None = None
    user: str
    password: Secret | None = field(default=None, repr=False)  # None with auth: xoauth2
    auth: Literal["password", "xoauth2"] = "password"
    oauth: OAuthConfig | None = None  # the token source for auth: xoauth2
    mailbox: str = "INBOX"
    idle_timeout_s: float = 60.0
    search_command: str = "UNSEEN"
    delete_after_delivery: bool = True
    expunge_deleted: bool = False
    failed_folder: str | None = None
    max_message_bytes: int = 26_214_400
    webhook: WebhookConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthConfig:
    """An Entra ID app registration asking for client-credentials tokens (RFC 6749 §4.4)."""

    tenant_id: str
    client_id: str
    client_secret: Secret = field(repr=False)
    azure_ad_endpoint: str = "https://login.microsoftonline.com"  # authority host, no tenant
    scope: str = "https://outlook.office365.com/.default"
    ca_file: str | None = None  # trusted instead of the system store, for a private CA
    tls_verify: bool = True

    @property
    def authority(self) -> str:
        return f"{self.azure_ad_endpoint}/{self.tenant_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphInboxOptions:
    """``inbox_options`` of a Microsoft Graph mailbox (GitLab's names)."""

    tenant_id: str
    client_id: str
    client_secret: Secret = field(repr=False)
    poll_interval_s: float = 60.0
    azure_ad_endpoint: str = "https://login.microsoftonline.com"
    graph_endpoint: str = "https://graph.microsoft.com"
    ca_file: str | None = None  # for both endpoints; trusted instead of the system store
    tls_verify: bool = True

    @property
    def oauth(self) -> OAuthConfig:
        """The token source: the same app, scope ``<graph_endpoint>/.default``."""
        return OAuthConfig(
            tenant_id=self.tenant_id,
            client_id=self.client_id,
            client_secret=self.client_secret,
            azure_ad_endpoint=self.azure_ad_endpoint,
            scope=f"{self.graph_endpoint}/.default",
            ca_file=self.ca_file,
            tls_verify=self.tls_verify,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphMailboxConfig:
    """One Microsoft 365 mailbox read through Microsoft Graph (``microsoft_graph``)."""

    id: str
    routing: routing.RoutingRules
    user: str  # the mailbox's user principal name or object id
    mailbox: str = "inbox"  # a well-known folder name or a folder id
    delete_after_delivery: bool = False  # see README: Graph deletes are soft and then purged
    failed_folder: str | None = None  # None: category MailroomFailed and isRead
    max_message_bytes: int = 26_214_400
    webhook: WebhookConfig
    inbox_options: GraphInboxOptions


MailboxConfig = ImapMailboxConfig | GraphMailboxConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpConfig:
    """The SMTP server that reject notices are sent through."""

    host: str
    port: int
    ssl: bool = False  # implicit TLS (port 465)
    start_tls: bool = False
    tls_verify: bool = True
    ca_file: str | None = None
    user: str | None = None
    password: Secret | None = field(default=None, repr=False)
    timeout_s: float = 30.0


# A notice holds its message unsettled while it is retried: give up after a day by default.
NOTICE_RETRY = RetryConfig(initial_s=5.0, max_s=600.0, give_up_after_s=86_400.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectNoticesConfig:
    """``reject_notices:``; absent (or ``enabled: false``) means no notices are sent."""

    sender: str  # the notice's From: "Example <noreply@example.com>" (config key `from`)
    sender_address: str  # its addr-spec; also one of our own addresses
    smtp: SmtpConfig
    require_authenticated_sender: bool = False
    trusted_authserv_ids: frozenset[str] = frozenset()
    footer: str = ""
    retry: RetryConfig = NOTICE_RETRY  # give_up_after_s is never None here


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialsConfig:
    """``credentials:``: the encrypted file of mailbox logins and the file holding its key.

    Paths are absolute. Without ``key_file`` the key comes from ``MAILROOM_CREDENTIALS_KEY``,
    which also wins when both are given (``mailroom.credentials.load_key``).
    """

    file: str
    key_file: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    format: Literal["json", "text"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    """``health:`` where ``/healthz``, ``/readyz`` and ``/metrics`` are served."""

    host: str = "127.0.0.1"  # config key `listen: "host:port"`
    port: int = 8080  # 0: any free port (logged)
    stall_after_s: float = 300.0  # the dispatcher is stalled: no progress for this long


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration."""

    mailboxes: tuple[MailboxConfig, ...]
    webhook: WebhookConfig
    log: LogConfig = LogConfig()
    shutdown_timeout_s: float = 20.0
    reject_notices: RejectNoticesConfig | None = None  # None: notices are off
    health: HealthConfig | None = None  # None (absent or null): no health server
    warnings: tuple[str, ...] = ()  # advice found at load, "<dotted.path>: ..."; log them
    credentials: CredentialsConfig | None = None  # where user/password came from, if anywhere


_REQUIRED: Any = object()
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HOST_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")
# RFC 2177 §3: clients should re-issue IDLE at least every 29 minutes.
IDLE_TIMEOUT_MAX_S = 1740


class _Section:
    """One mapping of the YAML tree: typed getters that know their dotted path."""

    def __init__(self, data: Any, path: str, env: Mapping[str, str], base_dir: Path) -> None:
        if not isinstance(data, dict):
            self._fail(path, f"expected a mapping of keys, got {_kind(data)}")
        self.data: dict[str, Any] = data
        self.path = path
        self.env = env
        self.base_dir = base_dir
        self.used: set[str] = set()

    @staticmethod
    def _fail(path: str, message: str) -> NoReturn:
        raise ConfigError(path, message)

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> NoReturn:
        self._fail(self.where(key), message)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                self.fail(key, "is required")
            return default
        if isinstance(value, str):
            value = self._expand(key, value)
        return value

    def _expand(self, key: str, value: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.env:
                self.fail(
                    key, f"environment variable {name} is not set; export it or edit the file"
                )
            return self.env[name]

        return _ENV_RE.sub(substitute, value)

    def text(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.raw(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.fail(key, f"expected a string, got {_kind(value)}")
        text = str(value)
        if not text.strip():
            self.fail(key, "must not be empty")
        if any(c in text for c in "\r\n\0"):
            self.fail(key, "must be one line (no CR, LF or NUL)")
        return text

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        self.fail(key, f"expected true or false, got {value!r}")

    def number(self, key: str, default: Any, *, lo: float, hi: float, integer: bool = False) -> Any:
        value = self.raw(key, default)
        if value is None:
            return None
        try:
            if isinstance(value, bool):
                raise ValueError
            number: float = int(value) if integer else float(value)
        except (TypeError, ValueError):
            kind = "a whole number" if integer else "a number"
            self.fail(key, f"expected {kind}, got {value!r}")
        if not lo <= number <= hi:
            self.fail(key, f"{number:g} is out of range; use a value from {lo:g} to {hi:g}")
        return number

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> Any:
        value = self.text(key, default)
        if value not in choices:
            self.fail(key, f"{value!r} is not one of: {', '.join(choices)}")
        return value

    def path_value(self, key: str) -> str | None:
        value = self.text(key, None)
        if value is None:
            return None
        resolved = (self.base_dir / value).resolve()
        if not resolved.is_file():
            self.fail(key, f"file {value} does not exist or is not a file")
        return str(resolved)

    def secret(self, key: str, *, required: bool) -> Secret | None:
        file_key = f"{key}_file"
        inline, from_file = self.has(key), self.has(file_key)
        if inline and from_file:
            self.fail(key, f"give either {key} or {file_key}, not both")
        if from_file:
            path = self.base_dir / self.text(file_key)
            try:
                text = path.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                self.fail(file_key, f"cannot read {path}: {reason}")
            if not text:
                self.fail(file_key, f"{path} is empty")
            return Secret(text)
        if inline:
            self.used.add(key)
            value = self.data[key]
            if not isinstance(value, str | int) or isinstance(value, bool):
                self.fail(key, f"expected a string, got {_kind(value)}")
            return Secret(self._expand(key, str(value)))
        self.used.update((key, file_key))
        if required:
            self.fail(key, f"is required (or {file_key} naming a file that holds it)")
        return None

    def section(self, key: str) -> _Section | None:
        value = self.raw(key, None)
        if value is None:
            return None
        return _Section(value, self.where(key), self.env, self.base_dir)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            self.fail(unknown[0], f"unknown key; known keys here: {known}")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "true/false", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )


def _webhook(section: _Section) -> WebhookConfig:
    url = section.text("url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        section.fail("url", f"{url!r} is not an http(s) URL; write it as https://host/path")
    fmt = section.choice("format", "json", ("json", "raw"))
    jwt = None
    if (jwt_section := section.section("jwt")) is not None:
        secret = jwt_section.secret("secret", required=True)
        assert secret is not None
        jwt = JwtConfig(
            header=jwt_section.text("header", "Gitlab-Mailroom-Api-Request"),
            issuer=jwt_section.text("issuer", "gitlab-mailroom"),
            algorithm=jwt_section.choice("algorithm", "HS256", ("HS256",)),
            secret=secret,
        )
        jwt_section.done()
    basic = None
    if (basic_section := section.section("basic")) is not None:
        password = basic_section.secret("password", required=True)
        assert password is not None
        basic = BasicAuth(user=basic_section.text("user"), password=password)
        basic_section.done()
    token = section.secret("token", required=False)
    if token is not None and basic is not None:
        section.fail("token", "give either token (Bearer) or basic, not both")
    signing_secret = section.secret("signing_secret", required=False)
    if signing_secret is not None:
        _check_whsec(section, signing_secret)
    retry = RetryConfig()
    if (retry_section := section.section("retry")) is not None:
        retry = RetryConfig(
            initial_s=retry_section.number("initial", 1.0, lo=0.01, hi=3600),
            max_s=retry_section.number("max", 600.0, lo=0.01, hi=86400),
            give_up_after_s=retry_section.number("give_up_after", None, lo=1, hi=365 * 86400),
        )
        if retry.max_s < retry.initial_s:
            retry_section.fail("max", "must be at least retry.initial")
        retry_section.done()
    config = WebhookConfig(
        url=url,
        format=fmt,
        timeout_s=section.number("timeout", 30.0, lo=0.1, hi=3600),
        concurrency=section.number("concurrency", 8, lo=1, hi=1024, integer=True),
        signing_secret=signing_secret,
        jwt=jwt,
        token=token,
        basic=basic,
        tls_verify=section.flag("tls_verify", True),
        ca_file=section.path_value("ca_file"),
        retry=retry,
    )
    section.done()
    return config


def _check_whsec(section: _Section, secret: Secret) -> None:
    value = secret.reveal()
    try:
        key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        key = b""
    if not value.startswith("whsec_") or len(key) < 16:
        section.fail(
            "signing_secret",
            "must be a Standard Webhooks secret: 'whsec_' + base64 of 24 to 64 random bytes "
            '(make one with: python -c "import os,base64;'
            "print('whsec_'+base64.b64encode(os.urandom(32)).decode())\")",
        )


def _stored_login(
    section: _Section, stored: Mapping[str, credentials.StoredLogin] | None
) -> credentials.StoredLogin | None:
    """This mailbox's entry in the credentials file, found by its explicit ``id``."""
    if stored is None or not section.has("id"):
        return None
    return stored.get(str(section.raw("id")))


def _user(section: _Section, login: credentials.StoredLogin | None, *, stored: bool) -> str:
    """``user`` from the config, else from the credentials file."""
    if section.has("user") or login is None or login.user is None:
        if not section.has("user") and stored:
            section.fail(
                "user",
                "is required: in the config, or in the credentials file under this mailbox's id "
                "(give the mailbox an id)",
            )
        return str(section.text("user"))
    section.used.add("user")
    return login.user


def _mailbox(
    section: _Section,
    webhook_raw: dict[str, Any],
    index: int,
    stored: Mapping[str, credentials.StoredLogin] | None = None,
) -> MailboxConfig:
    method = section.choice("inbox_method", "imap", ("imap", "microsoft_graph"))
    try:
        address = routing.AddressTemplate.parse(section.text("address"))
    except ValueError as exc:
        section.fail("address", str(exc))
    login = _stored_login(section, stored)
    if method == "microsoft_graph":
        if login is not None and login.password is not None:
            section.fail(
                "id",
                "the credentials file gives this microsoft_graph mailbox a password; it takes "
                "only user there (its secret is inbox_options.client_secret)",
            )
        user = _user(section, login, stored=stored is not None)
        return _graph_mailbox(section, address, webhook_raw, user)
    ssl = section.flag("ssl", False)
    start_tls = section.flag("start_tls", False)
    if ssl and start_tls:
        section.fail("start_tls", "ssl (implicit TLS) and start_tls exclude each other; pick one")
    port = section.number("port", 993 if ssl else 143, lo=1, hi=65535, integer=True)
    if port == 993 and not ssl:
        section.fail("port", "993 with ssl: false; set ssl: true or use port 143")
    if port == 143 and ssl:
        section.fail("port", "143 with ssl: true; use port 993, or ssl: false with start_tls: true")
    auth = section.choice("auth", "password", ("password", "xoauth2"))
    host = section.text("host")
    user = _user(section, login, stored=stored is not None)
    mailbox = section.text("mailbox", "INBOX")
    from_file = login.password if login is not None else None
    password = section.secret("password", required=auth == "password" and from_file is None)
    if password is None and from_file is not None:
        if auth == "xoauth2":
            section.fail(
                "auth",
                "is xoauth2, but the credentials file gives this mailbox a password; remove it "
                "there (the token comes from the oauth block)",
            )
        password = Secret(from_file)
    oauth = None
    if auth == "xoauth2":
        if password is not None:
            section.fail("password", "auth: xoauth2 gets its token from the oauth block; remove it")
        if (oauth_section := section.section("oauth")) is None:
            section.fail("oauth", "is required with auth: xoauth2 (tenant_id, client_id, ...)")
        oauth = _oauth(oauth_section, scope=None)
        oauth_section.done()
    elif section.has("oauth"):
        section.fail("oauth", "is used only with auth: xoauth2; set auth: xoauth2 or remove it")
    webhook = _mailbox_webhook(section, webhook_raw)
    config = ImapMailboxConfig(
        id=section.text("id", f"{user}@{host}/{mailbox}"),
        routing=_routing_rules(section, address, user),
        host=host,
        port=port,
        ssl=ssl,
        start_tls=start_tls,
        tls_verify=section.flag("tls_verify", True),
        ca_file=section.path_value("ca_file"),
        user=user,
        password=password,
        auth=auth,
        oauth=oauth,
        mailbox=mailbox,
        idle_timeout_s=section.number("idle_timeout", 60.0, lo=1, hi=IDLE_TIMEOUT_MAX_S),
        search_command=section.text("search_command", "UNSEEN"),
        delete_after_delivery=section.flag("delete_after_delivery", True),
        expunge_deleted=section.flag("expunge_deleted", False),
        failed_folder=section.text("failed_folder", None),
        max_message_bytes=section.number(
            "max_message_bytes", 26_214_400, lo=1024, hi=2**31, integer=True
        ),
        webhook=webhook,
    )
    section.done()
    return config


def _mailbox_webhook(section: _Section, webhook_raw: dict[str, Any]) -> WebhookConfig:
    """The top-level webhook with this mailbox's ``webhook:`` keys laid over it."""
    merged = dict(webhook_raw)
    if (override := section.raw("webhook", None)) is not None:
        if not isinstance(override, dict):
            section.fail("webhook", f"expected a mapping of webhook keys, got {_kind(override)}")
        merged.update(override)
    return _webhook(_Section(merged, section.where("webhook"), section.env, section.base_dir))


def _https_endpoint(section: _Section, key: str, default: str) -> str:
    """An https base URL without a trailing slash (msal accepts only https authorities)."""
    url = str(section.text(key, default)).rstrip("/")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
        section.fail(key, f"{url!r} is not an https base URL; write it like {default}")
    return url


def _oauth(section: _Section, *, scope: str | None) -> OAuthConfig:
    """``oauth:`` of an IMAP mailbox (``scope`` read from it) or a Graph mailbox's options."""
    tenant_id = section.text("tenant_id")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", tenant_id):
        section.fail("tenant_id", f"{tenant_id!r} is not a tenant id or domain (Entra portal)")
    secret = section.secret("client_secret", required=True)
    assert secret is not None
    return OAuthConfig(
        tenant_id=tenant_id,
        client_id=section.text("client_id"),
        client_secret=secret,
        azure_ad_endpoint=_https_endpoint(
            section, "azure_ad_endpoint", "https://login.microsoftonline.com"
        ),
        scope=scope or section.text("scope", "https://outlook.office365.com/.default"),
        ca_file=section.path_value("ca_file"),
        tls_verify=section.flag("tls_verify", True),
    )


def _graph_mailbox(
    section: _Section, address: routing.AddressTemplate, webhook_raw: dict[str, Any], user: str
) -> GraphMailboxConfig:
    """``inbox_method: microsoft_graph``: GitLab's keys, with ``inbox_options``."""
    for key in ("host", "port", "ssl", "start_tls", "password", "password_file", "auth"):
        if section.has(key):
            section.fail(key, "is an IMAP setting; a microsoft_graph mailbox uses inbox_options")
    if (options_section := section.section("inbox_options")) is None:
        section.fail("inbox_options", "is required with inbox_method: microsoft_graph")
    graph_endpoint = _https_endpoint(
        options_section, "graph_endpoint", "https://graph.microsoft.com"
    )
    oauth = _oauth(options_section, scope=f"{graph_endpoint}/.default")
    options = GraphInboxOptions(
        tenant_id=oauth.tenant_id,
        client_id=oauth.client_id,
        client_secret=oauth.client_secret,
        poll_interval_s=options_section.number("poll_interval", 60.0, lo=0.1, hi=86_400),
        azure_ad_endpoint=oauth.azure_ad_endpoint,
        graph_endpoint=graph_endpoint,
        ca_file=oauth.ca_file,
        tls_verify=oauth.tls_verify,
    )
    options_section.done()
    mailbox = section.text("mailbox", "inbox")
    config = GraphMailboxConfig(
        id=section.text("id", f"{user}@graph/{mailbox}"),
        routing=_routing_rules(section, address, user),
        user=user,
        mailbox=mailbox,
        delete_after_delivery=section.flag("delete_after_delivery", False),
        failed_folder=section.text("failed_folder", None),
        max_message_bytes=section.number(
            "max_message_bytes", 26_214_400, lo=1024, hi=2**31, integer=True
        ),
        webhook=_mailbox_webhook(section, webhook_raw),
        inbox_options=options,
    )
    section.done()
    return config


def _address(section: _Section, key: str, value: str) -> str:
    """The addr-spec of ``value`` (``Name <a@b>`` or ``a@b``), or a ConfigError."""
    address = email.utils.parseaddr(value)[1]
    if "@" not in address or not address.partition("@")[0] or " " in address:
        section.fail(key, f"{value!r} is not an email address; write it like noreply@example.com")
    return address


def _routing_rules(
    section: _Section, address: routing.AddressTemplate, user: str
) -> routing.RoutingRules:
    """``reply_host``, ``ignore_auto_generated`` and ``own_addresses`` of one mailbox."""
    reply_host = section.text("reply_host", None)
    if reply_host is not None and not _HOST_RE.fullmatch(reply_host.lower()):
        section.fail("reply_host", f"{reply_host!r} is not a host name; write it like example.com")
    enabled = set(routing.AUTO_GENERATED_RULES)
    if (rules := section.section("ignore_auto_generated")) is not None:
        known = ", ".join(routing.AUTO_GENERATED_RULES)
        for name in rules.data:
            if name not in routing.AUTO_GENERATED_RULES:
                rules.fail(str(name), f"unknown rule; known rules: {known}")
            if not rules.flag(name, True):
                enabled.discard(name)
        rules.done()
    own = {user} if "@" in user else set()
    raw_own = section.raw("own_addresses", [])
    if not isinstance(raw_own, list):
        section.fail("own_addresses", f"expected a list of addresses, got {_kind(raw_own)}")
    for i, item in enumerate(raw_own):
        if not isinstance(item, str):
            section.fail(f"own_addresses[{i}]", f"expected an address, got {_kind(item)}")
        own.add(_address(section, f"own_addresses[{i}]", section._expand("own_addresses", item)))
    return routing.RoutingRules(
        address=address,
        reply_host=reply_host,
        ignore_auto_generated=frozenset(enabled),
        own_addresses=frozenset(own),
    )


def _smtp(section: _Section) -> SmtpConfig:
    ssl = section.flag("ssl", False)
    start_tls = section.flag("start_tls", False)
    if ssl and start_tls:
        section.fail("start_tls", "ssl (implicit TLS) and start_tls exclude each other; pick one")
    default_port = 465 if ssl else 587 if start_tls else 25
    port = section.number("port", default_port, lo=1, hi=65535, integer=True)
    if port == 465 and not ssl:
        section.fail("port", "465 with ssl: false; set ssl: true or use port 587 with start_tls")
    if port in (25, 587) and ssl:
        section.fail(
            "port", f"{port} with ssl: true; use port 465, or ssl: false with start_tls: true"
        )
    user = section.text("user", None)
    password = section.secret("password", required=user is not None)
    if password is not None and user is None:
        section.fail("user", "is required with a password; give both or neither")
    config = SmtpConfig(
        host=section.text("host"),
        port=port,
        ssl=ssl,
        start_tls=start_tls,
        tls_verify=section.flag("tls_verify", True),
        ca_file=section.path_value("ca_file"),
        user=user,
        password=password,
        timeout_s=section.number("timeout", 30.0, lo=0.1, hi=600),
    )
    section.done()
    return config


def _reject_notices(section: _Section) -> tuple[RejectNoticesConfig | None, str | None]:
    """The notices config (None with ``enabled: false``) and the ``from`` address, if given."""
    enabled = section.flag("enabled", True)
    sender = section.text("from", _REQUIRED if enabled else None)
    sender_address = None if sender is None else _address(section, "from", sender)
    smtp_section = section.section("smtp")
    if smtp_section is None and enabled:
        section.fail(
            "smtp", "is required, like {host: smtp.example.com, port: 587, start_tls: true}"
        )
    smtp = None if smtp_section is None else _smtp(smtp_section)
    raw_ids = section.raw("trusted_authserv_ids", [])
    if not isinstance(raw_ids, list) or not all(isinstance(i, str) and i for i in raw_ids):
        section.fail("trusted_authserv_ids", "expected a list of host names, like [mx.example.com]")
    retry = NOTICE_RETRY
    if (retry_section := section.section("retry")) is not None:
        retry = RetryConfig(
            initial_s=retry_section.number("initial", retry.initial_s, lo=0.01, hi=3600),
            max_s=retry_section.number("max", retry.max_s, lo=0.01, hi=86400),
            # The message waits for its notice: never for ever (null means the default).
            give_up_after_s=retry_section.number(
                "give_up_after", retry.give_up_after_s, lo=1, hi=30 * 86400
            ),
        )
        if retry.max_s < retry.initial_s:
            retry_section.fail("max", "must be at least retry.initial")
        retry_section.done()
    require_authenticated_sender = section.flag("require_authenticated_sender", False)
    footer = section.raw("footer", "")
    if not isinstance(footer, str):
        section.fail("footer", f"expected text, got {_kind(footer)}")
    section.done()
    if not enabled:
        return None, sender_address
    assert sender is not None and sender_address is not None and smtp is not None
    config = RejectNoticesConfig(
        sender=sender,
        sender_address=sender_address,
        smtp=smtp,
        require_authenticated_sender=require_authenticated_sender,
        trusted_authserv_ids=frozenset(
            section._expand("trusted_authserv_ids", i).lower() for i in raw_ids
        ),
        footer=footer,
        retry=retry,
    )
    return config, sender_address


def _warnings(
    mailboxes: tuple[MailboxConfig, ...], notices: RejectNoticesConfig | None
) -> tuple[str, ...]:
    """Advice that is not an error, each ``<dotted.path>: <what and what to do>``."""
    found = [
        f"mailboxes[{i}].address: {text}"
        for i, mailbox in enumerate(mailboxes)
        for text in routing.warnings(mailbox.routing.address)
    ]
    smtp = notices.smtp if notices is not None else None
    if smtp is not None and smtp.user and not (smtp.ssl or smtp.start_tls):
        found.append(
            "reject_notices.smtp.user: the SMTP password would cross the network in clear text; "
            "set start_tls: true (port 587) or ssl: true (port 465)"
        )
    return tuple(found)


def _health(section: _Section) -> HealthConfig:
    """``health: {listen: "host:port", stall_after: seconds}``."""
    listen = str(section.text("listen", "127.0.0.1:8080"))
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:8080
    if not host or not port.isdigit() or int(port) > 65535:
        section.fail("listen", f"{listen!r} is not host:port; write it like 127.0.0.1:8080")
    config = HealthConfig(
        host=host,
        port=int(port),
        stall_after_s=section.number("stall_after", 300.0, lo=1, hi=86_400),
    )
    section.done()
    return config


def parse_config(
    data: Any, *, env: Mapping[str, str] | None = None, base_dir: Path | None = None
) -> Config:
    """Validate a loaded YAML document; relative ``*_file`` paths resolve from ``base_dir``."""
    root = _Section(data, "", os.environ if env is None else env, base_dir or Path.cwd())
    webhook_raw = root.raw("webhook")
    top_webhook = _webhook(_Section(webhook_raw, "webhook", root.env, root.base_dir))
    raw_mailboxes = root.raw("mailboxes")
    if not isinstance(raw_mailboxes, list) or not raw_mailboxes:
        root.fail("mailboxes", "expected a list with at least one mailbox")
    credentials_settings, stored = None, None
    credentials_warnings: list[str] = []
    if (credentials_section := root.section("credentials")) is not None:
        credentials_settings = _credentials_config(credentials_section)
        stored, credentials_warnings = _load_credentials(credentials_settings, root.env)
    mailboxes = tuple(
        _mailbox(_Section(item, f"mailboxes[{i}]", root.env, root.base_dir), webhook_raw, i, stored)
        for i, item in enumerate(raw_mailboxes)
    )
    credentials_warnings += [
        f"credentials: the entry {name!r} matches no mailbox id; fix its name or remove it "
        "(mailroom credentials edit)"
        for name in sorted(set(stored or {}) - {m.id for m in mailboxes})
    ]
    seen: set[str] = set()
    for i, mailbox in enumerate(mailboxes):
        if mailbox.id in seen:
            root.fail(
                f"mailboxes[{i}].id", f"{mailbox.id!r} is used twice; give each mailbox an id"
            )
        seen.add(mailbox.id)
    notices, notice_address = None, None
    if (notices_section := root.section("reject_notices")) is not None:
        notices, notice_address = _reject_notices(notices_section)
    if notice_address is not None:  # never send a notice to ourselves (nor loop: X-Loop)
        mailboxes = tuple(
            replace(
                m,
                routing=replace(
                    m.routing, own_addresses=m.routing.own_addresses | {notice_address}
                ),
            )
            for m in mailboxes
        )
    log = LogConfig()
    if (log_section := root.section("log")) is not None:
        log = LogConfig(
            format=log_section.choice("format", "json", ("json", "text")),
            level=log_section.choice("level", "info", ("debug", "info", "warning", "error")),
        )
        log_section.done()
    health = None
    if (health_section := root.section("health")) is not None:
        health = _health(health_section)
    config = Config(
        mailboxes=mailboxes,
        webhook=top_webhook,
        log=log,
        shutdown_timeout_s=root.number("shutdown_timeout", 20.0, lo=0.1, hi=3600),
        reject_notices=notices,
        health=health,
        warnings=_warnings(mailboxes, notices) + tuple(credentials_warnings),
        credentials=credentials_settings,
    )
    root.done()
    return config


def _credentials_config(section: _Section) -> CredentialsConfig:
    key_file = section.text("key_file", None)
    config = CredentialsConfig(
        file=str((section.base_dir / section.text("file")).resolve()),
        key_file=None if key_file is None else str((section.base_dir / key_file).resolve()),
    )
    section.done()
    return config


def _load_credentials(
    config: CredentialsConfig, env: Mapping[str, str]
) -> tuple[dict[str, credentials.StoredLogin], list[str]]:
    """The decrypted logins, and advice about the key file."""
    try:
        key = credentials.load_key(key_file=config.key_file, env=env)
        logins = credentials.read(Path(config.file), key)
    except CredentialsError as exc:
        raise ConfigError("credentials", str(exc)) from exc
    advice = []
    if (
        config.key_file is not None
        and key.source != credentials.KEY_ENV
        and (warning := credentials.key_file_warning(config.key_file)) is not None
    ):
        advice.append(f"credentials.key_file: {warning}")
    return logins, advice


def credentials_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> CredentialsConfig:
    """Only the ``credentials:`` block of a config file, for ``mailroom credentials``: it
    must work before the credentials exist, when the whole config cannot load yet."""
    data = _read_yaml(Path(path))
    if not isinstance(data, dict) or data.get("credentials") is None:
        raise ConfigError(
            "credentials",
            f"is not set in {path}; add credentials: {{file: mailroom.credentials, "
            "key_file: mailroom.key}} (or set MAILROOM_CREDENTIALS_KEY instead of key_file)",
        )
    root = _Section(data, "", os.environ if env is None else env, Path(path).parent)
    section = root.section("credentials")
    assert section is not None
    return _credentials_config(section)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file."""
    file = Path(path)
    return parse_config(_read_yaml(file), env=env, base_dir=file.parent)


def _read_yaml(file: Path) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError("", f"cannot read config file {file}: {reason}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError("", f"{file}: {problem}{where}; fix the YAML syntax") from exc
    if data is None:
        raise ConfigError("", f"{file} is empty; see examples/mailroom.yml")
    return data
