"""The mailboxes: IMAP, Microsoft Graph, LMTP listeners, their oauth blocks and routing rules."""

from __future__ import annotations

import grp
import ipaddress
import pwd
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mailroom.config.model import (
    GraphInboxOptions,
    GraphMailboxConfig,
    ImapMailboxConfig,
    Listen,
    LmtpMailboxConfig,
    MailboxConfig,
    WebhookConfig,
)
from mailroom.config.oauth import entra, imap_oauth
from mailroom.config.reader import (
    HOST_RE,
    IDLE_TIMEOUT_MAX_S,
    Section,
    kind,
    parse_address,
    shown,
    suggestion,
)
from mailroom.config.sections import parse_webhook
from mailroom.mail import routing
from mailroom.redact import WORD
from mailroom.trust import credentials, tls
from mailroom.trust.values import ImapOAuthConfig, Secret


def _stored_login(
    section: Section, stored: Mapping[str, credentials.StoredLogin] | None
) -> credentials.StoredLogin | None:
    """This mailbox's entry in the credentials file, found by its explicit ``id``."""
    if stored is None or not section.has("id"):
        return None
    return stored.get(str(section.raw("id")))


def _user(section: Section, login: credentials.StoredLogin | None, *, stored: bool) -> str:
    """``user`` from the config, else from the credentials file."""
    if section.has("user") or login is None or login.user is None:
        if not section.has("user") and stored:
            section.fail(
                "user",
                "is required: in the config, or in the credentials file under this mailbox's id "
                "(give the mailbox an id)",
            )
        return str(section.text("user"))
    section.used.add("user")
    return login.user


def parse_mailbox(
    section: Section,
    webhook_raw: dict[str, Any],
    index: int,
    stored: Mapping[str, credentials.StoredLogin] | None = None,
) -> MailboxConfig:
    method = section.choice("inbox_method", "imap", tuple(SECTIONS))
    template = section.text("address")  # outside the try: a ConfigError is a ValueError
    try:
        address = routing.AddressTemplate.parse(template)
    except ValueError as exc:
        if WORD.fullmatch(template):  # routing's messages quote the template
            section.fail("address", str(exc))
        section.fail(
            "address",
            f"{shown(template)} is not an address template; write it "
            "like incoming+%{key}@example.com (no spaces)",
        )
    login = _stored_login(section, stored)
    mailbox = SECTIONS[method](section, address, webhook_raw, login, stored is not None)
    section.done()
    return mailbox


def _imap_mailbox(
    section: Section,
    address: routing.AddressTemplate,
    webhook_raw: dict[str, Any],
    login: credentials.StoredLogin | None,
    stored: bool,
) -> ImapMailboxConfig:
    """``inbox_method: imap``: GitLab's ``incoming_email`` keys; the login from the config or
    the credentials file."""
    ssl, start_tls, port = _imap_transport(section)
    auth = section.choice("auth", "password", ("password", "xoauth2"))
    host = section.text("host")
    user = _user(section, login, stored=stored)
    mailbox = section.text("mailbox", "INBOX")
    password, oauth = _imap_credentials(section, auth, login, user)
    webhook = _mailbox_webhook(section, webhook_raw)
    return ImapMailboxConfig(
        id=section.text("id", f"{user}@{host}/{mailbox}"),
        routing=_routing_rules(section, address, user),
        host=host,
        port=port,
        ssl=ssl,
        start_tls=start_tls,
        tls_verify=section.flag("tls_verify", True),
        ca_file=section.ca_file(),
        user=user,
        password=password,
        auth=auth,
        oauth=oauth,
        mailbox=mailbox,
        idle_timeout_s=section.number("idle_timeout", 60.0, lo=1, hi=IDLE_TIMEOUT_MAX_S),
        search_command=section.text("search_command", "UNSEEN"),
        search_command_exact=section.flag("search_command_exact", False),
        delete_after_delivery=section.flag("delete_after_delivery", True),
        expunge_deleted=section.flag("expunge_deleted", False),
        failed_folder=_failed_folder(section, mailbox, imap=True),
        legacy_id_keywords=section.flag("legacy_id_keywords", False),
        max_message_bytes=section.number(
            "max_message_bytes", 26_214_400, lo=1024, hi=2**31, integer=True
        ),
        webhook=webhook,
    )


