"""``mailroom check -c FILE``: the whole path from the mailboxes to the webhook, checked.

Each check is a small coroutine answering a ``Finding``, ``(Status, detail)``: what it found, or
what failed and what to do. The checks of one target (a mailbox, the webhook, the SMTP server)
run in order; after a failure the checks that depend on it are reported as ``SKIP ... skipped:
<why>``. WARN is for what works, but worse than it could (no IDLE, no TLS): it does not fail the
run. Lines are printed as they are found, so a check that hangs until its timeout shows where.

Each mailbox is checked by its kind's check (``MailboxChecks``: the command line hands
``mailroom.kinds.KINDS`` down). The checks use the code that ``mailroom run`` uses
(``ImapSession``, ``TokenProvider``, ``GraphClient``, ``reject.check_connection``, the webhook
signature), so what passes here works there. Only TCP and TLS are tried directly with
``asyncio.open_connection``. Details never contain a secret: URLs are shown as
``scheme://host:port``, and errors name settings, not values.

Here: the config and address checks and the order of everything. ``report``: the lines and the
skipping; ``net``: TCP, TLS, certificates; ``mailboxes``: IMAP and Graph, with the unseen
messages counted by ``route``'s decision (also ``mailroom route``); ``endpoints``: the webhook
and SMTP; ``replicas``: the Redis replicas share, and who holds which lease.
"""

from __future__ import annotations

import secrets
from typing import Protocol

from mailroom.check import endpoints, replicas
from mailroom.check.endpoints import TEST_EVENT
from mailroom.check.report import Finding, Report, Result, Status
from mailroom.config import Config, MailboxConfig, webhook_labels
from mailroom.config.mailboxes import SECTIONS
from mailroom.mail import message, routing

__all__ = ["TEST_EVENT", "MailboxChecks", "Report", "Result", "Status", "run"]


class MailboxChecks(Protocol):
    """What ``mailroom check`` asks of the kinds of source (``mailroom.kinds.KINDS``)."""

    async def check(self, report: Report, config: MailboxConfig) -> None:
        """Check ``config``'s mailbox the way its source will use it, into ``report``."""
        ...


def _config(report: Report, config: Config, path: str) -> None:
    methods = [m.inbox_method for m in config.mailboxes]
    counts = ", ".join(
        f"{methods.count(method)} {method}" for method in dict.fromkeys([*SECTIONS, *methods])
    )
    notices = "on" if config.reject_notices is not None else "off"
    detail = f"{path}: {len(config.mailboxes)} mailbox(es) ({counts}), reject notices {notices}"
    if config.credentials is not None:
        detail += f", credentials decrypted from {config.credentials.file}"
    report.add("config", "load", Status.OK, detail)
    address_warnings = {
        f"mailboxes[{i}].address: {text}"
        for i, mailbox in enumerate(config.mailboxes)
        for text in routing.warnings(mailbox.routing.address)
    }
    for warning in config.warnings:
        if warning not in address_warnings:  # those are the address checks' own lines
            report.add("config", "advice", Status.WARN, warning)


def _round_trip(rules: routing.RoutingRules) -> Finding:
    """A GitLab-sized key through the template and back through the real routing."""
    key = secrets.token_hex(16)
    template = rules.address
    if template.has_key:
        address = template.format(key)
        header = f"To: {address}"
        shown = f"{address} → "
    else:
        header = f"To: {template.template}\r\nReferences: <reply-{key}@{rules.reply_domain}>"
        shown = f"reply id reply-{key}@{rules.reply_domain} → "
    raw = (
        "From: mailroom check <check@example.invalid>\r\n"
        f"{header}\r\nSubject: mailroom check\r\n"
        f"Message-ID: <check.{key}@example.invalid>\r\n\r\nmailroom check\r\n"
    ).encode()
    decision = routing.decide(message.parse(raw), rules)
    if isinstance(decision, routing.Deliver) and decision.key == key:
        return Status.OK, f"{shown}key {key} ({decision.matched_header})"
    return Status.FAIL, f"{shown}{decision!r} instead of key {key}; check address and reply_host"


def _addresses(report: Report, config: Config) -> None:
    for mailbox in config.mailboxes:
        target = f"address[{mailbox.id}]"
        template = mailbox.routing.address
        if template.has_key:
            kind = f"valid, {routing.KEY_PLACEHOLDER} in the local part"
        else:
            kind = f"valid, a dedicated address (replies only, reply ids @{template.domain})"
        report.add(target, "template", Status.OK, f"{template.template}: {kind}")
        if template.has_key:
            advice = routing.warnings(template)
            length = len(template.prefix)
            if advice:
                report.add(target, "prefix", Status.WARN, advice[0])
            else:
                report.add(
                    target,
                    "prefix",
                    Status.OK,
                    f"{length} characters before {routing.KEY_PLACEHOLDER} "
                    f"(at most {routing.PREFIX_WARN_AFTER})",
                )
        status, detail = _round_trip(mailbox.routing)
        report.add(target, "round trip", status, detail)


async def run(
    config: Config, *, path: str, send_test: bool, report: Report, kinds: MailboxChecks
) -> bool:
    """Run every check in order, adding lines to ``report``; True when none failed."""
    _config(report, config, path)
    _addresses(report, config)
    for mailbox in config.mailboxes:
        await kinds.check(report, mailbox)
    for webhook, label in webhook_labels(m.webhook for m in config.mailboxes).items():
        if webhook.sidekiq is None:  # a Sidekiq queue is checked with the Redis checks
            await endpoints.webhook(report, webhook, send_test=send_test, label=label)
    await replicas.sidekiq(report, config)
    await endpoints.smtp(report, config)
    await replicas.run(report, config)
    return report.ok
