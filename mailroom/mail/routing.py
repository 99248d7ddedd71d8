"""Pure routing: ``ParsedMessage`` + a mailbox's ``RoutingRules`` → a decision.

``Deliver(key, matched_header)`` when the message is addressed to the application,
``Ignore(rule)`` for auto-generated mail (no webhook, no notice), ``Reject(reason)`` otherwise.
With ``mode: forward_all`` the application decides: every message is delivered (the key when
one is found, for information), auto-generated mail too when ``forward_auto_generated``, and
nothing is rejected. Every pattern here runs in linear time on hostile headers. No I/O here.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mailroom.mail.message import ParsedMessage, scan_addresses

__all__ = [
    "AUTO_GENERATED_RULES",
    "CANDIDATE_HEADERS",
    "UNKNOWN_INCOMING_EMAIL",
    "UNPARSABLE_MESSAGE",
    "AddressTemplate",
    "Decision",
    "Deliver",
    "Ignore",
    "Reject",
    "RoutingMode",
    "RoutingRules",
    "auto_generated",
    "decide",
    "warnings",
]

KEY_PLACEHOLDER = "%{key}"
UNKNOWN_INCOMING_EMAIL = "unknown incoming email"
UNPARSABLE_MESSAGE = "unparsable message"
# RFC 5321 §4.5.3.1.1 caps a local part at 64 octets; a longer prefix leaves too little room for
# the key (GitLab's are 32 characters).
LOCAL_PART_MAX = 64
PREFIX_WARN_AFTER = 31
REPLY_PREFIX = "reply-"

# Candidate headers in the documented order (docs/routing.md); the first match wins.
# "References" stands for the reply ids in References, then In-Reply-To.
CANDIDATE_HEADERS = (
    "To",
    "References",
    "Delivered-To",
    "X-Delivered-To",
    "Envelope-To",
    "X-Envelope-To",
    "Received",
    "X-Original-To",
    "X-Forwarded-To",
    "Cc",
)
# Rule names are config keys: stable, snake_case, in the order they are checked.
AUTO_GENERATED_RULES = (
    "auto_submitted",
    "x_autoreply",
    "precedence",
    "x_auto_response_suppress",
    "dsn",
    "null_sender",
    "mailer_daemon",
    "x_loop",
)
# `for <addr>` in a Received header (RFC 5321 §4.4). One greedy class after a fixed prefix and
# each address follows exactly one "for": linear even on `for <` repeated 100,000 times.
_RECEIVED_FOR = re.compile(r"\bfor\s+<?([^\s<>;]+)", re.IGNORECASE)
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")
_LOCAL_FORBIDDEN = re.compile(r"[\s<>()\[\],;:\"\\]")
_EXAMPLE = "incoming+%{key}@example.com"
# RFC 2076 §3.9 Precedence values that mark list and bulk mail; auto_reply is Microsoft's.
_PRECEDENCE = frozenset({"bulk", "junk", "list", "auto_reply"})
_DAEMONS = frozenset({"mailer-daemon", "postmaster"})


@dataclass(frozen=True, slots=True)
class AddressTemplate:
    """An ``address`` setting: ``incoming+%{key}@host`` (sub-address), ``incoming-%{key}@host``
    (catch-all), or a dedicated address without ``%{key}`` that accepts replies only."""

    template: str
    prefix: str
    suffix: str
    domain: str
    has_key: bool

    @classmethod
    def parse(cls, template: str) -> AddressTemplate:
        """Validate ``template``; ``ValueError`` says what is wrong and what to write instead."""
        text = template.strip()
        local, at, domain = text.rpartition("@")
        if not at or not local or not domain or "@" in local:
            raise ValueError(f"{template!r} is not an address template; write it like {_EXAMPLE}")
        if _LOCAL_FORBIDDEN.search(local) or _LOCAL_FORBIDDEN.search(domain):
            raise ValueError(
                f"{template!r}: write the bare address, without a display name, quotes, spaces "
                f"or angle brackets, like {_EXAMPLE}"
            )
        if any(c in domain for c in "%{}"):
            raise ValueError(
                f"{template!r}: {KEY_PLACEHOLDER} must be in the local part (before the @), "
                f"like {_EXAMPLE}"
            )
        if local.count(KEY_PLACEHOLDER) > 1:
            raise ValueError(f"{template!r}: {KEY_PLACEHOLDER} may appear only once")
        prefix, _, suffix = local.partition(KEY_PLACEHOLDER)
        if any(c in prefix + suffix for c in "%{}"):
            raise ValueError(
                f"{template!r}: write the placeholder whole, as {KEY_PLACEHOLDER}, like {_EXAMPLE}"
            )
        if not _DOMAIN.fullmatch(domain.lower()) or ".." in domain:
            raise ValueError(f"{template!r}: {domain!r} is not a domain name")
        return cls(
            template=text,
            prefix=prefix.lower(),
            suffix=suffix.lower(),
            domain=domain.lower(),
            has_key=KEY_PLACEHOLDER in local,
        )

    def match(self, address: str) -> str | None:
        """The key if ``address`` fits the template (``""`` for a dedicated address), else None.

        Local-part prefix/suffix and domain compare case-insensitively; the key keeps its case.
        """
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at or domain.lower() != self.domain:
            return None
        lowered = local.lower()
        if not self.has_key:
            return "" if lowered == self.prefix else None
        if len(local) <= len(self.prefix) + len(self.suffix):
            return None
        if not (lowered.startswith(self.prefix) and lowered.endswith(self.suffix)):
            return None
        return local[len(self.prefix) : len(local) - len(self.suffix)]

    def format(self, key: str) -> str:
        """The address for ``key`` (the template itself for a dedicated address)."""
        return self.template.replace(KEY_PLACEHOLDER, key)


def warnings(template: AddressTemplate) -> list[str]:
    """Config-time advice on ``template`` that is not an error (log it at load)."""
    if template.has_key and len(template.prefix) > PREFIX_WARN_AFTER:
        room = LOCAL_PART_MAX - len(template.prefix) - len(template.suffix)
        return [
            f"the local part before {KEY_PLACEHOLDER} is {len(template.prefix)} characters; "
            f"providers cap local parts at {LOCAL_PART_MAX} (RFC 5321 §4.5.3.1.1), which leaves "
            f"{max(room, 0)} for the key: keep it to {PREFIX_WARN_AFTER} characters or fewer"
        ]
    return []


class RoutingMode(enum.Enum):
    """``routing.mode``: match the address template, or let the application decide."""

    MATCH = "match"
    FORWARD_ALL = "forward_all"  # GitLab matches Service Desk addresses and rejects by itself


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingRules:
    """What ``decide`` needs of one mailbox's config.

    ``reply_host`` is the host of reply ids ``reply-<key>@<host>`` (default: the template's
    domain); ``ignore_auto_generated`` holds the enabled rule names of ``AUTO_GENERATED_RULES``;
    ``own_addresses`` are ours besides every address the template matches (X-Loop, notices).
    """

    address: AddressTemplate
    reply_host: str | None = None
    ignore_auto_generated: frozenset[str] = frozenset(AUTO_GENERATED_RULES)
    own_addresses: frozenset[str] = frozenset()
    mode: RoutingMode = RoutingMode.MATCH
    forward_auto_generated: bool = False  # forward_all only: post auto-generated mail too

    def __post_init__(self) -> None:
        unknown = sorted(self.ignore_auto_generated.difference(AUTO_GENERATED_RULES))
        if unknown:
            raise ValueError(
                f"unknown auto-generated rule {unknown[0]!r}; "
                f"known rules: {', '.join(AUTO_GENERATED_RULES)}"
            )
        own = frozenset(a.strip().strip("<>").lower() for a in self.own_addresses)
        object.__setattr__(self, "own_addresses", own)
        if self.reply_host is not None:
            object.__setattr__(self, "reply_host", self.reply_host.strip().lower() or None)

    @property
    def reply_domain(self) -> str:
        return self.reply_host or self.address.domain

    def is_own(self, address: str) -> bool:
        """True for our own addresses: any the template matches, and ``own_addresses``."""
        lowered = address.strip().strip("<>").lower()
        return lowered in self.own_addresses or self.address.match(lowered) is not None

    def reply_key(self, msg_id: str) -> str | None:
        """The key of a reply id ``reply-<key>@<reply host>`` (case-insensitive), or None."""
        local, at, host = msg_id.rpartition("@")
        if not at or host.lower() != self.reply_domain:
            return None
        if len(local) <= len(REPLY_PREFIX) or local[: len(REPLY_PREFIX)].lower() != REPLY_PREFIX:
            return None
        return local[len(REPLY_PREFIX) :]


@dataclass(frozen=True, slots=True)
class Deliver:
    """POST to the webhook with ``key`` and the header it was found in (both None when
    ``forward_all`` delivers a message that matched nothing)."""

    key: str | None
    matched_header: str | None


@dataclass(frozen=True, slots=True)
class Reject:
    """Not for us: a reject notice may go back (see ``notices``)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Ignore:
    """Auto-generated: dropped without a webhook or a notice; ``rule`` says which fired."""

    rule: str


