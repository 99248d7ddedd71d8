"""YAML → a frozen, validated ``Config`` tree, built once.

Every string value may use ``${ENV_VAR}``; every secret ``x`` may instead be given as
``x_file`` (Docker/Kubernetes secrets). Unknown keys are errors, except ``x-`` keys (YAML
anchors) and deprecated names (read under their new ones, with a warning: ``compat``). A
``ConfigError`` names the dotted path (``mailboxes[1].port``) and says what to do; it never
contains a secret.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from mailroom.config import compat
from mailroom.config.document import load as load_yaml
from mailroom.config.mailboxes import (
    parse_mailbox,
)
from mailroom.config.model import (
    POLL_GRACE_S,
    ArbitrationConfig,
    BasicAuth,
    Config,
    CredentialsConfig,
    FolderMailboxConfig,
    GraphInboxOptions,
    GraphMailboxConfig,
    HealthConfig,
    ImapMailboxConfig,
    JwtConfig,
    LimitsConfig,
    LogConfig,
    LogFile,
    MailboxConfig,
    Readiness,
    RejectNoticesConfig,
    ReloadConfig,
    RetryConfig,
    SidekiqConfig,
    SmtpConfig,
    WebhookConfig,
    webhook_labels,
)
from mailroom.config.reader import Section, missing, shown
from mailroom.config.sample import SAMPLE_HINT
from mailroom.config.sections import (
    load_warnings,
    parse_arbitration,
    parse_health,
    parse_limits,
    parse_log,
    parse_reject_notices,
    parse_reload,
    parse_routing,
    parse_webhook,
)
from mailroom.errors import ConfigError, CredentialsError
from mailroom.trust import credentials
from mailroom.trust.values import (
    ClientCertificate,
    GoogleOAuthConfig,
    GoogleRefreshToken,
    GoogleServiceAccount,
    ImapOAuthConfig,
    OAuthConfig,
    Secret,
)

T = TypeVar("T")
U = TypeVar("U")

__all__ = [
    "POLL_GRACE_S",
    "ArbitrationConfig",
    "BasicAuth",
    "ClientCertificate",
    "Config",
    "ConfigError",
    "CredentialsConfig",
    "FolderMailboxConfig",
    "GoogleOAuthConfig",
    "GoogleRefreshToken",
    "GoogleServiceAccount",
    "GraphInboxOptions",
    "GraphMailboxConfig",
    "HealthConfig",
    "ImapMailboxConfig",
    "ImapOAuthConfig",
    "JwtConfig",
    "LimitsConfig",
    "LogConfig",
    "LogFile",
    "MailboxConfig",
    "OAuthConfig",
    "Readiness",
    "RejectNoticesConfig",
    "ReloadConfig",
    "RetryConfig",
    "Secret",
    "SidekiqConfig",
    "SmtpConfig",
    "WebhookConfig",
    "credentials_config",
    "load_config",
    "parse_config",
    "webhook_labels",
]


def parse_config(
    data: Any,
    *,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    offline: bool = False,
) -> Config:
    """Validate a loaded YAML document; relative ``*_file`` paths resolve from ``base_dir``.

    Unset ``${VAR}``s and unreadable ``*_file``s are reported all at once, before anything
    else: one ``ConfigError`` with a line for each. ``offline`` (``mailroom route``): no secret
    is read, nor needs to be set, and no CA file is loaded; the config must not be run.
    """
    env = os.environ if env is None else env
    base_dir = base_dir or Path.cwd()
    data, deprecations = compat.normalise(data)
    if problems := missing(data, env, base_dir, offline=offline):
        raise ConfigError.several(problems)
    root = Section(data, "", env, base_dir, offline=offline)
    webhook_raw = root.raw("webhook")
    top_webhook = parse_webhook(root.child(webhook_raw, "webhook"))
    mailboxes, credentials_settings, advice = _mailboxes(root, webhook_raw)
    notices, notice_address = None, None
    if (notices_section := root.section("reject_notices")) is not None:
        notices, notice_address = parse_reject_notices(notices_section)
    mailboxes = _with_routing(root, mailboxes, notice_address)
    config = Config(
        mailboxes=mailboxes,
        webhook=top_webhook,
        reject_notices=notices,
        log=_block(root, "log", parse_log, LogConfig()),
        health=_block(root, "health", parse_health, None),
        limits=_block(root, "limits", parse_limits, LimitsConfig()),
        arbitration=_block(root, "arbitration", parse_arbitration, ArbitrationConfig()),
        reload=_block(root, "reload", parse_reload, ReloadConfig()),
        shutdown_timeout_s=root.number("shutdown_timeout", 20.0, lo=0.1, hi=3600),
        warnings=deprecations + load_warnings(mailboxes, notices, top_webhook) + tuple(advice),
        credentials=credentials_settings,
    )
    root.done()
    return config


def _block(root: Section, key: str, parse: Callable[[Section], T], absent: U) -> T | U:
    """``parse`` of the block ``key``, or ``absent`` when it is not there (or null)."""
    section = root.section(key)
    return absent if section is None else parse(section)


def _mailboxes(
    root: Section, webhook_raw: dict[str, Any]
) -> tuple[tuple[MailboxConfig, ...], CredentialsConfig | None, list[str]]:
    """``mailboxes:``, each with a unique id, and the ``credentials:`` file their logins may
    come from, with advice about both."""
    raw_mailboxes = root.raw("mailboxes")
    if not isinstance(raw_mailboxes, list) or not raw_mailboxes:
        root.fail("mailboxes", "expected a list with at least one mailbox")
    settings, stored = None, None
    advice: list[str] = []
    if (credentials_section := root.section("credentials")) is not None:
        settings = _credentials_config(credentials_section)
        stored, advice = _load_credentials(settings, root.env)
    mailboxes = tuple(
        parse_mailbox(root.child(item, f"mailboxes[{i}]"), webhook_raw, i, stored)
        for i, item in enumerate(raw_mailboxes)
    )
    seen: set[str] = set()
    for i, mailbox in enumerate(mailboxes):
        if mailbox.id in seen:
            root.fail(
                f"mailboxes[{i}].id",
                f"{shown(mailbox.id)} is used twice; give each mailbox an id of its own",
            )
        seen.add(mailbox.id)
    advice += [
        f"credentials: the entry {name!r} matches no mailbox id; fix its name or remove it "
        "(mailroom credentials edit)"
        for name in sorted(set(stored or {}) - seen)
    ]
    return mailboxes, settings, advice


def _with_routing(
    root: Section, mailboxes: tuple[MailboxConfig, ...], notice_address: str | None
) -> tuple[MailboxConfig, ...]:
    """The mailboxes with the top-level ``routing:`` block in their rules, and the notices'
    sender among their own addresses (never send a notice to ourselves, nor loop: X-Loop)."""
    if notice_address is not None:
        mailboxes = tuple(
            replace(
                m,
                routing=replace(
                    m.routing, own_addresses=m.routing.own_addresses | {notice_address}
                ),
            )
            for m in mailboxes
        )
    if (routing_section := root.section("routing")) is not None:
        mode, forward_auto = parse_routing(routing_section)
        mailboxes = tuple(
            replace(m, routing=replace(m.routing, mode=mode, forward_auto_generated=forward_auto))
            for m in mailboxes
        )
    return mailboxes


def _credentials_config(section: Section) -> CredentialsConfig:
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
    data = read_yaml(Path(path))
    section = None
    if isinstance(data, dict):
        root = Section(data, "", os.environ if env is None else env, Path(path).parent)
        section = root.section("credentials")
    if section is None:
        raise ConfigError(
            "credentials",
            f"is not set in {path}; add credentials: {{file: mailroom.credentials, "
            "key_file: mailroom.key}} (or set MAILROOM_CREDENTIALS_KEY instead of key_file)",
        )
    return _credentials_config(section)


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None, *, offline: bool = False
) -> Config:
    """Read and validate a YAML config file (``offline``: see ``parse_config``)."""
    file = Path(path)
    return parse_config(read_yaml(file), env=env, base_dir=file.parent, offline=offline)


def read_yaml(file: Path) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError("", f"cannot read config file {file}: {reason}") from exc
    data = load_yaml(text, str(file))
    if data is None:
        raise ConfigError("", f"{file} is empty; {SAMPLE_HINT}")
    return data
