"""LMTP as a kind of source: ``inbox_method: lmtp``, a listener the MTA delivers to.

- config section: ``config.LmtpMailboxConfig`` (readiness: while it listens; a dead letter is
  answered 5xx and bounced by the MTA; it ``bounces``, so mailroom sends no reject notice of
  its own; not ``leased``: with replicas, every replica listens);
- source: ``sources.lmtp.LmtpListener``, on the listening socket the shared resources keep;
- shares: that socket (``sources.lmtp_socket.bind``), by its ``listen`` address, so that a
  reload which restarts the listener keeps it;
- check: ``check.lmtp.lmtp`` (LHLO, and a recipient at RCPT); redrive: not applicable (the
  MTA's queue holds what was not delivered: ``postqueue -f``).
"""

from __future__ import annotations

from collections.abc import Callable

from mailroom.check import lmtp as check
from mailroom.config import LmtpMailboxConfig
from mailroom.kinds.registry import Kind
from mailroom.runtime.resources import Shares, Wiring
from mailroom.sources.lmtp import LmtpListener
from mailroom.sources.lmtp_socket import BoundSocket, bind

__all__ = ["KIND"]


def _socket(config: LmtpMailboxConfig) -> tuple[str, Callable[[], BoundSocket]]:
    """The listening socket, by its address (a changed socket_mode keeps it)."""
    return f"lmtp {config.listen}", lambda: bind(config.listen, f"mailboxes[{config.id}].listen")


def _source(config: LmtpMailboxConfig, wiring: Wiring) -> LmtpListener:
    return LmtpListener(
        config,
        wiring.submit,
        stopping=wiring.stopping,
        drained=wiring.drained,
        bound=wiring.resources.listener(*_socket(config)),
        monitor=wiring.monitor,
        budget=wiring.resources.budget,
    )


def _shares(config: LmtpMailboxConfig) -> Shares:
    return Shares(listeners=(_socket(config),))


KIND = Kind(
    config=LmtpMailboxConfig,
    source=_source,
    shares=_shares,
    check=check.lmtp,
    redrive=None,
)