def _imap_transport(section: Section) -> tuple[bool, bool, int]:
    """``ssl``, ``start_tls`` and ``port``, which must agree."""
    ssl = section.flag("ssl", False)
    start_tls = section.flag("start_tls", False)
    if ssl and start_tls:
        section.fail("start_tls", "ssl (implicit TLS) and start_tls exclude each other; pick one")
    port = section.number("port", 993 if ssl else 143, lo=1, hi=65535, integer=True)
    if port == 993 and not ssl:
        section.fail("port", "993 with ssl: false; set ssl: true or use port 143")
    if port == 143 and ssl:
        section.fail("port", "143 with ssl: true; use port 993, or ssl: false with start_tls: true")
    return ssl, start_tls, port


def _imap_credentials(
    section: Section, auth: str, login: credentials.StoredLogin | None, user: str
) -> tuple[Secret | None, ImapOAuthConfig | None]:
    """The password (from the config or the credentials file), or with ``auth: xoauth2`` the
    ``oauth`` block the token comes from."""
    from_file = login.password if login is not None else None
    password = section.secret("password", required=auth == "password" and from_file is None)
    if password is None and from_file is not None:
        if auth == "xoauth2":
            section.fail(
                "auth",
                "is xoauth2, but the credentials file gives this mailbox a password; remove it "
                "there (the token comes from the oauth block)",
            )
        password = Secret(from_file)
    if auth != "xoauth2":
        if section.has("oauth"):
            section.fail("oauth", "is used only with auth: xoauth2; set auth: xoauth2 or remove it")
        return password, None
    if password is not None:
        section.fail("password", "auth: xoauth2 gets its token from the oauth block; remove it")
    if (oauth_section := section.section("oauth")) is None:
        section.fail(
            "oauth",
            "is required with auth: xoauth2 (Entra ID: tenant_id, client_id, client_secret; "
            "or provider: google with service_account_file)",
        )
    oauth = imap_oauth(oauth_section, user=user)
    oauth_section.done()
    return None, oauth


def _failed_folder(section: Section, mailbox: str, *, imap: bool) -> str | None:
    """``failed_folder``, never the watched folder itself: a dead letter moved there would be
    found, and posted, again. IMAP names are case-sensitive but INBOX (RFC 3501 §5.1); Graph's
    are not."""
    folder: str | None = section.text("failed_folder", None)
    if folder is None:
        return None
    same = folder.casefold() == mailbox.casefold()
    if imap and folder.casefold() != "inbox":
        same = folder == mailbox
    if same:
        section.fail(
            "failed_folder",
            f"is the folder this mailbox watches ({mailbox}); dead letters would be read again: "
            "name another folder, like mailroom-failed, or remove it to flag them in place",
        )
    return folder


def _mailbox_webhook(section: Section, webhook_raw: dict[str, Any]) -> WebhookConfig:
    """The top-level webhook with this mailbox's ``webhook:`` keys laid over it."""
    merged = dict(webhook_raw)
    if (override := section.raw("webhook", None)) is not None:
        if not isinstance(override, dict):
            section.fail("webhook", f"expected a mapping of webhook keys, got {kind(override)}")
        merged.update(override)
    return parse_webhook(section.child(merged, section.where("webhook")))


