"""What the sources of one process share, built once per key and ready before they start.

- the in-flight ``Budget`` (``limits.in_flight_messages`` / ``in_flight_bytes``) that sources
  reserve before they fetch, and the connect limit (``limits.connects``) that caps connects and
  logins at once: no storm at start, after an outage or after a reload;
- token providers, one per app registration and scope, or per Google credential and the user it
  acts as (``trust.providers.TokenProviders``);
- HTTP sessions, one per key a kind names (Microsoft Graph: per ``graph_endpoint`` and trust);
- TLS contexts, one per ``(ca_file, tls_verify)`` (``trust.tls`` keeps them).

Each mailbox's kind says what its source needs (``Shares``, from ``SourceKinds.shares``); this
module knows no kind. ``prepare(config)`` builds everything a config needs and raises if
anything cannot be built: a reload calls it before it touches a running mailbox, so a broken new
config leaves the old one running (two-phase reload). ``retain(config)`` then closes what only
the old config used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from mailroom.config import Config, ImapOAuthConfig, MailboxConfig
from mailroom.envelope import Envelope
from mailroom.observe.monitor import Monitor
from mailroom.sources.budget import Budget
from mailroom.sources.lifecycle import Source
from mailroom.trust import tls
from mailroom.trust.providers import TokenProviders

__all__ = ["Resources", "Shares", "SourceKinds", "Wiring"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Shares:
    """What one mailbox's source takes from ``Resources``, each built once per key.

    ``tls``: TLS contexts by ``(ca_file, tls_verify)``; ``oauth``: token providers by their
    settings; ``sessions``: HTTP sessions by key, each with the function that builds it."""

    tls: tuple[tuple[str | None, bool], ...] = ()
    oauth: tuple[ImapOAuthConfig, ...] = ()
    sessions: tuple[tuple[Hashable, Callable[[], aiohttp.ClientSession]], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Wiring:
    """What a kind's source is built with: where it hands messages, the events that stop and
    drain it, the monitor it reports to, and the shared ``Resources``."""

    submit: Callable[[Envelope], None]
    stopping: asyncio.Event
    drained: asyncio.Event
    monitor: Monitor
    resources: Resources


class SourceKinds(Protocol):
    """What running mailboxes asks of the kinds of source (``mailroom.kinds.KINDS``)."""

    def source(self, config: MailboxConfig, wiring: Wiring) -> Source[Any, Any, Any]:
        """The source that watches ``config``'s mailbox."""
        ...

    def shares(self, config: MailboxConfig) -> Shares:
        """What that source takes from the shared resources."""
        ...


class Resources:
    """The shared resources of one ``supervisor.run``."""

    def __init__(self, config: Config, kinds: SourceKinds) -> None:
        limits = config.limits
        self.kinds = kinds
        self.budget = Budget(messages=limits.in_flight_messages, size=limits.in_flight_bytes)
        self.connects = Budget(messages=limits.connects, size=0)
        self.tokens = TokenProviders()
        self._sessions: dict[Hashable, aiohttp.ClientSession] = {}

    def _shares(self, config: Config) -> Iterator[tuple[MailboxConfig, Shares]]:
        for mailbox in config.mailboxes:
            yield mailbox, self.kinds.shares(mailbox)

    def prepare(self, config: Config) -> None:
        """Build everything ``config`` needs (TLS contexts, token providers, sessions).

        Raises ``tls.TlsConfigError`` (or another error) when something cannot be built;
        what was built stays until ``retain`` closes it.
        """
        for mailbox, shares in self._shares(config):
            for ca_file, verify in shares.tls:
                tls.client_context(ca_file=ca_file, verify=verify)
            for oauth in shares.oauth:
                self.tokens.get(oauth, label=mailbox.id)
                tls.client_context(ca_file=oauth.ca_file, verify=oauth.tls_verify)
            for key, build in shares.sessions:
                self.session(key, build)
            hook = mailbox.webhook
            if hook.url.startswith("https:"):
                tls.client_context(ca_file=hook.ca_file, verify=hook.tls_verify)
        if config.reject_notices is not None:
            smtp = config.reject_notices.smtp
            if smtp.ssl or smtp.start_tls:
                tls.client_context(ca_file=smtp.ca_file, verify=smtp.tls_verify)

    def apply_limits(self, config: Config) -> None:
        limits = config.limits
        self.budget.resize(messages=limits.in_flight_messages, size=limits.in_flight_bytes)
        self.connects.resize(messages=limits.connects, size=0)

    def session(
        self, key: Hashable, build: Callable[[], aiohttp.ClientSession]
    ) -> aiohttp.ClientSession:
        """The HTTP session for ``key``, built by ``build`` on first use."""
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = build()
        return session

    async def retain(self, config: Config) -> None:
        """Close what ``config`` no longer uses (after a reload, or a refused one)."""
        used = [shares for _, shares in self._shares(config)]
        self.tokens.retain(oauth for shares in used for oauth in shares.oauth)
        keep = {key for shares in used for key, _ in shares.sessions}
        for key in [key for key in self._sessions if key not in keep]:
            await self._sessions.pop(key).close()

    async def close(self) -> None:
        self.tokens.close()
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
