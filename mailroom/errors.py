"""mailroom's exception tree.

::

    MailroomError
    ├── ConfigError(MailroomError, ValueError)        bad config: dotted path + what to do; exit 2
    ├── CredentialsError(MailroomError, ValueError)   no key, wrong key, a changed credentials file
    ├── SourceError(MailroomError)                    a mailbox cannot be read right now
    │   ├── ImapError                                 the IMAP server said NO/BAD or broke protocol
    │   │   ├── ImapAuthError                         login refused: retried, but says so loudly
    │   │   └── ImapConnectionLost(ImapError, ConnectionError)
    │   ├── TokenError                                no OAuth token: refused or unreachable
    │   └── GraphError                                Graph answered an error or was unreachable
    ├── ArbitrationError(MailroomError)               Redis (replicas) unreachable or refusing
    ├── DeliveryError(MailroomError)                  the webhook did not take the message
    │   ├── TransientDeliveryError                    retry later (5xx, 429, timeouts, ...)
    │   └── PermanentDeliveryError                    dead-letter (other 4xx)
    └── NoticeError(MailroomError, ValueError)        no safe reject notice can be written

Errors never carry secrets: messages name the setting, never its value.
"""

from __future__ import annotations


class MailroomError(Exception):
    """Base class of every error mailroom raises on purpose."""


class ConfigError(MailroomError, ValueError):
    """The configuration is invalid. ``str()`` is ``<dotted.path>: <what is wrong; what to do>``."""

    def __init__(self, path: str, message: str, *, problems: tuple[ConfigError, ...] = ()) -> None:
        self.path = path
        self.message = message
        self.problems = problems  # ``several``: each problem, with its own path
        super().__init__(f"{path}: {message}" if path else message)

    @classmethod
    def several(cls, problems: list[ConfigError]) -> ConfigError:
        """One error for ``problems`` (the problem itself when there is one), a line each."""
        if len(problems) == 1:
            return problems[0]
        lines = "".join(f"\n  {problem}" for problem in problems)
        message = f"{len(problems)} settings cannot be read; fix them all:{lines}"
        return cls("", message, problems=tuple(problems))


class CredentialsError(MailroomError, ValueError):
    """The encrypted credentials file cannot be used: no key, the wrong key, a changed or
    damaged file, or content that is not ``{<mailbox id>: {user, password}}``."""


class SourceError(MailroomError):
    """A mailbox could not be read; the watcher reconnects with backoff, not sooner than
    ``retry_after_s`` when the server asked for that (``Backoff`` clamps it)."""

    retry_after_s: float | None = None


class ImapError(SourceError):
    """The IMAP server refused a command or answered something we cannot use."""


class ImapAuthError(ImapError):
    """The IMAP server refused the credentials."""


class ImapConnectionLost(ImapError, ConnectionError):
    """The IMAP connection dropped or stopped answering."""


class TokenError(SourceError):
    """No access token: the identity provider refused (``code``) or could not be reached.

    ``code`` and ``description`` are the provider's ``error`` and ``error_description`` (RFC
    6749 §5.2), e.g. ``invalid_client`` / ``AADSTS7000215: Invalid client secret provided``
    from Entra ID, ``invalid_grant`` / ``Token has been expired or revoked.`` from Google; they
    never contain the secret itself.
    """

    def __init__(self, message: str, *, code: str | None = None, description: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.description = description


class GraphError(SourceError):
    """Microsoft Graph answered an error (``status``, Graph's ``code``) or could not be reached.

    ``retry_after_s`` is the server's ``Retry-After`` (429, 503), to be honoured before the
    next request.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s


class ArbitrationError(MailroomError):
    """Redis, where replicas share leases and markers, cannot be used right now.

    ``misconfigured``: it refused us (a wrong password, no such database): a config fix cures
    it, so it is logged as an error; otherwise it is unreachable and retried quietly.
    """

    def __init__(self, message: str, *, misconfigured: bool = False) -> None:
        super().__init__(message)
        self.misconfigured = misconfigured


class DeliveryError(MailroomError):
    """The webhook did not accept a message."""


class TransientDeliveryError(DeliveryError):
    """Worth retrying: 408, 425, 429, 5xx, 401/403/404, timeouts, connection errors."""

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, misconfigured: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.misconfigured = misconfigured  # 401/403/404/3xx: logged as errors


class PermanentDeliveryError(DeliveryError):
    """The webhook refused the message for good (any other 4xx): dead-letter it."""


class NoticeError(MailroomError, ValueError):
    """A reject notice cannot be written safely for this message (no notice is sent)."""
