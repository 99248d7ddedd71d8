"""Microsoft Graph as a kind of source: ``inbox_method: microsoft_graph``.

- config section: ``config.GraphMailboxConfig`` (readiness: while its last successful poll is
  at most two ``poll_interval``s and a grace old; a dead letter is moved to ``failed_folder``
  or categorised ``MailroomFailed`` and marked read);
- source: ``sources.graph.GraphPoller``, on a shared token provider and HTTP session;
- shares: the token provider of its app registration, one HTTP session per ``graph_endpoint``
  and trust (``GRAPH_CONNECTIONS`` connections);
- check: ``check.mailboxes.graph``; redrive: ``redrive.graph.redrive``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import aiohttp

from mailroom.check import mailboxes
from mailroom.config import GraphInboxOptions, GraphMailboxConfig
from mailroom.kinds.registry import Kind
from mailroom.redrive import graph as redrive
from mailroom.runtime.resources import Shares, Wiring
from mailroom.sources import graph_client
from mailroom.sources.graph import GraphPoller

__all__ = ["GRAPH_CONNECTIONS", "KIND"]

GRAPH_CONNECTIONS = 32  # per graph_endpoint: Graph throttles per mailbox, not per connection


def _session(options: GraphInboxOptions) -> tuple[Hashable, Callable[[], aiohttp.ClientSession]]:
    """One HTTP session per endpoint and trust, shared by every mailbox there."""
    key = ("graph", options.graph_endpoint, options.ca_file, options.tls_verify)
    return key, lambda: graph_client.session(options, limit=GRAPH_CONNECTIONS)


def _source(config: GraphMailboxConfig, wiring: Wiring) -> GraphPoller:
    resources = wiring.resources
    options = config.inbox_options
    return GraphPoller(
        config,
        wiring.submit,
        stopping=wiring.stopping,
        drained=wiring.drained,
        tokens=resources.tokens.get(options.oauth, label=config.id),
        http=resources.session(*_session(options)),
        monitor=wiring.monitor,
        budget=resources.budget,
    )


def _shares(config: GraphMailboxConfig) -> Shares:
    options = config.inbox_options
    return Shares(oauth=(options.oauth,), sessions=(_session(options),))


KIND = Kind(
    config=GraphMailboxConfig,
    source=_source,
    shares=_shares,
    check=mailboxes.graph,
    redrive=redrive.redrive,
)
