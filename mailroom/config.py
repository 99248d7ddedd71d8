"""YAML → a frozen, validated ``Config`` tree, built once.

Every string value may use ``${ENV_VAR}``; every secret ``x`` may instead be given as
``x_file`` (Docker/Kubernetes secrets). Unknown keys are errors. A ``ConfigError`` names the
dotted path (``mailboxes[1].port``) and says what to do; it never contains a secret.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import urlsplit

import yaml

from mailroom import routing
from mailroom.errors import ConfigError

__all__ = [
    "BasicAuth",
    "Config",
    "ConfigError",
    "ImapMailboxConfig",
    "JwtConfig",
    "LogConfig",
    "RetryConfig",
    "Secret",
    "WebhookConfig",
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
    password: Secret = field(repr=False)
    auth: Literal["password"] = "password"
    mailbox: str = "INBOX"
    idle_timeout_s: float = 60.0
    search_command: str = "UNSEEN"
    delete_after_delivery: bool = True
    expunge_deleted: bool = False
    failed_folder: str | None = None
    max_message_bytes: int = 26_214_400
    webhook: WebhookConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    format: Literal["json", "text"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration."""

    mailboxes: tuple[ImapMailboxConfig, ...]
    webhook: WebhookConfig
    log: LogConfig = LogConfig()
    shutdown_timeout_s: float = 20.0


_REQUIRED: Any = object()
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
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


def _mailbox(section: _Section, webhook_raw: dict[str, Any], index: int) -> ImapMailboxConfig:
    method = section.choice("inbox_method", "imap", ("imap", "microsoft_graph"))
    if method != "imap":
        section.fail("inbox_method", "microsoft_graph is not supported by this version; use imap")
    try:
        address = routing.AddressTemplate.parse(section.text("address"))
    except ValueError as exc:
        section.fail("address", str(exc))
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
    if auth != "password":
        section.fail("auth", "xoauth2 is not supported by this version; use password")
    host = section.text("host")
    user = section.text("user")
    mailbox = section.text("mailbox", "INBOX")
    password = section.secret("password", required=True)
    assert password is not None
    merged = dict(webhook_raw)
    if (override := section.raw("webhook", None)) is not None:
        if not isinstance(override, dict):
            section.fail("webhook", f"expected a mapping of webhook keys, got {_kind(override)}")
        merged.update(override)
    webhook = _webhook(_Section(merged, section.where("webhook"), section.env, section.base_dir))
    config = ImapMailboxConfig(
        id=section.text("id", f"{user}@{host}/{mailbox}"),
        routing=routing.RoutingRules(address=address),
        host=host,
        port=port,
        ssl=ssl,
        start_tls=start_tls,
        tls_verify=section.flag("tls_verify", True),
        ca_file=section.path_value("ca_file"),
        user=user,
        password=password,
        auth="password",
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
    mailboxes = tuple(
        _mailbox(_Section(item, f"mailboxes[{i}]", root.env, root.base_dir), webhook_raw, i)
        for i, item in enumerate(raw_mailboxes)
    )
    seen: set[str] = set()
    for i, mailbox in enumerate(mailboxes):
        if mailbox.id in seen:
            root.fail(
                f"mailboxes[{i}].id", f"{mailbox.id!r} is used twice; give each mailbox an id"
            )
        seen.add(mailbox.id)
    log = LogConfig()
    if (log_section := root.section("log")) is not None:
        log = LogConfig(
            format=log_section.choice("format", "json", ("json", "text")),
            level=log_section.choice("level", "info", ("debug", "info", "warning", "error")),
        )
        log_section.done()
    config = Config(
        mailboxes=mailboxes,
        webhook=top_webhook,
        log=log,
        shutdown_timeout_s=root.number("shutdown_timeout", 20.0, lo=0.1, hi=3600),
    )
    root.done()
    return config


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file."""
    file = Path(path)
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
    return parse_config(data, env=env, base_dir=file.parent)
