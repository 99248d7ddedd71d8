"""Pure routing: ``ParsedMessage`` + a mailbox's address template → a decision.

``Deliver(key, matched_header)`` when the message is addressed to the application,
``Ignore(rule)`` for auto-generated mail (no webhook, no notice), ``Reject(reason)`` otherwise.
No I/O here.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

from mailroom.message import ParsedMessage

__all__ = ["AddressTemplate", "Decision", "Deliver", "Ignore", "Reject", "decide"]

KEY_PLACEHOLDER = "%{key}"

# Candidate headers in the documented order (ARCHITECTURE.md, Routing); the first match wins.
CANDIDATE_HEADERS = (
    "To",
    "Delivered-To",
    "X-Delivered-To",
    "Envelope-To",
    "X-Envelope-To",
    "Received",
    "X-Original-To",
    "X-Forwarded-To",
    "Cc",
)
# `for <addr>` in a Received header (RFC 5321 §4.4). No nested quantifiers: linear time.
_RECEIVED_FOR = re.compile(r"\bfor\s+<?([^\s<>;@]+@[^\s<>;]+?)>?(?:;|\s|$)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class AddressTemplate:
    """An ``address`` setting such as ``incoming+%{key}@example.com``."""

    template: str
    prefix: str
    suffix: str
    domain: str
    has_key: bool

    @classmethod
    def parse(cls, template: str) -> AddressTemplate:
        """Validate ``template``; ``ValueError`` says what is wrong and what to write instead."""
        local, at, domain = template.strip().rpartition("@")
        if not at or not local or not domain or "@" in local:
            raise ValueError(
                f"{template!r} is not an address template; "
                "write it like incoming+%{key}@example.com"
            )
        if "%{" in domain or ("}" in domain and "%" in domain):
            raise ValueError(f"{KEY_PLACEHOLDER} must be in the local part (before the @)")
        count = local.count(KEY_PLACEHOLDER)
        if count > 1:
            raise ValueError(f"{KEY_PLACEHOLDER} may appear only once")
        if count == 0 and ("%{" in local or ("%" in local and "key}" in local)):
            raise ValueError(f"write the placeholder whole, as {KEY_PLACEHOLDER}")
        prefix, _, suffix = local.partition(KEY_PLACEHOLDER)
        return cls(
            template=template.strip(),
            prefix=prefix.lower(),
            suffix=suffix.lower(),
            domain=domain.lower(),
            has_key=count == 1,
        )

    def match(self, address: str) -> str | None:
        """The key if ``address`` fits the template (``""`` for a dedicated address), else None."""
        local, at, domain = address.strip().rpartition("@")
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
        return self.template.replace(KEY_PLACEHOLDER, key)


@dataclass(frozen=True, slots=True)
class Deliver:
    key: str | None
    matched_header: str


@dataclass(frozen=True, slots=True)
class Reject:
    reason: str


@dataclass(frozen=True, slots=True)
class Ignore:
    rule: str


Decision = Deliver | Reject | Ignore


def _candidates(parsed: ParsedMessage, header: str) -> list[str]:
    values = parsed.header(header)
    if header == "Received":
        return [m.group(1) for value in values for m in _RECEIVED_FOR.finditer(value)]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


def auto_generated(parsed: ParsedMessage) -> str | None:
    """The name of the rule that marks ``parsed`` as auto-generated, or None."""
    auto_submitted = parsed.first("Auto-Submitted")
    if auto_submitted is not None and auto_submitted.strip().lower() != "no":
        return "auto_submitted"
    if (parsed.first("X-Autoreply") or "").strip().lower() == "yes":
        return "x_autoreply"
    return None


def decide(parsed: ParsedMessage, address: AddressTemplate) -> Decision:
    """Decide what to do with ``parsed`` for a mailbox whose address template is ``address``."""
    if (rule := auto_generated(parsed)) is not None:
        return Ignore(rule)
    for header in CANDIDATE_HEADERS:
        for candidate in _candidates(parsed, header):
            key = address.match(candidate)
            if key is not None:
                return Deliver(key or None, header)
    return Reject("unknown incoming email")
