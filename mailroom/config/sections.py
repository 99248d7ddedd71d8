"""The top-level blocks: webhook, reject_notices (SMTP), health, and load-time warnings."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Literal, cast

from mailroom.config.model import (
    NOTICE_RETRY,
    ArbitrationConfig,
    BasicAuth,
    HealthConfig,
    JwtConfig,
    LimitsConfig,
    LogConfig,
    LogFile,
    MailboxConfig,
    MetricsConfig,
    RejectNoticesConfig,
    ReloadConfig,
    RetryConfig,
    SidekiqConfig,
    SmtpConfig,
    WebhookConfig,
)
from mailroom.config.reader import REQUIRED, Section, kind, parse_address, shown
from mailroom.mail import routing
from mailroom.redact import origin
from mailroom.trust.values import Secret

# RFC 9110 §8.3.1: type "/" subtype *( OWS ";" OWS parameter ), parameter = token "=" value.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
JWT_KEY_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash
_MEDIA_TYPE = re.compile(rf'{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|"[^"\\\r\n]*"))*')


def parse_webhook(section: Section) -> WebhookConfig:
    if (sidekiq_section := section.section("sidekiq")) is not None:
        return _sidekiq_webhook(section, sidekiq_section)
    # A query may hold the receiver's token: allowed, and never shown (origin() only).
    url = section.url(
        "url", schemes=("http", "https"), query=True, userinfo="use webhook.basic or webhook.token"
    )
    fmt = section.choice("format", "json", ("json", "raw"))
    content_type = section.text("content_type", None)
    if content_type is not None:
        if fmt != "raw":
            section.fail("content_type", "is for format: raw (format: json posts application/json)")
        if not _MEDIA_TYPE.fullmatch(content_type):
            section.fail(
                "content_type",
                f"{shown(content_type)} is not a media type; write it like text/plain",
            )
    jwt = None
    if (jwt_section := section.section("jwt")) is not None:
        jwt = _jwt(jwt_section)
    basic = None
    if (basic_section := section.section("basic")) is not None:
        password = basic_section.secret("password", required=True)
        basic = BasicAuth(user=basic_section.text("user"), password=password)
        basic_section.done()
    token = section.secret("token", required=False)
    if token is not None and basic is not None:
        section.fail("token", "give either token (Bearer) or basic, not both")
    token_scheme = section.choice("token_scheme", "bearer", ("bearer", "token"))
    signing_secret = section.secret("signing_secret", required=False)
    if signing_secret is not None:
        _check_whsec(section, signing_secret)
    retry = _retry(section)
    config = WebhookConfig(
        url=url,
        format=fmt,
        content_type=content_type,
        timeout_s=section.number("timeout", 30.0, lo=0.1, hi=3600),
        concurrency=section.number("concurrency", 8, lo=1, hi=1024, integer=True),
        signing_secret=signing_secret,
        jwt=jwt,
        token=token,
        token_scheme=token_scheme,
        basic=basic,
        tls_verify=section.flag("tls_verify", True),
        ca_file=section.ca_file(),
        proxy=section.proxy(),
        retry=retry,
    )
    section.done()
    return config


# The webhook keys that mean something for a Sidekiq push (the rest are HTTP's).
SIDEKIQ_WEBHOOK_KEYS = frozenset({"sidekiq", "format", "timeout", "concurrency", "retry"})


def _sidekiq_webhook(section: Section, sidekiq: Section) -> WebhookConfig:
    """``webhook: {sidekiq: {url, queue, worker, namespace, <Redis keys>}}``: each message is
    pushed as the Sidekiq job GitLab's MailRoom pushes (GitLab's ``delivery_method: sidekiq``);
    the Redis keys are those of ``arbitration:`` (url or sentinels, db, password, tls)."""
    for key in section.data:
        if key not in SIDEKIQ_WEBHOOK_KEYS and section.data[key] is not None:
            section.fail(str(key), "is for posting over HTTP; a sidekiq webhook pushes to Redis")
    if section.choice("format", "raw", ("raw",)) != "raw":  # pragma: no cover
        section.fail("format", "a Sidekiq job carries the raw message")
    queue = sidekiq.text("queue", "default")
    worker = sidekiq.text("worker")
    namespace = sidekiq.text("namespace", None)
    redis_keys = {
        k: v for k, v in sidekiq.data.items() if k not in ("queue", "worker", "namespace")
    }
    redis = parse_arbitration(
        Section({**redis_keys, "method": "redis"}, sidekiq.path, sidekiq.env, sidekiq.base_dir)
    )
    sidekiq.used.update(sidekiq.data)
    sidekiq.done()
    retry = _retry(section)
    config = WebhookConfig(
        url="",
        format="raw",
        timeout_s=section.number("timeout", 30.0, lo=0.1, hi=3600),
        concurrency=section.number("concurrency", 8, lo=1, hi=1024, integer=True),
        retry=retry,
        sidekiq=SidekiqConfig(redis=redis, queue=queue, worker=worker, namespace=namespace),
    )
    section.used.update(section.data)
    section.done()
    return config


def _retry(section: Section) -> RetryConfig:
    """A webhook's ``retry: {initial, max, give_up_after}``."""
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
    return retry


