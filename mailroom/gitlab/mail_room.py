"""MailRoom's own YAML (``mail_room -c mail_room.yml``) → a mailroom ``Config``.

For people who run the MailRoom gem without GitLab: ``mailroom run --mail-room-config FILE``.
Keys are Ruby symbols (``:email:``), as MailRoom reads them, with MailRoom's defaults (host
imap.gmail.com, port 993, ssl true, search_command UNSEEN, delete_after_delivery false,
idle_timeout 1740, delivery_method postback). Postback becomes the webhook: the raw message as
the body, ``Authorization: Token token="..."`` for ``:delivery_token:``, basic auth, and the JWT
header when ``:jwt_auth_header:`` and ``:jwt_secret_path:`` are both given (base64 secret, issuer
``mailroom`` unless ``:jwt_issuer:``). Like MailRoom, every message is posted (``routing:
forward_all``, auto-generated mail too): MailRoom does not route. Every key mailroom cannot
honour is explained, not ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mailroom.config import Config, read_yaml
from mailroom.config.document import load as load_yaml
from mailroom.config.reader import IDLE_TIMEOUT_MAX_S
from mailroom.errors import ConfigError
from mailroom.gitlab import erb
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
from mailroom.gitlab.redis import GitLabRedis, arbitration_block, parse_entry
from mailroom.redact import key_name

__all__ = ["is_mail_room_yaml", "load_mail_room"]

DEFAULTS: dict[str, Any] = {  # MailRoom::Mailbox::DEFAULTS
    "host": "imap.gmail.com",
    "port": 993,
    "ssl": True,
    "start_tls": False,
    "search_command": "UNSEEN",
    "delete_after_delivery": False,
    "expunge_deleted": False,
    "idle_timeout": IDLE_TIMEOUT_MAX_S,  # IMAP_IDLE_TIMEOUT, 29 minutes
    "delivery_method": "postback",
}
# MailRoom key → mailroom key, where the value passes as it is
SAME = {
    "email": "user",
    "name": "mailbox",
    "host": "host",
    "port": "port",
    "start_tls": "start_tls",
    "search_command": "search_command",
    "delete_after_delivery": "delete_after_delivery",
    "expunge_deleted": "expunge_deleted",
    "idle_timeout": "idle_timeout",
}
HANDLED = {*SAME, "password", "ssl", "delivery_method", "delivery_options"}
HANDLED |= {"delivery_url", "delivery_token", "inbox_method", "inbox_options"}
HANDLED |= {"arbitration_method", "arbitration_options", "logger", "log_path"}
POSTBACK_OPTIONS = {"delivery_url", "url", "delivery_token", "token", "username", "password"}
POSTBACK_OPTIONS |= {"content_type", "jwt_auth_header", "jwt_issuer", "jwt_algorithm"}
POSTBACK_OPTIONS |= {"jwt_secret_path"}
SIDEKIQ_OPTIONS = {"redis_url", "redis_db", "namespace", "sentinels", "sentinel_password"}
SIDEKIQ_OPTIONS |= {"queue", "worker"}
ARBITRATION_OPTIONS = {"redis_url", "namespace", "sentinels", "sentinel_username"}
ARBITRATION_OPTIONS |= {"sentinel_password", "redis_db"}
EXPLAINED = {
    "delivery_klass": "a Ruby class; mailroom delivers to a webhook only",
    "location": "letter_opener's directory; mailroom delivers to a webhook only",
}
_WEBHOOK_ONLY = (
    "mailroom always posts each message to a webhook; use :delivery_method: postback with "
    ":delivery_url: (for a look at what arrives: python examples/receiver.py)"
)


def load_mail_room(
    path: str | os.PathLike[str],
    *,
    mailroom_config: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """The ``Config`` MailRoom's YAML describes, with the optional mailroom YAML over it."""
    file = Path(path).absolute()
    environ = os.environ if env is None else env
    document = _read(file, environ)
    if not isinstance(document, dict) or not isinstance(document.get(":mailboxes"), list):
        raise ConfigError(
            str(file),
            "has no :mailboxes: list (MailRoom's keys are Ruby symbols: ':mailboxes:', "
            "':email:', ...)",
        )
    top: dict[str, Any] = {"routing": {"mode": "forward_all", "forward_auto_generated": True}}
    warnings: list[str] = []
    for key, value in document.items():
        if key == ":health_check":
            top["health"] = _health_check(value, file)
        elif key != ":mailboxes":
            raise ConfigError(
                f"{file}: {key_name(key)}", "is not a MailRoom setting mailroom reads"
            )
    boxes, sources, arbitrations = [], [], []
    log_files: list[tuple[Path, str, str]] = []
    for index, item in enumerate(document[":mailboxes"]):
        source = ForeignMailbox(id=f"mailbox{index}", file=file, prefix=f":mailboxes:[{index}]")
        box, source, found = _mailbox(item, source)
        boxes.append(box)
        sources.append(source)
        arbitrations.append(found)
        if (log_path := _log_path(item, source)) is not None:
            log_files.append((log_path, source.id, f"{file}: {source.prefix}.:logger.:log_path"))
    if not boxes:
        raise ConfigError(f"{file}: :mailboxes", "is empty; there is no mailbox to watch")
    shared, advice = _shared_arbitration(arbitrations, sources)
    warnings += advice
    overlay = Path(mailroom_config) if mailroom_config is not None else None
    extra = read_overlay(overlay)
    if shared is not None and not overlay_arbitration(top, extra, shared.block):
        shared = None  # the -c file names another Redis (or none)
    return build(
        boxes,
        sources,
        top=top,
        overlay=overlay,
        extra=extra,
        env=environ,
        warnings=tuple(warnings),
        log_files=log_files,
        redis=shared.found if shared is not None else None,
    )