def _graph_mailbox(
    section: Section,
    address: routing.AddressTemplate,
    webhook_raw: dict[str, Any],
    login: credentials.StoredLogin | None,
    stored: bool,
) -> GraphMailboxConfig:
    """``inbox_method: microsoft_graph``: GitLab's keys, with ``inbox_options``."""
    if login is not None and login.password is not None:
        section.fail(
            "id",
            "the credentials file gives this microsoft_graph mailbox a password; it takes "
            "only user there (its secret is inbox_options.client_secret)",
        )
    user = _user(section, login, stored=stored)
    for key in ("host", "port", "ssl", "start_tls", "password", "password_file", "auth"):
        if section.has(key):
            section.fail(key, "is an IMAP setting; a microsoft_graph mailbox uses inbox_options")
    if (options_section := section.section("inbox_options")) is None:
        section.fail("inbox_options", "is required with inbox_method: microsoft_graph")
    graph_endpoint = str(
        options_section.url("graph_endpoint", "https://graph.microsoft.com")
    ).rstrip("/")
    oauth = entra(options_section, scope=f"{graph_endpoint}/.default")
    options = GraphInboxOptions(
        tenant_id=oauth.tenant_id,
        client_id=oauth.client_id,
        client_secret=oauth.client_secret,
        client_certificate=oauth.client_certificate,
        poll_interval_s=options_section.number("poll_interval", 60.0, lo=0.1, hi=86_400),
        azure_ad_endpoint=oauth.azure_ad_endpoint,
        graph_endpoint=graph_endpoint,
        ca_file=oauth.ca_file,
        tls_verify=oauth.tls_verify,
        proxy=oauth.proxy,
    )
    options_section.done()
    mailbox = section.text("mailbox", "inbox")
    return GraphMailboxConfig(
        id=section.text("id", f"{user}@graph/{mailbox}"),
        routing=_routing_rules(section, address, user),
        user=user,
        mailbox=mailbox,
        delete_after_delivery=section.flag("delete_after_delivery", False),
        failed_folder=_failed_folder(section, mailbox, imap=False),
        max_message_bytes=section.number(
            "max_message_bytes", 26_214_400, lo=1024, hi=2**31, integer=True
        ),
        webhook=_mailbox_webhook(section, webhook_raw),
        inbox_options=options,
    )


_LISTEN_EXAMPLE = "127.0.0.1:2424, [::1]:2424 or unix:/run/mailroom/lmtp.sock"
# Keys of a mailbox on a server, which a listener has no use for.
_SERVER_KEYS = ("host", "port", "ssl", "start_tls", "user", "password", "password_file", "auth")


def _lmtp_mailbox(
    section: Section,
    address: routing.AddressTemplate,
    webhook_raw: dict[str, Any],
    login: credentials.StoredLogin | None,
    stored: bool,
) -> LmtpMailboxConfig:
    """``inbox_method: lmtp``: a listener the MTA delivers to (RFC 2033)."""
    for key in (*_SERVER_KEYS, "mailbox", "inbox_options", "failed_folder"):
        if section.has(key):
            section.fail(
                key, "is a setting of a mailbox on a server; an lmtp mailbox listens (listen:)"
            )
    if login is not None:
        section.fail("id", "the credentials file has an entry for this lmtp mailbox; remove it")
    allow_remote = section.flag("allow_remote", False)
    listen = _listen(section, allow_remote)
    idle_timeout = section.number("idle_timeout", 300.0, lo=1, hi=3600)
    reply_within = section.number("reply_within", 60.0, lo=0.5, hi=3600)
    if reply_within >= idle_timeout:
        section.fail(
            "reply_within",
            f"must be shorter than idle_timeout ({idle_timeout:g}s), which also bounds the "
            "wait for the replies after DATA",
        )
    cert_file = section.path_value("tls_cert_file")
    key_file = section.path_value("tls_key_file")
    if (cert_file is None) != (key_file is None):
        missing = "tls_key_file" if key_file is None else "tls_cert_file"
        section.fail(missing, "is required with the other; STARTTLS needs both, or neither")
    if cert_file is not None and key_file is not None:
        try:
            tls.server_context(cert_file=cert_file, key_file=key_file)
        except tls.TlsConfigError as exc:
            section.fail("tls_cert_file", str(exc))
    hostname = section.text("hostname", socket.gethostname() or "localhost")
    if not HOST_RE.fullmatch(hostname.lower()):
        section.fail(
            "hostname", f"{shown(hostname)} is not a host name; write it like mx.example.com"
        )
    return LmtpMailboxConfig(
        id=section.text("id", f"lmtp:{listen}"),
        routing=_routing_rules(section, address, ""),
        listen=listen,
        allow_remote=allow_remote,
        hostname=hostname,
        max_message_bytes=section.number(
            "max_message_bytes", 26_214_400, lo=1024, hi=2**31, integer=True
        ),
        max_recipients=section.number("max_recipients", 50, lo=1, hi=1000, integer=True),
        max_connections=section.number("max_connections", 100, lo=1, hi=100_000, integer=True),
        reply_within_s=reply_within,
        idle_timeout_s=idle_timeout,
        tls_cert_file=cert_file,
        tls_key_file=key_file,
        webhook=_mailbox_webhook(section, webhook_raw),
    )


