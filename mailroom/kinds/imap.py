"""IMAP as a kind of source: ``inbox_method: imap``.

- config section: ``config.ImapMailboxConfig`` (readiness: while connected; a dead letter is
  moved to ``failed_folder`` or flagged ``$MailroomFailed`` and ``\\Seen``);
- source: ``sources.imap.ImapWatcher`` (sweep → fetch → IDLE), with the connect limit and, for
  ``auth: xoauth2``, a shared token provider;
- shares: a TLS context (``ssl``/``start_tls``), the token provider of its ``oauth`` block;
- check: ``check.mailboxes.imap``; redrive: ``redrive.imap.redrive``.
"""

from __future__ import annotations

from mailroom.check import mailboxes
from mailroom.config import ImapMailboxConfig
from mailroom.kinds.registry import Kind
from mailroom.redrive import imap as redrive
from mailroom.runtime.resources import Shares, Wiring
from mailroom.sources.imap import ImapWatcher

__all__ = ["KIND"]


def _source(config: ImapMailboxConfig, wiring: Wiring) -> ImapWatcher:
    resources = wiring.resources
    tokens = None
    if config.oauth is not None:
        tokens = resources.tokens.get(config.oauth, label=config.id)
    return ImapWatcher(
        config,
        wiring.submit,
        stopping=wiring.stopping,
        drained=wiring.drained,
        monitor=wiring.monitor,
        budget=resources.budget,
        connects=resources.connects,
        token=tokens.token if tokens is not None else None,
        invalidate=tokens.invalidate if tokens is not None else None,
    )


def _shares(config: ImapMailboxConfig) -> Shares:
    return Shares(
        tls=((config.ca_file, config.tls_verify),) if config.ssl or config.start_tls else (),
        oauth=(config.oauth,) if config.oauth is not None else (),
    )


KIND = Kind(
    config=ImapMailboxConfig,
    source=_source,
    shares=_shares,
    check=mailboxes.imap,
    redrive=redrive.redrive,
)