def is_mail_room_yaml(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is MailRoom's YAML (a line ``:mailboxes:``) rather than mailroom's: the
    image's ``-c`` takes either, so that the Helm chart's ConfigMap can be mounted as it is."""
    try:
        with Path(path).open("rb") as file:
            head = file.read(64 * 1024)
    except OSError:
        return False  # read_yaml says what is wrong with it
    return re.search(rb"(?m)^:mailboxes:", head) is not None


def _read(file: Path, env: Mapping[str, str]) -> Any:
    """The YAML document, after the chart's ERB (``erb.render``) where there is some."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return read_yaml(file)  # says what is wrong with the file
    if "<%" not in text:
        return read_yaml(file)
    try:
        rendered = erb.render(text, env)
    except erb.ErbError as exc:
        hint = (
            " (GitLab's own config/mail_room.yml is such a template: run with "
            "--gitlab-config config/gitlab.yml instead)"
            if "Gitlab::MailRoom" in text
            else ""
        )
        raise ConfigError(str(file), f"{exc}{hint}") from None
    data = load_yaml(rendered, str(file))
    if data is None:
        raise ConfigError("", f"{file} is empty")
    return data


def _log_path(item: dict[str, Any], source: ForeignMailbox) -> Path | None:
    """``:logger: {:log_path:}``: MailRoom's structured log file (relative: from the directory
    MailRoom runs in, as Ruby's Logger opens it)."""
    logger = item.get(":logger")
    if logger is None:
        return None
    where = f"{source.file}: {source.prefix}.:logger"
    if not isinstance(logger, dict) or set(logger) - {":log_path"}:
        raise ConfigError(where, "mailroom takes :log_path: from here, nothing else")
    path = logger.get(":log_path")
    if path is None:
        return None  # MailRoom logs to stdout then: mailroom's stream
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}.:log_path", "expected a path")
    return Path(path).absolute()


