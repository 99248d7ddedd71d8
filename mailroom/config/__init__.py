"""YAML → a frozen, validated ``Config`` tree, built once.

Every string value may use ``${ENV_VAR}``; every secret ``x`` may instead be given as
``x_file`` (Docker/Kubernetes secrets). Unknown keys are errors, except ``x-`` keys (YAML
anchors) and deprecated names (read under their new ones, with a warning: ``compat``). A
``ConfigError`` names the dotted path (``mailboxes[1].port``) and says what to do; it never
contains a secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

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
    parse_reject_notices,
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
    raw_mailboxes = root.raw("mailboxes")
    if not isinstance(raw_mailboxes, list) or not raw_mailboxes:
        root.fail("mailboxes", "expected a list with at least one mailbox")
    credentials_settings, stored = None, None
    credentials_warnings: list[str] = []
    if (credentials_section := root.section("credentials")) is not None:
        credentials_settings = _credentials_config(credentials_section)
        stored, credentials_warnings = _load_credentials(credentials_settings, root.env)
    mailboxes = tuple(
        parse_mailbox(root.child(item, f"mailboxes[{i}]"), webhook_raw, i, stored)
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
                f"mailboxes[{i}].id",
                f"{shown(mailbox.id)} is used twice; give each mailbox an id of its own",
            )
        seen.add(mailbox.id)
    notices, notice_address = None, None
    if (notices_section := root.section("reject_notices")) is not None:
        notices, notice_address = parse_reject_notices(notices_section)
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
    if (routing_section := root.section("routing")) is not None:
        mode, forward_auto = parse_routing(routing_section)
        mailboxes = tuple(
            replace(m, routing=replace(m.routing, mode=mode, forward_auto_generated=forward_auto))
            for m in mailboxes
        )
    log = LogConfig()
    if (log_section := root.section("log")) is not None:
        file = log_section.text("file", None)
        log = LogConfig(
            format=log_section.choice("format", "json", ("json", "text")),
            level=log_section.choice("level", "info", ("debug", "info", "warning", "error")),
            files=() if file is None else (LogFile(path=str(log_section.base_dir / file)),),
        )
        log_section.done()
    health = None
    if (health_section := root.section("health")) is not None:
        health = parse_health(health_section)
    limits = LimitsConfig()
    if (limits_section := root.section("limits")) is not None:
        limits = parse_limits(limits_section)
    arbitration = ArbitrationConfig()
    if (arbitration_section := root.section("arbitration")) is not None:
        arbitration = parse_arbitration(arbitration_section)
    reload = ReloadConfig()
    if (reload_section := root.section("reload")) is not None:
        reload = ReloadConfig(
            watch=reload_section.flag("watch", False),
            interval_s=reload_section.number("interval", 2.0, lo=0.1, hi=3600),
        )
        reload_section.done()
    config = Config(
        mailboxes=mailboxes,
        webhook=top_webhook,
        log=log,
        shutdown_timeout_s=root.number("shutdown_timeout", 20.0, lo=0.1, hi=3600),
        reject_notices=notices,
        health=health,
        limits=limits,
        arbitration=arbitration,
        reload=reload,
        warnings=deprecations
        + load_warnings(mailboxes, notices, top_webhook)
        + tuple(credentials_warnings),
        credentials=credentials_settings,
    )
    root.done()
    return config


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
    if not isinstance(data, dict) or data.get("credentials") is None:
        raise ConfigError(
            "credentials",
            f"is not set in {path}; add credentials: {{file: mailroom.credentials, "
            "key_file: mailroom.key}} (or set MAILROOM_CREDENTIALS_KEY instead of key_file)",
        )
    root = Section(data, "", os.environ if env is None else env, Path(path).parent)
    section = root.section("credentials")
    assert section is not None
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