def _listen(section: Section, allow_remote: bool) -> Listen:
    """``listen``: ``host:port``, ``[v6]:port`` or ``unix:/path`` (with ``socket_mode``,
    ``socket_owner``, ``socket_group``); only loopback unless ``allow_remote``."""
    text = str(section.text("listen"))
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not Path(path).is_absolute():
            section.fail(
                "listen", f"unix:{shown(path)} is not an absolute path; write {_LISTEN_EXAMPLE}"
            )
        owner = section.text("socket_owner", None)
        group = section.text("socket_group", None)
        _exists(section, "socket_owner", owner, pwd.getpwnam)
        _exists(section, "socket_group", group, grp.getgrnam)
        return Listen(path=path, mode=_socket_mode(section), owner=owner, group=group)
    for key in ("socket_mode", "socket_owner", "socket_group"):
        if section.has(key):
            section.fail(key, "is for a unix socket (listen: unix:/path); remove it")
    host, _, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or (":" in host and not bracketed):
        section.fail("listen", f"{shown(text)} is not host:port; write {_LISTEN_EXAMPLE}")
    if int(port) > 65535:
        section.fail("listen", f"port {port} is out of range; use a value from 0 to 65535")
    if not allow_remote and not _loopback(host):
        section.fail(
            "listen",
            f"{shown(host)} is not a loopback address, and the listener takes mail from whoever "
            "connects: listen on 127.0.0.1, [::1] or a unix socket, or set allow_remote: true "
            "where a firewall keeps strangers out",
        )
    return Listen(host=host, port=int(port))


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: where it points can change


def _socket_mode(section: Section) -> int:
    """``socket_mode``: octal text (``"0660"``) or the number YAML made of an unquoted 0660."""
    value = section.raw("socket_mode", 0o660)
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            value = -1
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        section.fail("socket_mode", 'expected permission bits in octal, like "0660"')
    return value


def _exists(section: Section, key: str, name: str | None, find: Callable[[str], object]) -> None:
    """A user or group ``name`` (or a number) must exist here."""
    if name is None or name.isdigit():
        return
    try:
        find(name)
    except KeyError:
        section.fail(key, f"{shown(name)} does not exist on this machine")


# Each kind of mailbox and how its section is read, by its inbox_method; the config's one
# place that knows the kinds (what runs each one is mailroom.kinds).
SectionParser = Callable[
    [Section, routing.AddressTemplate, dict[str, Any], credentials.StoredLogin | None, bool],
    MailboxConfig,
]
SECTIONS: dict[str, SectionParser] = {
    ImapMailboxConfig.inbox_method: _imap_mailbox,
    GraphMailboxConfig.inbox_method: _graph_mailbox,
    LmtpMailboxConfig.inbox_method: _lmtp_mailbox,
}


def _routing_rules(
    section: Section, address: routing.AddressTemplate, user: str
) -> routing.RoutingRules:
    """``reply_host``, ``ignore_auto_generated`` and ``own_addresses`` of one mailbox."""
    reply_host = section.text("reply_host", None)
    if reply_host is not None and not HOST_RE.fullmatch(reply_host.lower()):
        section.fail(
            "reply_host", f"{shown(reply_host)} is not a host name; write it like example.com"
        )
    enabled = set(routing.AUTO_GENERATED_RULES)
    if (rules := section.section("ignore_auto_generated")) is not None:
        known = ", ".join(routing.AUTO_GENERATED_RULES)
        for name in rules.data:
            if name not in routing.AUTO_GENERATED_RULES:
                hint = suggestion(str(name), routing.AUTO_GENERATED_RULES)
                rules.fail(str(name), f"unknown rule{hint or '; known rules: ' + known}")
            if not rules.flag(name, True):
                enabled.discard(name)
        rules.done()
    own = {user} if "@" in user else set()
    raw_own = section.raw("own_addresses", [])
    if not isinstance(raw_own, list):
        section.fail("own_addresses", f"expected a list of addresses, got {kind(raw_own)}")
    for i, item in enumerate(raw_own):
        if not isinstance(item, str):
            section.fail(f"own_addresses[{i}]", f"expected an address, got {kind(item)}")
        own.add(
            parse_address(section, f"own_addresses[{i}]", section.expand("own_addresses", item))
        )
    return routing.RoutingRules(
        address=address,
        reply_host=reply_host,
        ignore_auto_generated=frozenset(enabled),
        own_addresses=frozenset(own),
    )