Decision = Deliver | Reject | Ignore


def _keyword(value: str) -> str:
    """The leading keyword of a value: ``auto-replied; x=y (comment)`` → ``auto-replied``."""
    return value.split(";", 1)[0].split("(", 1)[0].strip().lower()


def _local_part(address: str) -> str:
    """``MAILER-DAEMON@host`` → ``mailer-daemon``; a bare ``MAILER-DAEMON`` stays whole."""
    local, _, _ = address.strip().strip("<>").partition("@")
    return local.lower()


def _auto_submitted(parsed: ParsedMessage, rules: RoutingRules) -> bool:
    # RFC 3834 §5: any value but "no" marks the message as automatically submitted.
    value = parsed.first("Auto-Submitted")
    return value is not None and _keyword(value) != "no"


def _x_autoreply(parsed: ParsedMessage, rules: RoutingRules) -> bool:
    return any(_keyword(v) == "yes" for v in parsed.header("X-Autoreply"))


def _precedence(parsed: ParsedMessage, rules: RoutingRules) -> bool:
    return any(_keyword(v) in _PRECEDENCE for v in parsed.header("Precedence"))


def _x_auto_response_suppress(parsed: ParsedMessage, rules: RoutingRules) -> bool:
    # [MS-OXCMAIL] 2.2.3.2.14: a comma-separated list; "All" suppresses every auto-response.
    return any(
        token.strip().lower() == "all"
        for value in parsed.header("X-Auto-Response-Suppress")
        for token in value.split(",")
    )


