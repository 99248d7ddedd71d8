"""GitLab's gitlab.yml, secrets.yml and encrypted settings → a mailroom ``Config``.

Read the way GitLab's ``lib/gitlab/mail_room.rb`` reads them for MailRoom:

- gitlab.yml: ``--gitlab-config``, else ``$MAIL_ROOM_GITLAB_CONFIG_FILE``; the section named by
  ``$RAILS_ENV``, which defaults to ``production`` here (GitLab's own default is
  ``development``, meant for developers). Relative paths resolve as GitLab and MailRoom resolve
  them on the installer the file belongs to (``layout``), whatever directory mailroom runs in.
- ``incoming_email`` and ``service_desk_email`` over GitLab's defaults (port 143, ssl false,
  start_tls false, mailbox ``inbox``, idle_timeout 60, expunge_deleted false,
  delete_after_delivery true); a type is on when ``enabled`` and ``address`` is not empty.
- ``delivery_method: webhook`` (MailRoom's postback): the raw message as ``text/plain`` to
  ``<gitlab_url>/api/v4/internal/mail_room/<type>`` with the ``Gitlab-Mailroom-Api-Request``
  JWT signed with the base64-decoded ``secret_file``. ``sidekiq`` is refused.
- secrets.yml (``$MAIL_ROOM_GITLAB_SECRETS_FILE``, else beside gitlab.yml): ``shared`` then the
  environment's section; with ``encrypted_settings_key_base`` the type's encrypted settings
  (``encrypted_secret_file``, else ``<encrypted_settings.path or shared.path/encrypted_settings>
  /<type>.yaml.enc``) override ``user`` and ``password``, decrypted as ``encrypted`` describes.
- ``routing: forward_all`` with auto-generated mail forwarded too (GitLab decides, as behind
  MailRoom); ``reply_host`` from ``gitlab.host``; no reject notices unless the ``-c`` file asks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailroom.config import Config, read_yaml
from mailroom.config.document import load as load_yaml
from mailroom.config.reader import HOST_RE
from mailroom.errors import ConfigError
from mailroom.gitlab import encrypted
from mailroom.gitlab.compose import (
    PLACEHOLDER,
    ForeignMailbox,
    build,
    literal,
    overlay_arbitration,
    read_overlay,
    secret_text,
    sidekiq_tree,
)
from mailroom.gitlab.layout import Layout, find_layout
from mailroom.gitlab.redis import GitLabRedis, arbitration_block, find_queues_redis
from mailroom.redact import key_name

__all__ = ["TYPES", "GitLabFiles", "find_files", "load_gitlab"]

TYPES = ("incoming_email", "service_desk_email")
DEFAULTS: dict[str, Any] = {  # Gitlab::MailRoom::DEFAULT_CONFIG and config/mail_room.yml
    "enabled": False,
    "port": 143,
    "ssl": False,
    "start_tls": False,
    "mailbox": "inbox",
    "idle_timeout": 60,
    "expunge_deleted": False,
    "delete_after_delivery": True,
    "delivery_method": "sidekiq",  # still GitLab's default; deprecated since 16.0
}
# Gitlab::MailRoom::MAILBOX_SPECIFIC_CONFIGS (queue "default" for both)
WORKERS = {
    "incoming_email": "EmailReceiverWorker",
    "service_desk_email": "ServiceDeskEmailReceiverWorker",
}
DEFAULT_LOG_PATH = "log/mail_room_json.log"  # DEFAULT_CONFIG's, from the Rails root
IMAP_KEYS = ("host", "port", "ssl", "start_tls", "idle_timeout", "expunge_deleted")
# GitLab keys with no meaning for mailroom (the JWT public keys GitLab verifies with, which
# MailRoom never uses).
IGNORED = frozenset({"log_path", "public_key_files"})  # log_path is read on its own
KNOWN = frozenset(
    {"enabled", "address", "user", "password", "mailbox", "delete_after_delivery"}
    | {"delivery_method", "gitlab_url", "secret_file", "inbox_method", "inbox_options"}
    | {"encrypted_secret_file", "queue", "worker", *IMAP_KEYS}
    | IGNORED
)
# mailroom's path under a mailbox → the GitLab key it came from (for error messages)
GITLAB_KEYS = {
    "webhook.url": "gitlab_url",
    "webhook.jwt": "secret_file",
    "webhook.jwt.secret": "secret_file",
    "webhook.jwt.secret_file": "secret_file",
}
_SIDEKIQ_DEPRECATED = (
    "{where}.delivery_method: sidekiq (GitLab's default when none is set) is deprecated in "
    "GitLab since 16.0 and planned to be removed in 19.0; mailroom pushes the job MailRoom "
    "pushes into GitLab's queues Redis. Switch to webhook: on the Linux package "
    "gitlab_rails['{kind}_delivery_method'] = 'webhook' and gitlab-ctl reconfigure (it writes "
    "the secret file); self-compiled: delivery_method: webhook, gitlab_url and secret_file in "
    "gitlab.yml (docs/gitlab.md); Helm chart: global.appConfig.<type>.deliveryMethod: webhook"
)
JWT_HEADER = "Gitlab-Mailroom-Api-Request"  # Gitlab::MailRoom::INTERNAL_API_REQUEST_HEADER
JWT_ISSUER = "gitlab-mailroom"
API_PATH = "/api/v4/internal/mail_room/"
_ERB_ENV = re.compile(r"""<%=\s*ENV\[\s*(["'])([A-Za-z_][A-Za-z0-9_]*)\1\s*\]\s*%>""")


@dataclass(frozen=True, slots=True, kw_only=True)
class GitLabFiles:
    """Where GitLab's files are, as ``lib/gitlab/mail_room.rb`` finds them."""

    gitlab_yml: Path
    secrets_yml: Path
    layout: Layout
    rails_env: str
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    _queues: list[GitLabRedis] = field(default_factory=list, repr=False)  # found once

    def queues_redis(self) -> GitLabRedis:
        """GitLab's queues Redis (``redis.find_queues_redis``), read once."""
        if not self._queues:
            try:
                found = find_queues_redis(
                    self.gitlab_yml.parent, rails_env=self.rails_env, env=self.env
                )
            except ValueError as exc:
                raise ConfigError(
                    "", f"{exc} (or name another Redis in the -c file's arbitration:)"
                ) from exc
            self._queues.append(found)
        return self._queues[0]


def find_files(gitlab_config: str | os.PathLike[str] | None, env: Mapping[str, str]) -> GitLabFiles:
    """gitlab.yml from the argument or ``$MAIL_ROOM_GITLAB_CONFIG_FILE``, and the rest."""
    named = gitlab_config or env.get("MAIL_ROOM_GITLAB_CONFIG_FILE")
    if not named:
        raise ConfigError(
            "", "no gitlab.yml: give --gitlab-config PATH or set MAIL_ROOM_GITLAB_CONFIG_FILE"
        )
    gitlab_yml = Path(named).absolute()
    secrets = env.get("MAIL_ROOM_GITLAB_SECRETS_FILE") or gitlab_yml.parent / "secrets.yml"
    return GitLabFiles(
        gitlab_yml=gitlab_yml,
        secrets_yml=Path(secrets).absolute(),
        layout=find_layout(gitlab_yml),
        rails_env=env.get("RAILS_ENV") or "production",
        env=env,
    )


def load_gitlab(
    gitlab_config: str | os.PathLike[str] | None,
    *,
    mailroom_config: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """The ``Config`` GitLab's files describe, with the optional mailroom YAML laid over it."""
    environ = os.environ if env is None else env
    files = find_files(gitlab_config, environ)
    document = read_yaml(files.gitlab_yml)
    settings = document.get(files.rails_env) if isinstance(document, dict) else None
    if not isinstance(settings, dict):
        raise ConfigError(
            str(files.gitlab_yml),
            f"has no {files.rails_env}: section (RAILS_ENV={files.rails_env}); GitLab reads "
            "the section RAILS_ENV names: set RAILS_ENV, or check that this is gitlab.yml",
        )
    secrets = _Secrets(files, environ)
    boxes, sources, warnings, errors = [], [], [], []
    log_files: list[tuple[Path, str, str]] = []
    for kind in TYPES:
        section = settings.get(kind) or {}
        source = ForeignMailbox(id=kind, file=files.gitlab_yml, prefix=f"{files.rails_env}.{kind}")
        if not isinstance(section, dict):
            raise ConfigError(f"{source.file}: {source.prefix}", "expected a mapping of settings")
        merged = {**DEFAULTS, **{k: v for k, v in section.items() if v is not None}}
        if not (merged["enabled"] is True and str(merged.get("address") or "")):
            continue
        warnings += [
            f"{source.file}: {source.prefix}.{key}: not a setting GitLab's MailRoom reads; ignored"
            for key in sorted(key_name(k) for k in set(section) - KNOWN)
        ]
        try:
            box, source = _mailbox(
                kind, merged, source, settings=settings, files=files, secrets=secrets
            )
        except ConfigError as exc:  # each type's problems are told, not only the first's
            errors.append(exc)
            continue
        boxes.append(box)
        sources.append(source)
        if merged["delivery_method"] == "sidekiq":
            warnings.append(
                _SIDEKIQ_DEPRECATED.format(where=f"{source.file}: {source.prefix}", kind=kind)
            )
        log_path = merged.get("log_path") or DEFAULT_LOG_PATH
        if not isinstance(log_path, str):
            raise ConfigError(f"{source.file}: {source.prefix}.log_path", "expected a path")
        origin = f"{source.file}: {source.prefix}.log_path"
        log_files.append((files.layout.path(log_path), kind, origin))
    if errors:
        raise ConfigError.several(errors)
    if not boxes:
        raise ConfigError(
            str(files.gitlab_yml),
            f"neither {files.rails_env}.incoming_email nor {files.rails_env}.service_desk_email "
            "is enabled (enabled: true and an address): there is no mailbox to watch",
        )
    warnings += secrets.warnings
    top: dict[str, Any] = {"routing": {"mode": "forward_all", "forward_auto_generated": True}}
    overlay = Path(mailroom_config) if mailroom_config is not None else None
    extra = read_overlay(overlay)
    redis = None
    named = extra.get("arbitration")
    # A -c arbitration: with a method names another Redis (or none), and GitLab's is not read;
    # without one it only changes settings (mail_room_claims: false, lease_ttl) of GitLab's.
    if not (isinstance(named, dict) and "method" in named):
        # GitLab runs MailRoom with arbitration on its queues Redis: so does GitLab mode
        redis = files.queues_redis()
        overlay_arbitration(top, extra, arbitration_block(redis))
    return build(
        boxes,
        sources,
        top=top,
        overlay=overlay,
        extra=extra,
        env=environ,
        warnings=tuple(warnings),
        log_files=log_files,
        redis=redis,
    )


def _mailbox(
    kind: str,
    merged: dict[str, Any],
    source: ForeignMailbox,
    *,
    settings: dict[str, Any],
    files: GitLabFiles,
    secrets: _Secrets,
) -> tuple[dict[str, Any], ForeignMailbox]:
    """Mailroom's mailbox tree for one GitLab mailbox type, and where its values came from."""
    where = f"{source.file}: {source.prefix}"
    override = secrets.settings(kind, merged, settings)
    user = override.get("user", merged.get("user"))
    if user is not None and not isinstance(user, str):
        raise ConfigError(f"{where}.user", "expected a string; put the value in quotes")
    password = secret_text(override.get("password", merged.get("password")), f"{where}.password")
    gitlab = _mapping(settings.get("gitlab"))
    host = gitlab.get("host") or "localhost"  # GitLab's default (1_settings.rb)
    if not isinstance(host, str) or not HOST_RE.fullmatch(host.lower()):
        raise ConfigError(
            f"{source.file}: {files.rails_env}.gitlab.host",
            "is not a host name, like gitlab.example.com",
        )
    box: dict[str, Any] = {
        "id": kind,
        "address": literal(source, "address", merged["address"]),
        "user": literal(source, "user", user),
        "mailbox": literal(source, "mailbox", merged["mailbox"]),
        "delete_after_delivery": merged["delete_after_delivery"],
        # GitLab's reply ids are reply-<key>@<gitlab.host> (Gitlab::IncomingEmail)
        "reply_host": host,
        "webhook": _webhook(kind, merged, source, files, gitlab),
    }
    secret = password  # the one login secret its kind takes, injected after validation
    if merged.get("inbox_method") == "microsoft_graph":
        options = merged.get("inbox_options")
        if not isinstance(options, dict):
            raise ConfigError(f"{where}.inbox_options", "is required with microsoft_graph")
        secret = secret_text(options.get("client_secret"), f"{where}.inbox_options.client_secret")
        box["inbox_method"] = "microsoft_graph"
        box["inbox_options"] = {
            k: PLACEHOLDER if k == "client_secret" else literal(source, f"inbox_options.{k}", v)
            for k, v in options.items()
        }
    else:
        if merged.get("inbox_method") not in (None, "imap"):
            raise ConfigError(f"{where}.inbox_method", "is not imap or microsoft_graph")
        box.update({k: literal(source, k, merged[k]) for k in IMAP_KEYS if k in merged})
        if password is not None:
            box["password"] = PLACEHOLDER
    source = ForeignMailbox(
        id=kind,
        file=source.file,
        prefix=source.prefix,
        keys=GITLAB_KEYS,
        secret=secret,
        sidekiq_redis=files.queues_redis() if merged["delivery_method"] == "sidekiq" else None,
    )
    return box, source


def _webhook(
    kind: str,
    merged: dict[str, Any],
    source: ForeignMailbox,
    files: GitLabFiles,
    gitlab: dict[str, Any],
) -> dict[str, Any]:
    """The webhook tree of ``delivery_method: webhook`` (config/mail_room.yml's postback)."""
    where = f"{source.file}: {source.prefix}"
    method = merged["delivery_method"]
    if method == "sidekiq":
        return _sidekiq(kind, merged, source, files)
    if method != "webhook":
        raise ConfigError(f"{where}.delivery_method", f"{method!r} is not webhook or sidekiq")
    url, secret_file = merged.get("gitlab_url"), merged.get("secret_file")
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(
            f"{where}.gitlab_url",
            "is required with delivery_method: webhook: the URL mailroom reaches GitLab at "
            f"(from gitlab: here, {_gitlab_url(gitlab)}; gitlab.rb: gitlab_rails"
            f"['{kind}_gitlab_url'])",
        )
    if not isinstance(secret_file, str) or not secret_file.strip():
        raise ConfigError(
            f"{where}.secret_file",
            "is required with delivery_method: webhook: the file holding the base64 secret "
            f"GitLab checks the JWT with (.gitlab_{kind}_secret in the Linux package)",
        )
    return {
        "url": literal(source, "gitlab_url", url.strip().rstrip("/") + API_PATH + kind),
        "format": "raw",
        "content_type": "text/plain",  # config/mail_room.yml; Grape answers 415 to others
        "jwt": {
            "header": JWT_HEADER,
            "issuer": JWT_ISSUER,
            "secret_file": literal(
                source,
                "secret_file",
                str(files.layout.secret_file(secret_file.strip(), f"{where}.secret_file")),
            ),
            "secret_encoding": "base64",
        },
    }


def _sidekiq(
    kind: str, merged: dict[str, Any], source: ForeignMailbox, files: GitLabFiles
) -> dict[str, Any]:
    """The webhook tree of ``delivery_method: sidekiq`` (GitLab's default, deprecated since
    16.0): the job MailRoom pushes, into GitLab's queues Redis, queue and worker as
    config/mail_room.yml renders them."""
    queue, worker = merged.get("queue", "default"), merged.get("worker", WORKERS[kind])
    return sidekiq_tree(
        files.queues_redis(), literal(source, "queue", queue), literal(source, "worker", worker)
    )


def _gitlab_url(gitlab: dict[str, Any]) -> str:
    """GitLab's own URL from ``gitlab: {host, port, https, relative_url_root}``, as GitLab's
    1_settings.rb builds ``Settings.gitlab.url``."""
    https = gitlab.get("https") is True
    port = gitlab.get("port") or (443 if https else 80)
    standard = str(port) == ("443" if https else "80")
    return (
        f"{'https' if https else 'http'}://{gitlab.get('host') or 'localhost'}"
        f"{'' if standard else f':{port}'}{gitlab.get('relative_url_root') or ''}"
    )


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class _Secrets:
    """secrets.yml's keys and the encrypted settings they open, read only when needed."""

    def __init__(self, files: GitLabFiles, env: Mapping[str, str]) -> None:
        self.files = files
        self.env = env
        self.warnings: list[str] = []
        self._keys: list[str] | None = None

    def settings(
        self, kind: str, merged: dict[str, Any], settings: dict[str, Any]
    ) -> dict[str, Any]:
        """The decrypted ``user``/``password`` of ``kind`` (empty when GitLab would use none)."""
        path = self._encrypted_file(kind, merged, settings)
        if not path.exists():
            return {}
        keys = self._base_keys()
        if not keys:
            self.warnings.append(
                f"{path}: not read, as GitLab would not read it: there is no "
                f"encrypted_settings_key_base in {self.files.secrets_yml}; user and password "
                "come from gitlab.yml"
            )
            return {}
        try:
            found = encrypted.read_settings(path, keys)
        except ValueError as exc:
            raise ConfigError(
                f"{self.files.secrets_yml}: encrypted_settings_key_base", str(exc)
            ) from None
        return {k: v for k, v in found.items() if k in ("user", "password") and v is not None}

    def _encrypted_file(self, kind: str, merged: dict[str, Any], settings: dict[str, Any]) -> Path:
        """lib/gitlab/mail_room.rb's ``encrypted_secret_file``: each relative path expanded
        from the Rails root."""
        layout = self.files.layout
        if isinstance(named := merged.get("encrypted_secret_file"), str):
            return layout.path(named)
        shared_path = layout.path(str(_mapping(settings.get("shared")).get("path") or "shared"))
        named = _mapping(settings.get("encrypted_settings")).get("path")
        directory = layout.path(str(named or shared_path / "encrypted_settings"))
        return directory / f"{kind}.yaml.enc"

    def _base_keys(self) -> list[str]:
        if self._keys is None:
            self._keys = self._read_keys()
        return self._keys

    def _read_keys(self) -> list[str]:
        path = self.files.secrets_yml
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(str(path), f"cannot read it: {reason}") from exc
        text = _ERB_ENV.sub(lambda m: self.env.get(m.group(2), ""), text)
        if "<%" in text:
            raise ConfigError(
                str(path), "holds ERB other than <%= ENV['NAME'] %>; write the values themselves"
            )
        try:
            document = load_yaml(text, str(path))
        except ConfigError:  # never PyYAML's message: it would quote the file's secrets
            raise ConfigError(str(path), "is not valid YAML; fix its syntax") from None
        merged: dict[str, Any] = {}
        for name in ("shared", self.files.rails_env):  # Rails::Secrets.parse
            if isinstance(document, dict) and isinstance(document.get(name), dict):
                merged.update(document[name])
        current = merged.get("encrypted_settings_key_base")
        rotated = merged.get("rotated_encrypted_settings_key_base") or []
        if not isinstance(rotated, list):
            rotated = [rotated]
        keys = [current, *rotated] if current else []
        if not all(isinstance(k, str) for k in keys):
            raise ConfigError(
                f"{path}: encrypted_settings_key_base", "expected a string; put it in quotes"
            )
        return keys