def parse_routing(section: Section) -> tuple[routing.RoutingMode, bool]:
    """Top-level ``routing: {mode: match | forward_all, forward_auto_generated: false}``: the
    mode and the switch it sets on every mailbox's ``RoutingRules``."""
    mode = routing.RoutingMode(section.choice("mode", "match", ("match", "forward_all")))
    forward_auto_generated = section.flag("forward_auto_generated", False)
    if forward_auto_generated and mode is routing.RoutingMode.MATCH:
        section.fail("forward_auto_generated", "is for mode: forward_all")
    section.done()
    return mode, forward_auto_generated


def _jwt(section: Section) -> JwtConfig:
    """``webhook.jwt``; a base64 secret must decode (GitLab's secret files hold base64), and
    PyJWT must take the key for HS256."""
    secret = section.secret("secret", required=True)
    encoding = section.choice("secret_encoding", "raw", ("raw", "base64"))
    secret_file = None
    if section.has("secret_file"):
        secret_file = str(section.base_dir / section.text("secret_file"))
    where_key = "secret_file" if secret_file else "secret"
    config = JwtConfig(
        header=section.text("header", "Gitlab-Mailroom-Api-Request"),
        issuer=section.text("issuer", "gitlab-mailroom"),
        algorithm=section.choice("algorithm", "HS256", ("HS256",)),
        secret=secret,
        secret_encoding=encoding,
        nonce=section.flag("nonce", True),
        secret_file=secret_file,
    )
    try:
        key = config.key()
    except binascii.Error:
        key = b""
    if encoding == "base64" and not key:
        section.fail(
            where_key,
            f"{secret_file or 'the secret'} is not base64 text, as secret_encoding: base64 needs "
            "(GitLab's secret files hold base64 of 32 random bytes; make one with: head -c 32 "
            "/dev/urandom | base64); for a plain-text secret set secret_encoding: raw",
        )
    import jwt  # noqa: PLC0415  # here: 2 MiB at start where no webhook.jwt is set

    try:
        jwt.get_algorithm_by_name(config.algorithm).prepare_key(key)
    except jwt.InvalidKeyError as exc:  # empty, or shaped like a PEM, SSH or JWK key
        section.fail(
            where_key,
            f"is not usable as an {config.algorithm} key ({str(exc).rstrip('.')}); give the "
            "secret the receiver checks the JWT with (GitLab: base64 of 32 random bytes)",
        )
    section.done()
    return config


def _check_whsec(section: Section, secret: Secret) -> None:
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


def _smtp(section: Section) -> SmtpConfig:
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
        ca_file=section.ca_file(),
        user=user,
        password=password,
        timeout_s=section.number("timeout", 30.0, lo=0.1, hi=600),
    )
    section.done()
    return config


def parse_reject_notices(section: Section) -> tuple[RejectNoticesConfig | None, str | None]:
    """The notices config (None with ``enabled: false``) and the ``from`` address, if given."""
    enabled = section.flag("enabled", True)
    sender = section.text("from", REQUIRED if enabled else None)
    sender_address = None if sender is None else parse_address(section, "from", sender)
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
        section.fail("footer", f"expected text, got {kind(footer)}")
    section.done()
    if not enabled:
        return None, sender_address
    if sender_address is None or smtp is None:  # both required when enabled, above
        section.fail("smtp" if smtp is None else "from", "is required with enabled: true")
    config = RejectNoticesConfig(
        sender=sender,
        sender_address=sender_address,
        smtp=smtp,
        require_authenticated_sender=require_authenticated_sender,
        trusted_authserv_ids=frozenset(
            section.expand("trusted_authserv_ids", i).lower() for i in raw_ids
        ),
        footer=footer,
        retry=retry,
    )
    return config, sender_address