def _dsn(parsed: ParsedMessage, rules: RoutingRules) -> bool:
    # RFC 3464 §2 (a DSN is a RFC 6522 multipart/report with report-type=delivery-status).
    report_type = parsed.param("report-type") or ""
    return parsed.content_type == "multipart/report" and report_type.lower() == "delivery-status"


def _null_sender(parsed: ParsedMessage, rules: RoutingRules) -> bool:
    # RFC 5321 §4.5.5: the null reverse-path `<>` is used by bounces and other notifications.
    return parsed.return_path == ""


def _mailer_daemon(parsed: ParsedMessage, rules: RoutingRules) -> bool:
    senders = [parsed.return_path or "", parsed.from_.address if parsed.from_ else ""]
    return any(_local_part(s) in _DAEMONS for s in senders if s)


def _x_loop(parsed: ParsedMessage, rules: RoutingRules) -> bool:
    for value in parsed.header("X-Loop"):
        if rules.is_own(value) or any(rules.is_own(a) for a in scan_addresses(value)):
            return True
    return False


_CHECKS: tuple[tuple[str, Callable[[ParsedMessage, RoutingRules], bool]], ...] = (
    ("auto_submitted", _auto_submitted),
    ("x_autoreply", _x_autoreply),
    ("precedence", _precedence),
    ("x_auto_response_suppress", _x_auto_response_suppress),
    ("dsn", _dsn),
    ("null_sender", _null_sender),
    ("mailer_daemon", _mailer_daemon),
    ("x_loop", _x_loop),
)
if tuple(name for name, _ in _CHECKS) != AUTO_GENERATED_RULES:  # rule names are config keys
    raise RuntimeError("routing: _CHECKS must check AUTO_GENERATED_RULES, in their order")


def auto_generated(
    parsed: ParsedMessage, rules: RoutingRules, *, only: frozenset[str] | None = None
) -> str | None:
    """The first rule (of ``only``, default: the enabled ones) that marks ``parsed`` as
    auto-generated, or None."""
    enabled = rules.ignore_auto_generated if only is None else only
    for name, check in _CHECKS:
        if name in enabled and check(parsed, rules):
            return name
    return None


def _reply_keys(parsed: ParsedMessage, rules: RoutingRules) -> Iterator[tuple[str, str]]:
    for msg_id in parsed.references:
        if (key := rules.reply_key(msg_id)) is not None:
            yield key, "References"
    if parsed.in_reply_to and (key := rules.reply_key(parsed.in_reply_to)) is not None:
        yield key, "In-Reply-To"


def _addresses(parsed: ParsedMessage, header: str) -> Iterator[str]:
    if header == "To":
        yield from (a.address for a in parsed.to)
    elif header == "Cc":
        yield from (a.address for a in parsed.cc)
    elif header == "Received":
        for value in parsed.header("Received"):
            yield from (m.group(1) for m in _RECEIVED_FOR.finditer(value) if "@" in m.group(1))
    else:
        for value in parsed.header(header):
            yield from scan_addresses(value)


def find_key(parsed: ParsedMessage, rules: RoutingRules) -> Deliver | None:
    """The first key in the candidate headers, in ``CANDIDATE_HEADERS`` order, or None."""
    if not rules.address.has_key:  # a dedicated address takes replies only
        return next((Deliver(k, h) for k, h in _reply_keys(parsed, rules)), None)
    for header in CANDIDATE_HEADERS:
        if header == "References":
            if found := next(_reply_keys(parsed, rules), None):
                return Deliver(*found)
            continue
        for candidate in _addresses(parsed, header):
            if key := rules.address.match(candidate):
                return Deliver(key, header)
    return None


def decide(parsed: ParsedMessage, rules: RoutingRules) -> Decision:
    """Decide what to do with ``parsed`` for a mailbox routed by ``rules``. Never raises."""
    if rules.mode is RoutingMode.FORWARD_ALL:
        if parsed.unparsable:  # the application may still make sense of it
            return Deliver(None, None)
        if not rules.forward_auto_generated and (rule := auto_generated(parsed, rules)):
            return Ignore(rule)
        return find_key(parsed, rules) or Deliver(None, None)
    if parsed.unparsable:
        return Reject(UNPARSABLE_MESSAGE)
    if (rule := auto_generated(parsed, rules)) is not None:
        return Ignore(rule)
    return find_key(parsed, rules) or Reject(UNKNOWN_INCOMING_EMAIL)