def _health_check(value: Any, file: Path) -> dict[str, Any]:
    """``:health_check: {:address:, :port:}``: MailRoom's HTTP server answering ``/liveness``,
    as mailroom's health server does (beside ``/healthz``, ``/readyz``, ``/metrics``)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{file}: :health_check", "expected {:address: 0.0.0.0, :port: 8080}")
    address, port = value.get(":address"), value.get(":port")
    if not isinstance(address, str) or not address:
        raise ConfigError(f"{file}: :health_check.:address", "is required, like 0.0.0.0")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"{file}: :health_check.:port", "is required: a port, like 8080")
    host = f"[{address}]" if ":" in address else address
    return {"listen": f"{host}:{port}"}


def _symbols(item: Any, source: ForeignMailbox, where: str) -> dict[str, Any]:
    """A mapping with symbol keys (``:email``) as plain names; plain keys are explained."""
    if not isinstance(item, dict):
        raise ConfigError(f"{source.file}: {where}", "expected a mapping of :key: value")
    found = {}
    for key, value in item.items():
        if not isinstance(key, str) or not key.startswith(":"):
            name = key_name(key)
            raise ConfigError(
                f"{source.file}: {where}.{name}",
                f"MailRoom reads only symbol keys and would ignore this one; write :{name}:",
            )
        found[key[1:]] = value
    return found


@dataclass(frozen=True, slots=True)
class _Arbitration:
    """One mailbox's ``:arbitration_method: redis``: mailroom's ``arbitration:`` tree and where
    it came from, with the Redis passwords (``found``)."""

    block: dict[str, Any]
    found: GitLabRedis = field(repr=False)
    where: str


def _arbitration(settings: dict[str, Any], source: ForeignMailbox) -> _Arbitration | None:
    """``:arbitration_method: redis`` with ``:arbitration_options:`` (MailRoom's
    Arbitration::Redis::Options: redis_url, namespace, sentinels, sentinel_username,
    sentinel_password): mailroom's replicas on that Redis, claiming MailRoom's keys there."""
    where = f"{source.file}: {source.prefix}"
    method = settings.get("arbitration_method", "noop")
    if method == "noop":
        return None
    if method != "redis":
        raise ConfigError(f"{where}.:arbitration_method", f"{method}: is not noop or redis")
    prefix = f"{source.prefix}.:arbitration_options"
    options = _symbols(settings.get("arbitration_options") or {}, source, prefix)
    if unknown := sorted(set(options) - ARBITRATION_OPTIONS):
        raise ConfigError(
            f"{source.file}: {prefix}.:{key_name(unknown[0])}", "is not a Redis arbitration option"
        )
    found = _redis(options, source, prefix, default="redis://localhost:6379")
    namespace = options.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        raise ConfigError(f"{source.file}: {prefix}.:namespace", "expected a string")
    found = replace(found, namespace=namespace or "")
    return _Arbitration(block=arbitration_block(found), found=found, where=f"{where}")


def _redis(
    options: dict[str, Any], source: ForeignMailbox, prefix: str, *, default: str
) -> GitLabRedis:
    """The Redis MailRoom's options name (redis_url, redis_db, sentinels, sentinel_username,
    sentinel_password), read as GitLab's Redis files are: a password in the URL taken out."""
    sentinels = options.get("sentinels")
    if isinstance(sentinels, list):  # [{:host:, :port:}]
        sentinels = [
            {str(k).removeprefix(":"): v for k, v in s.items()} if isinstance(s, dict) else s
            for s in sentinels
        ]
    entry = {
        "url": options.get("redis_url") or default,
        "db": options.get("redis_db"),
        "sentinels": sentinels,
        "sentinel_username": options.get("sentinel_username"),
        "sentinel_password": options.get("sentinel_password"),
    }
    try:
        return parse_entry({k: v for k, v in entry.items() if v is not None}, source=prefix)
    except ValueError as exc:
        raise ConfigError(str(source.file), str(exc)) from None


def _shared_arbitration(
    found: list[_Arbitration | None], sources: list[ForeignMailbox]
) -> tuple[_Arbitration | None, list[str]]:
    """The arbitration of all mailboxes: mailroom's replicas share one Redis, the first
    mailbox's. Another mailbox naming another Redis is told (its MailRoom claims would be
    looked for in the first one)."""
    first = next((a for a in found if a is not None), None)
    if first is None:
        return None, []
    advice = [
        f"{source.file}: {source.prefix}.:arbitration_options: mailroom shares every mailbox "
        f"through one Redis, the one {first.where} names; during a migration, stop the MailRoom "
        "processes of this mailbox first (their claims are in another Redis)"
        for arbitration, source in zip(found, sources, strict=True)
        if arbitration is None
        or arbitration.block != first.block
        or arbitration.found != first.found
    ]
    return first, advice


