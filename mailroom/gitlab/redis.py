"""GitLab's queues Redis, found the way GitLab finds it, for mailroom's Redis arbitration.

GitLab runs MailRoom with Redis arbitration on its *queues* Redis, namespace
``mail_room:gitlab`` (config/mail_room.yml, ``Gitlab::Redis::Queues``). This module only reads
where that Redis is; it connects to nothing. The file, first that applies
(lib/gitlab/redis/queues.rb and wrapper.rb):

1. ``$GITLAB_REDIS_QUEUES_CONFIG_FILE`` (used even when it names no file: an error here);
2. ``<config dir>/redis.queues.yml``;
3. ``$GITLAB_REDIS_CONFIG_FILE``;
4. ``<config dir>/resque.yml``;
5. none of them: ``redis://localhost:6381`` (``DEFAULT_REDIS_QUEUES_URL``).

The file's ``<rails env>:`` entry is a URL, or a mapping with ``url``, ``password``,
``username``, ``db``, ``sentinels: [{host, port}]``, ``sentinel_password`` and
``sentinel_username``. With sentinels, the URL's host is the master name (redis-rb). A password
in the URL (``redis://:secret@host``) is taken out of it; a ``password:`` key wins over it.
Errors are ``ValueError`` naming the file and what to do, never a password.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from mailroom.config.document import load as load_yaml
from mailroom.errors import ConfigError
from mailroom.trust.values import Secret

__all__ = [
    "DEFAULT_URL",
    "NAMESPACE",
    "GitLabRedis",
    "Sentinel",
    "arbitration_block",
    "find_queues_redis",
]

NAMESPACE = "mail_room:gitlab"  # Gitlab::Redis::Queues::MAILROOM_NAMESPACE
DEFAULT_URL = "redis://localhost:6381"  # Gitlab::Redis::Queues::DEFAULT_REDIS_QUEUES_URL
SENTINEL_PORT = 26379
_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True, slots=True)
class Sentinel:
    host: str
    port: int = SENTINEL_PORT


@dataclass(frozen=True, slots=True, kw_only=True)
class GitLabRedis:
    """Where GitLab's queues Redis is. ``url`` carries no user or password."""

    source: str  # the file it was read from, or "default"
    url: str  # redis://host:port/db, rediss://..., unix:///path
    db: int = 0
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)
    sentinels: tuple[Sentinel, ...] = ()
    master_name: str | None = None  # with sentinels: the URL's host
    sentinel_username: str | None = None
    sentinel_password: Secret | None = field(default=None, repr=False)
    namespace: str = NAMESPACE


def config_file(config_dir: Path, env: Mapping[str, str]) -> Path | None:
    """The file GitLab reads for its queues Redis, or None (the default URL)."""
    if queues := env.get("GITLAB_REDIS_QUEUES_CONFIG_FILE"):
        return Path(queues)
    if (own := config_dir / "redis.queues.yml").is_file():
        return own
    if shared := env.get("GITLAB_REDIS_CONFIG_FILE"):
        return Path(shared)
    if (resque := config_dir / "resque.yml").is_file():
        return resque
    return None


def find_queues_redis(
    config_dir: Path, *, rails_env: str = "production", env: Mapping[str, str] | None = None
) -> GitLabRedis:
    """GitLab's queues Redis, as GitLab with ``config_dir`` (the directory of gitlab.yml, whose
    parent is the Rails root) and ``rails_env`` finds it."""
    path = config_file(config_dir, os.environ if env is None else env)
    if path is None:
        return GitLabRedis(source="default", url=DEFAULT_URL)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"cannot read GitLab's Redis config {path}: {reason}") from exc
    if "<%" in text:
        raise ValueError(
            f"{path} holds ERB (<% ... %>), which mailroom does not run; write the values "
            "themselves (gitlab-ctl reconfigure renders them so)"
        )
    try:
        document = load_yaml(text, str(path))
    except ConfigError:  # never PyYAML's message: it may quote a password
        raise ValueError(f"{path} is not valid YAML; fix its syntax") from None
    if not isinstance(document, dict) or document.get(rails_env) is None:
        raise ValueError(
            f"{path} has no {rails_env}: entry (RAILS_ENV={rails_env}); add one, like "
            f"{rails_env}: {{url: redis://localhost:6379}}"
        )
    return parse_entry(document[rails_env], source=str(path))


