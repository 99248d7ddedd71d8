"""The configuration tree: frozen, typed dataclasses built once by the loader."""

from __future__ import annotations

import abc
import base64
import dataclasses
import hashlib
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

from mailroom.backoff import Backoff
from mailroom.envelope import FAILED_CATEGORY, FAILED_KEYWORD
from mailroom.errors import ConfigError
from mailroom.mail import routing
from mailroom.redact import origin
from mailroom.trust.values import (
    ClientCertificate,
    GoogleOAuthConfig,
    ImapOAuthConfig,
    OAuthConfig,
    Secret,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryConfig:
    """Capped exponential backoff for transient webhook failures."""

    initial_s: float = 1.0
    max_s: float = 600.0
    give_up_after_s: float | None = None  # None: never give up

    @property
    def backoff(self) -> Backoff:
        """The policy of these settings; a ``Retry-After`` is honoured up to ``max``."""
        return Backoff(
            initial_s=self.initial_s, max_s=self.max_s, give_up_after_s=self.give_up_after_s
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtConfig:
    """GitLab-compatible JWT header (HS256) on every webhook request.

    ``secret_encoding: base64`` takes the key as GitLab and MailRoom do,
    ``Base64.strict_decode64(File.read(path).chomp)``; ``raw`` signs with the text itself.
    ``secret_file`` is only where the secret came from, for messages (never the secret).
    """

    header: str = "Gitlab-Mailroom-Api-Request"
    issuer: str = "gitlab-mailroom"
    algorithm: Literal["HS256"] = "HS256"
    secret: Secret = field(repr=False)
    secret_encoding: Literal["raw", "base64"] = "raw"
    nonce: bool = True  # a random "nonce" claim, as MailRoom sends
    secret_file: str | None = None

    def key(self) -> bytes:
        """The HMAC key (validated at load: a base64 secret decodes)."""
        text = self.secret.reveal()
        if self.secret_encoding == "base64":
            return base64.b64decode(text, validate=True)
        return text.encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class BasicAuth:
    user: str
    password: Secret = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class SidekiqConfig:
    """GitLab's deprecated ``delivery_method: sidekiq``: each message pushed into GitLab's
    Redis as the Sidekiq job MailRoom pushes (``delivery.sidekiq``), instead of a POST."""

    redis: ArbitrationConfig  # where: its connection settings (url or sentinels, db, password)
    queue: str = "default"
    worker: str  # the job's class: EmailReceiverWorker, ServiceDeskEmailReceiverWorker
    namespace: str | None = None  # MailRoom's :namespace: (Redis::Namespace), usually none

    @property
    def key(self) -> str:
        """The list the job goes to: ``queue:<queue>``, under the namespace if any."""
        return f"{self.namespace}:queue:{self.queue}" if self.namespace else f"queue:{self.queue}"

    @property
    def label(self) -> str:
        """For logs and metrics: no credentials."""
        return f"sidekiq {self.key} at {self.redis.describe()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookConfig:
    """Where and how messages are POSTed (docs/webhook.md)."""

    url: str = field(repr=False)  # its ?query may hold the receiver's token: origin() shows it
    format: Literal["json", "raw"] = "json"
    content_type: str | None = None  # format: raw only; None: message/rfc822
    timeout_s: float = 30.0
    concurrency: int = 8
    signing_secret: Secret | None = field(default=None, repr=False)
    jwt: JwtConfig | None = None
    token: Secret | None = field(default=None, repr=False)
    token_scheme: Literal["bearer", "token"] = "bearer"  # token: MailRoom's postback style
    basic: BasicAuth | None = None
    tls_verify: bool = True
    ca_file: str | None = None
    proxy: str | None = field(default=None, repr=False)  # None: the environment; "direct"
    retry: RetryConfig = RetryConfig()
    sidekiq: SidekiqConfig | None = None  # pushed as a Sidekiq job instead (url is "" then)

    @property
    def origin(self) -> str:
        """What may be shown of where messages go: the URL's origin, or the Sidekiq queue."""
        return self.sidekiq.label if self.sidekiq is not None else origin(self.url)

    @property
    def request_content_type(self) -> str:
        """The ``Content-Type`` of every POST."""
        if self.format == "json":
            return "application/json"
        return self.content_type or "message/rfc822"


def webhook_labels(webhooks: Iterable[WebhookConfig]) -> dict[WebhookConfig, str]:
    """A name for each webhook, fit for logs and metric labels: its ``scheme://host:port``
    (a path or a query can hold a credential), plus a short digest of the whole URL where two
    webhooks share an origin."""
    unique = list(dict.fromkeys(webhooks))
    origins = [hook.origin for hook in unique]
    named = {}
    for hook, name in zip(unique, origins, strict=True):
        digest = hashlib.sha256(hook.url.encode()).hexdigest()[:6]
        named[hook] = f"{name}~{digest}" if origins.count(name) > 1 else name
    return named


# A poller may be this late on top of two poll intervals before it stops counting as ready.
POLL_GRACE_S = 30.0


@dataclass(frozen=True, slots=True)
class Readiness:
    """When a mailbox counts as ready (its webhook aside; ``observe.health``).

    ``within_s`` None: while its source is connected (a watcher, a listener). Else while its
    source's last success is at most ``within_s`` old (a poller: one failed poll, a 429 say,
    does not flip it)."""

    within_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MailboxConfig(abc.ABC):
    """What every kind of mailbox has; each kind's section adds its own keys.

    A kind also states here, as values every floor may read, the facts the rest of mailroom
    needs without knowing the kind: its names, when it is ready, how a dead letter is marked,
    and the advice its settings deserve. What runs it is in ``mailroom.kinds``.
    """

    kind: ClassVar[str]  # a short name: task names (imap:<id>), /readyz, logs
    inbox_method: ClassVar[str]  # the config's name for it (GitLab's inbox_method)

    id: str
    routing: routing.RoutingRules  # the address template and the routing switches
    max_message_bytes: int = 26_214_400
    webhook: WebhookConfig

    @property
    def readiness(self) -> Readiness:
        """When the mailbox counts as ready: by default while its source is connected."""
        return Readiness()

    @property
    @abc.abstractmethod
    def dead_letter(self) -> str:
        """How a dead letter of this mailbox is marked, for the dry run and ``route``."""

    def advice(self) -> tuple[tuple[str, str], ...]:
        """Settings that work but deserve a warning at load: ``(key, what to do)`` pairs."""
        return ()

    def with_secret(self, secret: Secret) -> MailboxConfig:
        """The same mailbox with its login secret set (GitLab mode injects it after
        validation)."""
        raise ConfigError("", f"a {self.inbox_method} mailbox takes no login secret")


@dataclass(frozen=True, slots=True, kw_only=True)
class FolderMailboxConfig(MailboxConfig):
    """A mailbox read from a folder of an account on a server (IMAP, Graph): settled by acting
    on the message there, a dead letter moved to ``failed_folder`` or marked in place."""

    marked: ClassVar[str]  # how a dead letter is marked in place, without failed_folder

    user: str
    mailbox: str
    delete_after_delivery: bool
    failed_folder: str | None = None

    @property
    def dead_letter(self) -> str:
        if self.failed_folder is not None:
            return f"moved to {self.failed_folder} (failed_folder)"
        return f"{self.marked}, left in place (no failed_folder)"

    @abc.abstractmethod
    def folder_key(self, folder: str) -> tuple[str, ...]:
        """``folder`` of this mailbox's account as its server names it: two mailboxes with
        the same key for a folder share it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ImapMailboxConfig(FolderMailboxConfig):
    """One IMAP mailbox, in the vocabulary of GitLab's ``incoming_email`` settings."""

    kind = "imap"
    inbox_method = "imap"
    marked = f"flagged {FAILED_KEYWORD} and \\Seen"

    host: str
    port: int
    ssl: bool = False
    start_tls: bool = False
    tls_verify: bool = True
    ca_file: str | None = None
    password: Secret | None = field(default=None, repr=False)  # None with auth: xoauth2
    auth: Literal["password", "xoauth2"] = "password"
    oauth: ImapOAuthConfig | None = None  # the token source for auth: xoauth2
    mailbox: str = "INBOX"
    idle_timeout_s: float = 60.0
    search_command: str = "UNSEEN"
    search_command_exact: bool = False  # True: search_command is sent as written
    delete_after_delivery: bool = True
    expunge_deleted: bool = False

    def advice(self) -> tuple[tuple[str, str], ...]:
        if self.auth == "password" and not (self.ssl or self.start_tls):
            return (
                (
                    "ssl",
                    "the IMAP password would cross the network in clear text; set ssl: true "
                    "(port 993) or start_tls: true",
                ),
            )
        return ()

    def with_secret(self, secret: Secret) -> ImapMailboxConfig:
        return replace(self, password=secret)

    def folder_key(self, folder: str) -> tuple[str, ...]:
        name = "INBOX" if folder.upper() == "INBOX" else folder  # RFC 3501 §5.1: any case
        return (self.kind, self.host.lower(), str(self.port), self.user, name)


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphInboxOptions:
    """``inbox_options`` of a Microsoft Graph mailbox (GitLab's names)."""

    tenant_id: str
    client_id: str
    client_secret: Secret | None = field(default=None, repr=False)
    client_certificate: ClientCertificate | None = None
    poll_interval_s: float = 60.0
    azure_ad_endpoint: str = "https://login.microsoftonline.com"
    graph_endpoint: str = "https://graph.microsoft.com"
    ca_file: str | None = None  # for both endpoints; trusted on top of the system store
    tls_verify: bool = True
    proxy: str | None = field(default=None, repr=False)  # for both endpoints

    @property
    def oauth(self) -> OAuthConfig:
        """The token source: the same app, scope ``<graph_endpoint>/.default``."""
        return OAuthConfig(
            tenant_id=self.tenant_id,
            client_id=self.client_id,
            client_secret=self.client_secret,
            client_certificate=self.client_certificate,
            azure_ad_endpoint=self.azure_ad_endpoint,
            scope=f"{self.graph_endpoint}/.default",
            ca_file=self.ca_file,
            tls_verify=self.tls_verify,
            proxy=self.proxy,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphMailboxConfig(FolderMailboxConfig):
    """One Microsoft 365 mailbox read through Microsoft Graph (``microsoft_graph``)."""

    kind = "graph"
    inbox_method = "microsoft_graph"
    marked = f"categorised {FAILED_CATEGORY} and read"

    # user: the mailbox's user principal name or object id
    mailbox: str = "inbox"  # a well-known folder name or a folder id
    delete_after_delivery: bool = False  # docs/microsoft.md: Graph deletes are soft, then purged
    inbox_options: GraphInboxOptions

    @property
    def readiness(self) -> Readiness:
        """While its last successful poll is at most two intervals (and a grace) old."""
        return Readiness(within_s=2 * self.inbox_options.poll_interval_s + POLL_GRACE_S)

    def with_secret(self, secret: Secret) -> GraphMailboxConfig:
        options = replace(self.inbox_options, client_secret=secret)
        return replace(self, inbox_options=options)

    def folder_key(self, folder: str) -> tuple[str, ...]:
        # Graph's display names and well-known names ignore case.
        endpoint = self.inbox_options.graph_endpoint
        return (self.kind, endpoint, self.user.lower(), folder.lower())


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
class LogFile:
    """A file that gets every log line as JSON as well (MailRoom's ``log_path``)."""

    path: str
    mailboxes: frozenset[str] | None = None  # whose lines go there; None: every line
    origin: str = "log.file"  # the setting it came from, for messages


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    format: Literal["json", "text"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    files: tuple[LogFile, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    """``health:`` where ``/healthz``, ``/readyz`` and ``/metrics`` are served."""

    host: str = "127.0.0.1"  # config key `listen: "host:port"`
    port: int = 8080  # 0: any free port (logged)
    stall_after_s: float = 300.0  # a webhook is stalled: no progress for this long
    # Ready when all mailboxes are, any one is, or at least this fraction of them (0 < f <= 1).
    ready_when: Literal["all", "any"] | float = "all"


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    """``limits:``, process-wide: what may be in flight across all mailboxes, and how many
    connects and logins may run at once. The defaults fit a 512 MiB container."""

    in_flight_messages: int = 2048
    in_flight_bytes: int = 64 * 1024 * 1024
    connects: int = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadConfig:
    """``reload:``: also reload when the config file changes (where no SIGHUP can be sent: a
    Kubernetes ConfigMap is swapped behind a symlink)."""

    watch: bool = False
    interval_s: float = 2.0  # how often the file is looked at


@dataclass(frozen=True, slots=True, kw_only=True)
class ArbitrationConfig:
    """``arbitration:``: how replicas share the mailboxes (docs/scaling.md, "Replicas").

    ``method: none`` (one process, the default) or ``redis``: a Redis at ``url``
    (``redis://``, ``rediss://`` for TLS, ``unix:///path``), or the master ``master_name``
    that ``sentinels`` name."""

    method: Literal["none", "redis"] = "none"
    url: str | None = None  # without user:password@ (username, password keys)
    db: int = 0
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)
    tls: bool = False  # rediss://, or tls: true with sentinels
    ca_file: str | None = None
    tls_verify: bool = True
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    sentinel_password: Secret | None = field(default=None, repr=False)
    namespace: str = "mailroom"
    lease_ttl_s: float = 15.0
    marker_ttl_s: float = 7 * 86_400.0
    # A migration from the MailRoom gem: claim MailRoom's "<ns>:delivered:<uid>" key too, so
    # MailRoom processes still running leave alone what mailroom takes, and the reverse.
    mail_room_claims: bool = False
    mail_room_namespace: str | None = None  # MailRoom's namespace; None: ``namespace``

    def mail_room_key(self, uid: str) -> str:
        """MailRoom's claim of the message ``uid`` (lib/mail_room/arbitration/redis.rb, under
        its Redis::Namespace)."""
        namespace = self.namespace if self.mail_room_namespace is None else self.mail_room_namespace
        return f"{namespace}:delivered:{uid}" if namespace else f"delivered:{uid}"

    @property
    def enabled(self) -> bool:
        return self.method == "redis"

    def describe(self) -> str:
        """Where Redis is, fit for a log line (no credentials)."""
        if self.sentinels:
            hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"master {self.master_name} via sentinels {hosts}"
        return f"{self.url} (db {self.db})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration."""

    mailboxes: tuple[MailboxConfig, ...]
    webhook: WebhookConfig
    log: LogConfig = LogConfig()
    shutdown_timeout_s: float = 20.0
    reject_notices: RejectNoticesConfig | None = None  # None: notices are off
    health: HealthConfig | None = None  # None (absent or null): no health server
    limits: LimitsConfig = LimitsConfig()
    arbitration: ArbitrationConfig = ArbitrationConfig()
    reload: ReloadConfig = ReloadConfig()
    warnings: tuple[str, ...] = ()  # advice found at load, "<dotted.path>: ..."; log them
    credentials: CredentialsConfig | None = None  # where user/password came from, if anywhere


# -- The keys users write, derived from the model ---------------------------------------------
# A field of a block is read from the key of its name, less the unit of STYLE 6
# (idle_timeout_s ← idle_timeout); a Secret also from "<key>_file"; a field that holds a block
# adds that block's keys. The exceptions are the one table below, so that a new key is
# declared once, as a field: reader.KEYS (typo suggestions, unknown keys, *_file checks) is
# derived from it, and tests/test_config.py checks it against the keys the getters read.
_CERTIFICATE_KEYS = (
    "client_certificate",
    "client_certificate_file",
    "client_certificate_thumbprint",
)
FIELD_KEYS: dict[tuple[type, str], tuple[str, ...]] = {
    (Config, "warnings"): (),  # found at load
    (LogConfig, "files"): ("file",),  # one file (MailRoom's log_path gives more in GitLab mode)
    (SidekiqConfig, "redis"): (),  # its keys are the sidekiq block's own, as arbitration's
    (RejectNoticesConfig, "sender"): ("from",),
    (RejectNoticesConfig, "sender_address"): (),  # parsed from "from"
    (HealthConfig, "host"): ("listen",),  # listen: "host:port"
    (HealthConfig, "port"): ("listen",),
    (routing.RoutingRules, "address"): ("address",),  # the template: one key, not its parts
    (OAuthConfig, "client_certificate"): _CERTIFICATE_KEYS,  # a PEM file and its thumbprint
    (GraphInboxOptions, "client_certificate"): _CERTIFICATE_KEYS,
    (GoogleOAuthConfig, "subject"): (),  # the mailbox's user
    # A service account's key, or an installed app's client and refresh token.
    (GoogleOAuthConfig, "credential"): (
        *("service_account", "service_account_file", "client_id", "client_secret"),
        *("client_secret_file", "refresh_token", "refresh_token_file"),
    ),
}
# Keys that choose which block is built (or none), held by no field.
SWITCH_KEYS = ("inbox_method", "provider", "enabled")


def config_keys(root: type = Config) -> frozenset[str]:
    """Every key any block of the config has, from the model under ``root`` (see FIELD_KEYS)."""
    keys, seen, todo = set(SWITCH_KEYS), set(), [root]
    while todo:
        block = todo.pop()
        if block in seen:
            continue
        seen.add(block)
        hints = typing.get_type_hints(block)
        for item in dataclasses.fields(block):
            named = FIELD_KEYS.get((block, item.name))
            if named is not None:
                keys.update(named)
                continue
            key = item.name.removesuffix("_s")  # seconds: the only unit a key leaves out
            keys.add(key)
            kinds = _kinds(hints[item.name])
            if Secret in kinds:
                keys.add(f"{key}_file")
            todo += [kind for kind in kinds if dataclasses.is_dataclass(kind)]
        todo += block.__subclasses__()  # a field of a base class holds any kind of it
    return frozenset(keys)


def _kinds(hint: object) -> set[type]:
    """The classes in a type hint: ``tuple[MailboxConfig, ...]`` → the two mailbox classes."""
    found = {hint} if isinstance(hint, type) else set()
    for arg in typing.get_args(hint):
        found |= _kinds(arg)
    return found
