"""What the sources of one process share, built once per key and ready before they start.

- the in-flight ``Budget`` (``limits.in_flight_messages`` / ``in_flight_bytes``) that sources
  reserve before they fetch, and the connect limit (``limits.connects``) that caps connects and
  logins at once: no storm at start, after an outage or after a reload;
- token providers, one per app registration and scope, or per Google credential and the user it
  acts as (``auth.TokenProviders``);
- Microsoft Graph HTTP sessions, one per ``graph_endpoint`` and trust;
- TLS contexts, one per ``(ca_file, tls_verify)`` (``mailroom.tls`` keeps them).

``prepare(config)`` builds everything a config needs and raises if anything cannot be built: a
reload calls it before it touches a running mailbox, so a broken new config leaves the old one
running (two-phase reload). ``retain(config)`` then closes what only the old config used.
"""

from __future__ import annotations

import aiohttp

from mailroom.config import (
    Config,
    GraphInboxOptions,
    GraphMailboxConfig,
    ImapMailboxConfig,
    ImapOAuthConfig,
)
from mailroom.sources import graph_client
from mailroom.sources.budget import Budget
from mailroom.trust import tls
from mailroom.trust.providers import TokenProviders

__all__ = ["Resources"]

GRAPH_CONNECTIONS = 32  # per graph_endpoint: Graph throttles per mailbox, not per connection


def _oauth_configs(config: Config) -> list[ImapOAuthConfig]:
    found: list[ImapOAuthConfig] = []
    for mailbox in config.mailboxes:
        if isinstance(mailbox, GraphMailboxConfig):
            found.append(mailbox.inbox_options.oauth)
        elif mailbox.oauth is not None:
            found.append(mailbox.oauth)
    return found


def _graph_key(options: GraphInboxOptions) -> tuple[str, str | None, bool]:
    return options.graph_endpoint, options.ca_file, options.tls_verify


class Resources:
    """The shared resources of one ``supervisor.run``."""

    def __init__(self, config: Config) -> None:
        limits = config.limits
        self.budget = Budget(messages=limits.in_flight_messages, size=limits.in_flight_bytes)
        self.connects = Budget(messages=limits.connects, size=0)
        self.tokens = TokenProviders()
        self._graph: dict[tuple[str, str | None, bool], aiohttp.ClientSession] = {}

    def prepare(self, config: Config) -> None:
        """Build everything ``config`` needs (TLS contexts, token providers, sessions).

        Raises ``tls.TlsConfigError`` (or another error) when something cannot be built;
        what was built stays until ``retain`` closes it.
        """
        for mailbox in config.mailboxes:
            if isinstance(mailbox, ImapMailboxConfig):
                if mailbox.ssl or mailbox.start_tls:
                    tls.client_context(ca_file=mailbox.ca_file, verify=mailbox.tls_verify)
                if mailbox.oauth is not None:
                    self.tokens.get(mailbox.oauth, label=mailbox.id)
            else:
                self.graph_session(mailbox.inbox_options)
                self.tokens.get(mailbox.inbox_options.oauth, label=mailbox.id)
            hook = mailbox.webhook
            if hook.url.startswith("https:"):
                tls.client_context(ca_file=hook.ca_file, verify=hook.tls_verify)
        for oauth in _oauth_configs(config):
            tls.client_context(ca_file=oauth.ca_file, verify=oauth.tls_verify)
        if config.reject_notices is not None:
            smtp = config.reject_notices.smtp
            if smtp.ssl or smtp.start_tls:
                tls.client_context(ca_file=smtp.ca_file, verify=smtp.tls_verify)

    def apply_limits(self, config: Config) -> None:
        limits = config.limits
        self.budget.resize(messages=limits.in_flight_messages, size=limits.in_flight_bytes)
        self.connects.resize(messages=limits.connects, size=0)

    def graph_session(self, options: GraphInboxOptions) -> aiohttp.ClientSession:
        """The session for ``options.graph_endpoint`` (made on first use)."""
        key = _graph_key(options)
        session = self._graph.get(key)
        if session is None:
            session = self._graph[key] = graph_client.session(options, limit=GRAPH_CONNECTIONS)
        return session

    async def retain(self, config: Config) -> None:
        """Close what ``config`` no longer uses (after a reload, or a refused one)."""
        self.tokens.retain(_oauth_configs(config))
        keep = {
            _graph_key(m.inbox_options)
            for m in config.mailboxes
            if isinstance(m, GraphMailboxConfig)
        }
        for key in [key for key in self._graph if key not in keep]:
            await self._graph.pop(key).close()

    async def close(self) -> None:
        self.tokens.close()
        for session in self._graph.values():
            await session.close()
        self._graph.clear()
