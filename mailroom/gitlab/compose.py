"""Foreign settings (GitLab's gitlab.yml, MailRoom's mail_room.yml) → a mailroom ``Config``.

The readers translate what they find into mailroom's own YAML tree and let ``parse_config``
validate it, so both modes get every check the config file gets. A ``ConfigError`` is then
told in the words of the file the value came from (``gitlab.yml: production.incoming_email.port``
instead of ``mailboxes[0].port``). Passwords and client secrets are put into the validated tree
afterwards: a GitLab value is taken literally, never ``${ENV}``-expanded.

An optional small mailroom YAML (``-c``) adds what the foreign file cannot say: ``log``,
``health``, ``reject_notices``, ``shutdown_timeout``, ``routing``, webhook transport settings
(``timeout``, ``concurrency``, ``retry``, ``tls_verify``, ``ca_file``, ``signing_secret``) and,
under ``mailboxes: {<id>: {...}}``, per-mailbox keys such as ``failed_folder`` or ``ca_file``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mailroom.config import (
    Config,
    LogFile,
    MailboxConfig,
    Secret,
    parse_config,
    read_yaml,
)
from mailroom.errors import ConfigError
from mailroom.gitlab.redis import GitLabRedis, arbitration_block
from mailroom.redact import key_name

__all__ = [
    "PLACEHOLDER",
    "ForeignMailbox",
    "build",
    "literal",
    "overlay_arbitration",
    "read_overlay",
    "secret_text",
    "sidekiq_tree",
    "with_log_files",
]

PLACEHOLDER = "(set after validation)"  # stands in for a secret while parse_config runs
# What the foreign file decides in these modes; the -c file may not change it.
_WEBHOOK_FIXED = ("url", "format", "content_type", "jwt", "token", "token_scheme", "basic")
STREAMS = frozenset({"/dev/stdout", "/dev/stderr"})
_ENV = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")
_MAILBOX_PATH = re.compile(r"mailboxes\[(\d+)\](?:\.(.*))?")


@dataclass(frozen=True, slots=True, kw_only=True)
class ForeignMailbox:
    """Where one mailbox's settings came from, to tell errors in that file's words.

    ``keys`` maps a mailroom path under the mailbox (``webhook.url``) to the foreign key
    (``gitlab_url``); ``secret`` (the password or client secret its kind takes) is injected
    after validation.
    """

    id: str  # the mailbox id
    file: Path
    prefix: str  # production.incoming_email, or :mailboxes:[0]
    keys: Mapping[str, str] = field(default_factory=dict)
    secret: str | None = field(default=None, repr=False)
    sidekiq_redis: GitLabRedis | None = field(default=None, repr=False)  # its passwords


def literal(source: ForeignMailbox, key: str, value: Any) -> Any:
    """``value`` for the mailroom tree; a ``${NAME}`` in it would be expanded there, but the
    foreign program reads it literally: refuse it instead of guessing."""
    if isinstance(value, str) and _ENV.search(value):
        raise ConfigError(
            f"{source.file}: {source.prefix}.{key}",
            "contains ${...}, which mailroom would expand but GitLab and MailRoom take "
            "literally; write the value itself",
        )
    return value


def secret_text(value: Any, where: str) -> str | None:
    """A password or client secret of the foreign file, which bypasses the YAML tree (nothing
    there checks it): text, or None when absent."""
    if value is not None and not isinstance(value, str):
        raise ConfigError(where, "expected a string; put the value in quotes")
    return value


def read_overlay(overlay: Path | None) -> dict[str, Any]:
    """The optional mailroom YAML (``-c``) as a mapping; ``{}`` without one."""
    extra: dict[str, Any] = read_yaml(overlay) if overlay is not None else {}
    if not isinstance(extra, dict):
        raise ConfigError(str(overlay), "expected a mapping of mailroom keys (log, health, ...)")
    return extra


def overlay_arbitration(top: dict[str, Any], extra: dict[str, Any], block: dict[str, Any]) -> bool:
    """Put the foreign file's Redis ``block`` in ``top``, under the ``-c`` file's ``arbitration:``
    settings when it has no ``method`` (``mail_room_claims: false``, ``lease_ttl``); False when
    the ``-c`` file names a Redis of its own (or ``method: none``) instead."""
    named = extra.get("arbitration")
    if isinstance(named, dict) and "method" in named:
        return False
    top["arbitration"] = {**block, **(extra.pop("arbitration", None) or {})}
    return True


def with_log_files(config: Config, named: list[tuple[Path, str, str]]) -> Config:
    """``config`` logging to the foreign file's log files as well: ``(path, mailbox id, the
    setting it came from)``, one file per path with the lines of the mailboxes naming it."""
    by_path: dict[Path, tuple[set[str], str]] = {}
    for path, mailbox, origin in named:
        if str(path) in STREAMS:
            continue  # the chart's default: mailroom logs to its stream already
        by_path.setdefault(path, (set(), origin))[0].add(mailbox)
    every = {m.id for m in config.mailboxes}
    files = tuple(
        LogFile(path=str(path), mailboxes=None if ids == every else frozenset(ids), origin=origin)
        for path, (ids, origin) in by_path.items()
    )
    return replace(config, log=replace(config.log, files=config.log.files + files))


def sidekiq_tree(
    redis: GitLabRedis, queue: Any, worker: Any, namespace: Any = None
) -> dict[str, Any]:
    """The ``webhook:`` tree of a ``delivery_method: sidekiq`` mailbox pushing to ``redis``
    (its passwords go in after validation, from the mailbox's ``Source.sidekiq_redis``)."""
    connection = {
        k: v
        for k, v in arbitration_block(redis).items()
        if k not in ("method", "namespace", "mail_room_claims", "mail_room_namespace")
    }
    tree = {**connection, "queue": queue, "worker": worker}
    if namespace is not None:
        tree["namespace"] = namespace
    return {"format": "raw", "sidekiq": tree}


def build(
    mailboxes: list[dict[str, Any]],
    sources: list[ForeignMailbox],
    *,
    top: dict[str, Any],
    overlay: Path | None,
    extra: Mapping[str, Any],
    env: Mapping[str, str],
    warnings: tuple[str, ...] = (),
    log_files: list[tuple[Path, str, str]] | None = None,
    redis: GitLabRedis | None = None,
) -> Config:
    """Validate ``mailboxes`` (mailroom's YAML, one per ``sources`` entry) with the top-level
    keys ``top`` and ``extra``, the optional mailroom YAML ``overlay`` (``read_overlay``),
    laid over them; then the foreign file's log files (``with_log_files``) and the passwords of
    its arbitration ``redis``, which never go through the YAML tree."""
    extra = dict(extra)
    per_mailbox = _overlay_mailboxes(extra, overlay, [s.id for s in sources])
    hook = _overlay_webhook(extra, overlay)
    if "credentials" in extra:
        raise ConfigError(
            f"{overlay}: credentials", "the mailbox logins come from the foreign file; remove it"
        )
    merged = [{**m, **per_mailbox.get(s.id, {})} for m, s in zip(mailboxes, sources, strict=True)]
    for box in merged:
        # Each foreign mailbox states its whole delivery: what it leaves out is absent, never
        # inherited from the top-level webhook (mailbox 0's), which would lend mailbox 0's token
        # to another mailbox's receiver. MailRoom keeps each mailbox's options to itself.
        box["webhook"] = {**dict.fromkeys(_WEBHOOK_FIXED), **box["webhook"], **hook}
    data = {**top, **extra, "mailboxes": merged, "webhook": merged[0]["webhook"]}
    base_dir = overlay.parent if overlay is not None else Path.cwd()
    origins = _Origins(sources=sources, overlay=overlay, per_mailbox=per_mailbox, hook=hook)
    try:
        config = parse_config(data, env=env, base_dir=base_dir)
    except ConfigError as exc:
        raise origins.error(exc) from None
    boxes = tuple(_with_secrets(m, s) for m, s in zip(config.mailboxes, sources, strict=True))
    told = tuple(origins.warning(w) for w in config.warnings)
    config = replace(config, mailboxes=boxes, webhook=boxes[0].webhook, warnings=warnings + told)
    config = with_log_files(config, log_files or [])
    if redis is None:
        return config
    arbitration = replace(
        config.arbitration, password=redis.password, sentinel_password=redis.sentinel_password
    )
    return replace(config, arbitration=arbitration)


def _overlay_mailboxes(
    extra: dict[str, Any], overlay: Path | None, ids: list[str]
) -> dict[str, dict[str, Any]]:
    found = extra.pop("mailboxes", None) or {}
    if not isinstance(found, dict) or not all(isinstance(v, dict) for v in found.values()):
        raise ConfigError(
            f"{overlay}: mailboxes",
            f"expected per-mailbox keys by id ({', '.join(ids)}), like "
            f"{{{ids[0]}: {{failed_folder: Failed}}}}; the mailboxes themselves come from the "
            "foreign file",
        )
    for name, keys in found.items():
        if name not in ids:
            raise ConfigError(
                f"{overlay}: mailboxes.{key_name(name)}", f"no such mailbox; ids: {ids}"
            )
        if fixed := sorted({"id", "address", "inbox_method", "webhook"} & set(keys)):
            raise ConfigError(
                f"{overlay}: mailboxes.{name}.{fixed[0]}", "comes from the foreign file"
            )
    return found


def _overlay_webhook(extra: dict[str, Any], overlay: Path | None) -> dict[str, Any]:
    hook = extra.pop("webhook", None) or {}
    if not isinstance(hook, dict):
        raise ConfigError(f"{overlay}: webhook", "expected a mapping (timeout, retry, ...)")
    if fixed := sorted(set(_WEBHOOK_FIXED) & set(hook)):
        raise ConfigError(
            f"{overlay}: webhook.{fixed[0]}",
            "comes from the foreign file in this mode; remove it here",
        )
    return hook


def _with_secrets(mailbox: MailboxConfig, source: ForeignMailbox) -> MailboxConfig:
    """The mailbox with the secrets its foreign file gave it, validated with placeholders: the
    password or client secret, and the passwords of a Sidekiq queue's Redis."""
    hook, redis = mailbox.webhook, source.sidekiq_redis
    if hook.sidekiq is not None and redis is not None:  # delivery_method: sidekiq
        connection = replace(
            hook.sidekiq.redis, password=redis.password, sentinel_password=redis.sentinel_password
        )
        sidekiq = replace(hook.sidekiq, redis=connection)
        mailbox = replace(mailbox, webhook=replace(hook, sidekiq=sidekiq))
    return mailbox if source.secret is None else mailbox.with_secret(Secret(source.secret))


@dataclass(frozen=True, slots=True, kw_only=True)
class _Origins:
    """Which file each value of the composed tree came from: the foreign file (``sources``) or
    the ``-c`` file (``overlay``: its per-mailbox keys and webhook keys)."""

    sources: list[ForeignMailbox]
    overlay: Path | None
    per_mailbox: Mapping[str, dict[str, Any]]
    hook: Mapping[str, Any]

    def where(self, path: str) -> str:
        """``path`` of mailroom's tree as ``<file>: <path in that file>``."""
        overlay = self.overlay
        index, rest = 0, path
        if match := _MAILBOX_PATH.fullmatch(path):
            index, rest = int(match.group(1)), match.group(2) or ""
        elif not path.startswith("webhook"):
            return f"{overlay}: {path}" if overlay is not None else path
        head, _, tail = rest.partition(".")
        if overlay is not None and head == "webhook" and tail.partition(".")[0] in self.hook:
            return f"{overlay}: {rest}"
        source = self.sources[index]
        if head in self.per_mailbox.get(source.id, {}):
            return f"{overlay}: mailboxes.{source.id}.{rest}"
        key = source.keys.get(rest) or source.keys.get(head) or rest
        return f"{source.file}: {source.prefix}{'.' + key if key else ''}"

    def error(self, exc: ConfigError) -> ConfigError:
        if exc.problems:  # several: each told in the words of its own file
            return ConfigError.several([self.error(problem) for problem in exc.problems])
        return ConfigError(self.where(exc.path), exc.message)

    def warning(self, warning: str) -> str:
        """A load-time warning, ``<dotted.path>: ...``, told the same way."""
        path, sep, message = warning.partition(": ")
        return f"{self.where(path)}: {message}" if sep else warning