def parse_entry(entry: Any, *, source: str) -> GitLabRedis:
    """One environment's entry of a GitLab Redis config: a URL or a mapping."""
    settings: dict[str, Any] = {"url": entry} if isinstance(entry, str) else entry
    if not isinstance(settings, dict):
        raise ValueError(f"{source}: expected a URL or a mapping with url:, got something else")
    if "config_command" in settings:
        raise ValueError(
            f"{source}: config_command runs a program for the settings, which mailroom does "
            "not do; write url and password in the file"
        )
    url = settings.get("url")
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{source}: url is missing; write it like redis://localhost:6379")
    parts = urlsplit(url.strip())
    if parts.scheme not in _SCHEMES:
        raise ValueError(f"{source}: url is not redis://, rediss:// or unix:// ({parts.scheme}:)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{source}: the url's port is not a number") from None
    host = parts.hostname or ""
    if parts.scheme != "unix" and not host:
        raise ValueError(f"{source}: the url has no host; write it like redis://localhost:6379")
    db = _db(settings.get("db"), parts.path if parts.scheme != "unix" else "", parts.query, source)
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    sentinels = _sentinels(settings.get("sentinels"), source)
    return GitLabRedis(
        source=source,
        url=f"unix://{parts.path}"
        if parts.scheme == "unix"
        else f"{parts.scheme}://{netloc}{parts.path}",
        db=db,
        username=_text(settings, "username", source) or _unquoted(parts.username),
        password=_secret(settings, "password", source) or _password(parts.password),
        sentinels=sentinels,
        master_name=host if sentinels else None,
        sentinel_username=_text(settings, "sentinel_username", source),
        sentinel_password=_secret(settings, "sentinel_password", source),
    )


def _unquoted(value: str | None) -> str | None:
    return unquote(value) if value else None


def _password(value: str | None) -> Secret | None:
    return Secret(unquote(value)) if value else None


def _text(settings: dict[str, Any], key: str, source: str) -> str | None:
    value = settings.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{source}: {key} must be a string; put it in quotes")
    return value


def _secret(settings: dict[str, Any], key: str, source: str) -> Secret | None:
    value = _text(settings, key, source)
    return Secret(value) if value else None


def _db(value: Any, path: str, query: str, source: str) -> int:
    """``db:`` wins over the URL's ``/N`` (``?db=N`` for a unix socket)."""
    if value is None:
        value = path.strip("/") or parse_qs(query).get("db", ["0"])[0]
    if isinstance(value, bool) or not (str(value).isascii() and str(value).isdigit()):
        raise ValueError(f"{source}: the Redis database is not a number (db: 0 to 15, usually)")
    return int(value)


def _sentinels(value: Any, source: str) -> tuple[Sentinel, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{source}: sentinels must be a list of {{host, port}}")
    found = []
    for item in value:
        port = item.get("port", SENTINEL_PORT) if isinstance(item, dict) else None
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("host"), str)
            or isinstance(port, bool)
            or not isinstance(port, int)
            or not 0 < port < 65536
        ):
            raise ValueError(f"{source}: each sentinel is {{host: name, port: 26379}}")
        found.append(Sentinel(item["host"], port))
    return tuple(found)


def arbitration_block(redis: GitLabRedis) -> dict[str, Any]:
    """The ``arbitration:`` tree for ``redis`` (its passwords are added after validation).

    mailroom's keys go under ``redis.namespace`` (``mailroom`` when MailRoom uses none), and so
    do MailRoom's claims (``mail_room_claims``), as MailRoom writes them. Claims are on by
    default: a MailRoom left running (the Linux package's not yet disabled, the chart's old pods
    in a rolling update) would otherwise post every message a second time, and a claim costs one
    Redis command per message. ``arbitration: {mail_room_claims: false}`` in the ``-c`` file
    switches them off once no MailRoom is left.
    """
    block: dict[str, Any] = {
        "method": "redis",
        "namespace": redis.namespace or "mailroom",
        "db": redis.db,
        "mail_room_claims": True,
        "mail_room_namespace": redis.namespace,
    }
    if redis.sentinels:
        block["sentinels"] = [{"host": s.host, "port": s.port} for s in redis.sentinels]
        block["master_name"] = redis.master_name
        block["tls"] = redis.url.startswith("rediss:")
    else:
        block["url"] = redis.url
    if redis.username is not None:
        block["username"] = redis.username
    return block