def _advice(mailboxes: tuple[MailboxConfig, ...], named: int = 3) -> list[str]:
    """Each mailbox's ``advice``, one line per piece of advice: a thousand clear-text
    mailboxes make one warning naming the first, how many more, and a few of their ids."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, mailbox in enumerate(mailboxes):
        for key, text in mailbox.advice():
            groups.setdefault((key, text), []).append(i)
    found = []
    for (key, text), indexes in groups.items():
        line = f"mailboxes[{indexes[0]}].{key}: {text}"
        if more := indexes[1:]:
            ids = ", ".join(mailboxes[i].id for i in more[:named])
            rest = f" and {len(more) - named} more" if len(more) > named else ""
            line += f" (the same for {len(more)} more mailboxes: {ids}{rest})"
        found.append(line)
    return found


def load_warnings(
    mailboxes: tuple[MailboxConfig, ...],
    notices: RejectNoticesConfig | None,
    webhook: WebhookConfig,
) -> tuple[str, ...]:
    """Advice that is not an error, each ``<dotted.path>: <what and what to do>``."""
    found = [
        f"mailboxes[{i}].address: {text}"
        for i, mailbox in enumerate(mailboxes)
        for text in routing.warnings(mailbox.routing.address)
    ]
    found += _advice(mailboxes)
    for i, mailbox in enumerate(mailboxes):
        hook = mailbox.webhook
        inherited = [
            name
            for name in ("token", "basic", "jwt", "signing_secret")
            if getattr(hook, name) is not None and getattr(hook, name) == getattr(webhook, name)
        ]
        if origin(hook.url) != origin(webhook.url) and inherited:
            found.append(
                f"mailboxes[{i}].webhook.url: posts to {origin(hook.url)} with the top-level "
                f"webhook's {', '.join(inherited)}; restate them in this mailbox's webhook "
                "block (null to send none) if that host must not see them"
            )
    found += _short_jwt_keys(mailboxes, webhook)
    smtp = notices.smtp if notices is not None else None
    if smtp is not None and smtp.user and not (smtp.ssl or smtp.start_tls):
        found.append(
            "reject_notices.smtp.user: the SMTP password would cross the network in clear text; "
            "set start_tls: true (port 587) or ssl: true (port 465)"
        )
    return tuple(found)


def _short_jwt_keys(mailboxes: tuple[MailboxConfig, ...], webhook: WebhookConfig) -> list[str]:
    """RFC 7518 §3.2: an HS256 key is at least 32 bytes. Said once here; PyJWT would warn on
    every token."""
    hooks = {"webhook": webhook} | {
        f"mailboxes[{i}].webhook": mailbox.webhook
        for i, mailbox in enumerate(mailboxes)
        if mailbox.webhook.jwt != webhook.jwt
    }
    return [
        f"{where}.jwt.{'secret_file' if signer.secret_file else 'secret'}: the key is "
        f"{len(signer.key())} bytes, and RFC 7518 §3.2 asks for at least {JWT_KEY_BYTES} for "
        f"{signer.algorithm}; where the receiver allows, use a longer secret (GitLab writes base64 "
        "of 32 random bytes: head -c 32 /dev/urandom | base64, with secret_encoding: base64)"
        for where, hook in hooks.items()
        if (signer := hook.jwt) is not None and len(signer.key()) < JWT_KEY_BYTES
    ]


def parse_log(section: Section) -> LogConfig:
    """``log: {format: json | text, level, file}``."""
    file = section.text("file", None)
    config = LogConfig(
        format=section.choice("format", "json", ("json", "text")),
        level=section.choice("level", "info", ("debug", "info", "warning", "error")),
        files=() if file is None else (LogFile(path=str(section.base_dir / file)),),
    )
    section.done()
    return config


def parse_reload(section: Section) -> ReloadConfig:
    """``reload: {watch, interval}``."""
    config = ReloadConfig(
        watch=section.flag("watch", False),
        interval_s=section.number("interval", 2.0, lo=0.1, hi=3600),
    )
    section.done()
    return config


def parse_health(section: Section) -> HealthConfig:
    """``health: {listen: "host:port", stall_after: seconds}``."""
    listen = str(section.text("listen", "127.0.0.1:8080"))
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:8080
    if not host or not port.isdigit():
        section.fail("listen", f"{shown(listen)} is not host:port; write it like 127.0.0.1:8080")
    if int(port) > 65535:
        section.fail("listen", f"port {port} is out of range; use a value from 0 to 65535")
    config = HealthConfig(
        host=host,
        port=int(port),
        stall_after_s=section.number("stall_after", 300.0, lo=1, hi=86_400),
        ready_when=_ready_when(section),
    )
    section.done()
    return config


def _ready_when(section: Section) -> Literal["all", "any"] | float:
    """``all``, ``any``, or a fraction of the mailboxes (``0.9``, or ``90%``)."""
    value = section.raw("ready_when", "all")
    if value in ("all", "any"):
        return cast(Literal["all", "any"], value)
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        fraction = -1.0
    if isinstance(value, bool) or not 0 < fraction <= 1:
        section.fail(
            "ready_when", "expected all, any, or a fraction of the mailboxes like 0.9 or 90%"
        )
    return fraction


def parse_metrics(section: Section) -> MetricsConfig:
    """``metrics: {mailbox_label: id | hash, per_mailbox: true | false}``."""
    config = MetricsConfig(
        mailbox_label=section.choice("mailbox_label", "id", ("id", "hash")),
        per_mailbox=section.flag("per_mailbox", True),
    )
    section.done()
    return config


def parse_limits(section: Section) -> LimitsConfig:
    """``limits: {in_flight_messages, in_flight_bytes, connects}``, process-wide."""
    default = LimitsConfig()
    config = LimitsConfig(
        in_flight_messages=section.number(
            "in_flight_messages", default.in_flight_messages, lo=1, hi=10**7, integer=True
        ),
        in_flight_bytes=section.number(
            "in_flight_bytes", default.in_flight_bytes, lo=1 << 20, hi=1 << 40, integer=True
        ),
        connects=section.number("connects", default.connects, lo=1, hi=10_000, integer=True),
    )
    section.done()
    return config


def parse_arbitration(section: Section) -> ArbitrationConfig:
    """``arbitration: {method: redis, url: ..., lease_ttl, ...}`` (docs/scaling.md, "Replicas")."""
    method = section.choice("method", "none", ("none", "redis"))
    if method == "none":
        section.done()
        return ArbitrationConfig()
    url, tls = None, False
    sentinels = _sentinels(section)
    if sentinels:
        if section.has("url"):
            section.fail("url", "give either url or sentinels (with master_name), not both")
        master_name = section.text("master_name")
        tls = section.flag("tls", False)
    else:
        master_name = None
        raw_url = section.text("url")
        if not raw_url.startswith(("redis://", "rediss://", "unix:")):
            section.fail(
                "url",
                "is not a Redis URL; write it like redis://redis:6379/0 (rediss:// for TLS, "
                "unix:///path/to/redis.socket for a socket)",
            )
        if raw_url.startswith("unix:"):
            path = raw_url.removeprefix("unix:").removeprefix("//")
            if not path.startswith("/") or "?" in path or "#" in path:
                section.fail("url", "a Unix socket is written unix:///path/to/redis.socket")
            url = f"unix://{path}"
        else:
            url = section.url(
                "url",
                schemes=("redis", "rediss"),
                userinfo="give username and password (or password_file) instead",
            )
            tls = url.startswith("rediss:")
    db = section.number("db", _url_db(section, url), lo=0, hi=1_000_000, integer=True)
    lease_ttl = section.number("lease_ttl", 15.0, lo=1, hi=3600)
    config = ArbitrationConfig(
        method="redis",
        url=url,
        db=db,
        username=section.text("username", None),
        password=section.secret("password", required=False),
        tls=tls,
        ca_file=section.ca_file(),
        tls_verify=section.flag("tls_verify", True),
        sentinels=sentinels,
        master_name=master_name,
        sentinel_password=section.secret("sentinel_password", required=False),
        namespace=section.text("namespace", "mailroom"),
        lease_ttl_s=lease_ttl,
        marker_ttl_s=section.number("marker_ttl", 7 * 86_400.0, lo=lease_ttl, hi=366 * 86_400),
        mail_room_claims=section.flag("mail_room_claims", False),
        mail_room_namespace=_mail_room_namespace(section),
    )
    if (config.ca_file or not config.tls_verify) and not config.tls:
        section.fail("ca_file" if config.ca_file else "tls_verify", "is for TLS: use rediss://")
    section.done()
    return config


def _mail_room_namespace(section: Section) -> str | None:
    """MailRoom's Redis namespace; "" for none (MailRoom's keys are then ``delivered:<uid>``)."""
    value = section.raw("mail_room_namespace", None)
    if value is not None and not isinstance(value, str):
        section.fail("mail_room_namespace", f"expected text, got {kind(value)}")
    return value


def _url_db(section: Section, url: str | None) -> int:
    """The database number a redis:// URL's path names (``/0``), else 0."""
    if url is None or url.startswith("unix:"):
        return 0
    path = url.split("://", 1)[1].partition("/")[2]
    if not path:
        return 0
    if not path.isdigit():
        section.fail("url", "the path must be the database number, like redis://host:6379/0")
    return int(path)


def _sentinels(section: Section) -> tuple[tuple[str, int], ...]:
    raw = section.raw("sentinels", [])
    if not isinstance(raw, list):
        section.fail(
            "sentinels", f"expected a list like [{{host: h, port: 26379}}], got {kind(raw)}"
        )
    found = []
    for i, item in enumerate(raw):
        entry = section.child(item, section.where(f"sentinels[{i}]"))
        host = entry.text("host")
        port = entry.number("port", 26379, lo=1, hi=65535, integer=True)
        entry.done()
        found.append((host, int(port)))
    return tuple(found)
