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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mailroom.config import Config, read_yaml
from mailroom.config.reader import IDLE_TIMEOUT_MAX_S, read_regular
from mailroom.errors import ConfigError
from mailroom.gitlab.compose import (
    PLACEHOLDER,
    ForeignMailbox,
    build,
    literal,
    read_overlay,
    secret_text,
)
from mailroom.redact import key_name

__all__ = ["load_mail_room"]

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
    try:
        erb = b"<%" in read_regular(file)
    except OSError:
        erb = False  # read_yaml says what is wrong with the file
    if erb:
        raise ConfigError(
            str(file),
            "is an ERB template (GitLab's config/mail_room.yml); mailroom reads GitLab's "
            "settings directly: run with --gitlab-config config/gitlab.yml instead",
        )
    document = read_yaml(file)
    if not isinstance(document, dict) or not isinstance(document.get(":mailboxes"), list):
        raise ConfigError(
            str(file),
            "has no :mailboxes: list (MailRoom's keys are Ruby symbols: ':mailboxes:', "
            "':email:', ...)",
        )
    top: dict[str, Any] = {"routing": {"mode": "forward_all", "forward_auto_generated": True}}
    warnings: list[str] = []
    for key, value in document.items():
        if key == ":health_check" and isinstance(value, dict):
            address = value.get(":address", "127.0.0.1")
            top["health"] = {"listen": f"{address}:{value.get(':port', 8080)}"}
            warnings.append(
                f"{file}: :health_check: mailroom serves /healthz, /readyz and /metrics there "
                "(MailRoom served /liveness): point the probes at /healthz"
            )
        elif key != ":mailboxes":
            raise ConfigError(
                f"{file}: {key_name(key)}", "is not a MailRoom setting mailroom reads"
            )
    boxes, sources = [], []
    for index, item in enumerate(document[":mailboxes"]):
        source = ForeignMailbox(id=f"mailbox{index}", file=file, prefix=f":mailboxes:[{index}]")
        box, source, advice = _mailbox(item, source)
        boxes.append(box)
        sources.append(source)
        warnings += advice
    if not boxes:
        raise ConfigError(f"{file}: :mailboxes", "is empty; there is no mailbox to watch")
    overlay = Path(mailroom_config) if mailroom_config is not None else None
    environ = os.environ if env is None else env
    return build(
        boxes,
        sources,
        top=top,
        overlay=overlay,
        extra=read_overlay(overlay),
        env=environ,
        warnings=tuple(warnings),
    )


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


def _mailbox(item: Any, source: ForeignMailbox) -> tuple[dict[str, Any], ForeignMailbox, list[str]]:
    where = f"{source.file}: {source.prefix}"
    given = _symbols(item, source, source.prefix)
    if unknown := sorted(set(given) - HANDLED):
        key = unknown[0]
        explained = EXPLAINED.get(key, "is not a MailRoom setting")
        raise ConfigError(f"{where}.:{key_name(key)}", explained)
    settings = {**DEFAULTS, **{k: v for k, v in given.items() if v is not None}}
    advice = []
    if "logger" in given or "log_path" in given:
        advice.append(f"{where}.:logger: mailroom logs to stderr (log: {{format: json}})")
    method = settings.get("arbitration_method", "noop")
    if method != "noop" or given.get("arbitration_options"):
        raise ConfigError(
            f"{where}.:arbitration_method",
            f"{method}: mailroom has no Redis arbitration yet; remove it and run one mailroom "
            "for these mailboxes (one process watches each mailbox once)",
        )
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
    webhook, hook_keys = _postback(settings, source)
    box["webhook"] = webhook
    keys |= hook_keys
    source = ForeignMailbox(
        id=source.id,
        file=source.file,
        prefix=source.prefix,
        keys=keys,
        secret=secret,
    )
    return box, source, advice


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