def _mailbox(
    item: Any, source: ForeignMailbox
) -> tuple[dict[str, Any], ForeignMailbox, _Arbitration | None]:
    where = f"{source.file}: {source.prefix}"
    given = _symbols(item, source, source.prefix)
    if unknown := sorted(set(given) - HANDLED):
        key = unknown[0]
        explained = EXPLAINED.get(key, "is not a MailRoom setting")
        raise ConfigError(f"{where}.:{key_name(key)}", explained)
    settings = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    arbitration = _arbitration(settings, source)
    email = settings.get("email")
    box = {SAME[k]: literal(source, f":{k}", v) for k, v in settings.items() if k in SAME}
    box["id"] = source.id
    if isinstance(email, str) and email:
        # MailRoom does not route: the mailbox's own address, and forward_all posts everything
        host = settings["host"]
        box["address"] = literal(source, ":email", email if "@" in email else f"{email}@{host}")
    keys = {mailroom: f":{name}" for name, mailroom in SAME.items()} | {"address": ":email"}
    password = secret_text(settings.get("password"), f"{where}.:password")
    secret = password  # the one login secret its kind takes, injected after validation
    if settings.get("inbox_method") == "microsoft_graph":
        options = _symbols(
            settings.get("inbox_options") or {}, source, f"{source.prefix}.:inbox_options"
        )
        secret = secret_text(options.get("client_secret"), f"{where}.:inbox_options.:client_secret")
        box["inbox_method"] = "microsoft_graph"
        box["inbox_options"] = {
            k: PLACEHOLDER if k == "client_secret" else literal(source, f":inbox_options.:{k}", v)
            for k, v in options.items()
        }
        keys |= {f"inbox_options.{k}": f":inbox_options.:{k}" for k in options}
        for imap_key in ("host", "port", "ssl", "start_tls", "idle_timeout", "expunge_deleted"):
            box.pop(imap_key, None)  # MailRoom's IMAP defaults mean nothing for Graph
        box.pop("search_command", None)
    else:
        if settings.get("inbox_method") not in (None, "imap"):
            raise ConfigError(f"{where}.:inbox_method", "is not imap or microsoft_graph")
        box.update(_ssl(settings["ssl"], where))
        if password is not None:
            box["password"] = PLACEHOLDER
    sidekiq_redis = None
    if settings["delivery_method"] == "sidekiq":
        box["webhook"], sidekiq_redis = _sidekiq(settings, source)
        keys |= {"webhook": ":delivery_options", "webhook.sidekiq": ":delivery_options"}
    else:
        box["webhook"], hook_keys = _postback(settings, source)
        keys |= hook_keys
    source = ForeignMailbox(
        id=source.id,
        file=source.file,
        prefix=source.prefix,
        keys=keys,
        secret=secret,
        sidekiq_redis=sidekiq_redis,
    )
    return box, source, arbitration


def _ssl(value: Any, where: str) -> dict[str, Any]:
    """``:ssl:`` is true/false or a hash of SSLContext settings (``:verify_mode: :none``)."""
    if not isinstance(value, dict):
        return {"ssl": value}
    settings: dict[str, Any] = {"ssl": True}
    for key, option in value.items():
        name = str(key).removeprefix(":")
        if name == "verify_mode" and str(option).removeprefix(":") in ("none", "peer"):
            settings["tls_verify"] = str(option).removeprefix(":") == "peer"
        elif name == "ca_file":
            settings["ca_file"] = option
        else:
            raise ConfigError(
                f"{where}.:ssl.{key_name(key)}",
                "mailroom takes :verify_mode: (:none or :peer) and :ca_file: from here; set "
                "other TLS settings with SSL_CERT_FILE or in the -c config (mailboxes.<id>)",
            )
    return settings


