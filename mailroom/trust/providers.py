"""The token providers of one process, one per app registration (or Google credential) and
scope, shared by every mailbox that names them: Entra ID's (``entra``) or Google's
(``google``, imported only when a config names Google)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import overload

from mailroom.trust.entra import TokenProvider
from mailroom.trust.tokens import Tokens
from mailroom.trust.values import GoogleOAuthConfig, ImapOAuthConfig, OAuthConfig

__all__ = ["TokenProviders", "token_provider"]


@overload
def token_provider(config: OAuthConfig, *, label: str) -> TokenProvider: ...
@overload
def token_provider(config: ImapOAuthConfig, *, label: str) -> Tokens: ...
def token_provider(config: ImapOAuthConfig, *, label: str) -> Tokens:
    """A new provider for ``config``: Entra ID through msal, or Google through google-auth."""
    if isinstance(config, GoogleOAuthConfig):
        # Imported here: google-auth is loaded only when a config names Google.
        from mailroom.trust.google import GoogleTokenProvider  # noqa: PLC0415

        return GoogleTokenProvider(config, label=label)
    return TokenProvider(config, label=label)


class TokenProviders:
    """The token providers of one process: one per app registration (authority, client id and
    credential) and scope, or per Google credential and the user it acts as, shared by every
    mailbox that names them."""

    def __init__(self) -> None:
        self._providers: dict[tuple[ImapOAuthConfig, str], Tokens] = {}

    @overload
    def get(self, config: OAuthConfig, *, label: str) -> TokenProvider: ...
    @overload
    def get(self, config: ImapOAuthConfig, *, label: str) -> Tokens: ...
    def get(self, config: ImapOAuthConfig, *, label: str) -> Tokens:
        """The provider for ``config`` (made on first use; ``label`` names it in logs)."""
        key = (config, config.scope)
        provider = self._providers.get(key)
        if provider is None:
            provider = self._providers[key] = token_provider(config, label=label)
        return provider

    def retain(self, configs: Iterable[ImapOAuthConfig]) -> None:
        """Close and forget the providers no longer named by ``configs`` (after a reload)."""
        keep = {(config, config.scope) for config in configs}
        for key in [key for key in self._providers if key not in keep]:
            self._providers.pop(key).close()

    def close(self) -> None:
        self.retain(())