def _sidekiq(
    settings: dict[str, Any], source: ForeignMailbox
) -> tuple[dict[str, Any], GitLabRedis]:
    """``:delivery_method: sidekiq`` (MailRoom::Delivery::Sidekiq::Options: redis_url, redis_db,
    namespace, sentinels, sentinel_password, queue, worker): the job MailRoom pushes."""
    prefix = f"{source.prefix}.:delivery_options"
    options = _symbols(settings.get("delivery_options") or {}, source, prefix)
    if unknown := sorted(set(options) - SIDEKIQ_OPTIONS):
        raise ConfigError(
            f"{source.file}: {prefix}.:{key_name(unknown[0])}", "is not a sidekiq option"
        )
    if not options.get("worker"):
        raise ConfigError(f"{source.file}: {prefix}.:worker", "is required: the job's class")
    found = _redis(options, source, prefix, default="redis://localhost:6379")
    queue = options.get("queue") or "default"
    return sidekiq_tree(found, queue, options["worker"], options.get("namespace")), found


def _postback(
    settings: dict[str, Any], source: ForeignMailbox
) -> tuple[dict[str, Any], dict[str, str]]:
    """The webhook of a postback mailbox, and where its keys came from."""
    where = f"{source.file}: {source.prefix}"
    method = settings["delivery_method"]
    if method != "postback":
        raise ConfigError(f"{where}.:delivery_method", f"{method}: {_WEBHOOK_ONLY}")
    options = _symbols(
        settings.get("delivery_options") or {}, source, f"{source.prefix}.:delivery_options"
    )
    if unknown := sorted(set(options) - POSTBACK_OPTIONS):
        raise ConfigError(
            f"{where}.:delivery_options.:{key_name(unknown[0])}", "is not a postback option"
        )
    at = f"{source.prefix}.:delivery_options"
    src = ForeignMailbox(id=source.id, file=source.file, prefix=at)
    url = settings.get("delivery_url") or options.get("delivery_url") or options.get("url")
    token = settings.get("delivery_token") or options.get("delivery_token") or options.get("token")
    hook: dict[str, Any] = {"url": literal(src, ":delivery_url", url), "format": "raw"}
    if options.get("content_type") is not None:
        hook["content_type"] = literal(src, ":content_type", options["content_type"])
    basic = options.get("username") is not None and options.get("password") is not None
    if token is not None and basic:
        raise ConfigError(
            f"{where}.:delivery_options.:username",
            "MailRoom sends the token and ignores :username:/:password: then; keep one",
        )
    if token is not None:
        hook["token"] = literal(src, ":delivery_token", token)
        hook["token_scheme"] = "token"  # Faraday's token_auth, as MailRoom sends it
    elif basic:
        hook["basic"] = {
            "user": literal(src, ":username", options["username"]),
            "password": literal(src, ":password", options["password"]),
        }
    header, secret_path = options.get("jwt_auth_header"), options.get("jwt_secret_path")
    if (header is None) != (secret_path is None):
        missing = ":jwt_secret_path" if secret_path is None else ":jwt_auth_header"
        raise ConfigError(
            f"{where}.:delivery_options.{missing}",
            "is missing: MailRoom sends its JWT only with both :jwt_auth_header: and "
            ":jwt_secret_path: (and silently none otherwise); give both or neither",
        )
    if header is not None:
        hook["jwt"] = {
            "header": literal(src, ":jwt_auth_header", header),
            "issuer": literal(src, ":jwt_issuer", options.get("jwt_issuer") or "mailroom"),
            "algorithm": options.get("jwt_algorithm") or "HS256",
            "secret_file": literal(src, ":jwt_secret_path", str(secret_path)),
            "secret_encoding": "base64",  # Base64.strict_decode64(File.read(path).chomp)
        }
    keys = {
        "webhook.url": ":delivery_options.:delivery_url",
        "webhook.token": ":delivery_options.:delivery_token",
        "webhook.content_type": ":delivery_options.:content_type",
        "webhook.basic": ":delivery_options.:username",
        "webhook.jwt": ":delivery_options.:jwt_secret_path",
        "webhook.jwt.secret_file": ":delivery_options.:jwt_secret_path",
        "webhook.jwt.secret": ":delivery_options.:jwt_secret_path",
        "webhook.jwt.algorithm": ":delivery_options.:jwt_algorithm",
    }
    return hook, keys
