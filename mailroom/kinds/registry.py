"""``Kind``, what mailroom needs to know of one kind of source, and ``Kinds``, the registry.

A kind names its config section (a ``MailboxConfig`` subclass, read by ``config.mailboxes``; it
states as values the facts every floor reads: its name, its readiness rule, how a dead letter is
marked), how its source is built on the shared resources and what it takes from them
(``runtime``), its ``mailroom check`` and its ``mailroom redrive`` (None: not applicable).
``Kinds`` looks the kind of a mailbox up by its config's class; the floors below know it only
through the small protocol each of them declares (``runtime.resources.SourceKinds``,
``check.MailboxChecks``, ``redrive.Redrives``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from mailroom.check import Report
from mailroom.config import MailboxConfig
from mailroom.redrive import Redrive
from mailroom.redrive.job import Job
from mailroom.runtime.resources import Shares, Wiring
from mailroom.sources.lifecycle import Source

__all__ = ["Kind", "Kinds"]

C = TypeVar("C", bound=MailboxConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class Kind(Generic[C]):
    """One kind of source: its config section and what runs, checks and redrives it."""

    config: type[C]
    source: Callable[[C, Wiring], Source[C, Any, Any]]
    shares: Callable[[C], Shares]
    check: Callable[[Report, C], Awaitable[None]]
    redrive: Callable[[C, Job], Awaitable[None]] | None  # None: redrive does not apply


class Kinds:
    """The registry: each mailbox's ``Kind``, by its config's class."""

    def __init__(self, *kinds: Kind[Any]) -> None:
        self._by_config: dict[type[MailboxConfig], Kind[Any]] = {}
        for kind in kinds:
            if kind.config in self._by_config:
                raise ValueError(f"{kind.config.__name__} is registered twice")
            self._by_config[kind.config] = kind

    def __iter__(self) -> Iterator[Kind[Any]]:
        return iter(self._by_config.values())

    def with_kind(self, kind: Kind[Any]) -> Kinds:
        """These kinds and one more (a test's)."""
        return Kinds(*self._by_config.values(), kind)

    def of(self, config: MailboxConfig) -> Kind[Any]:
        """The kind of ``config``'s mailbox."""
        kind = self._by_config.get(type(config))
        if kind is None:
            raise LookupError(
                f"{config.id}: no kind of source is registered for {type(config).__name__} "
                "(mailroom.kinds.KINDS)"
            )
        return kind

    # -- what runtime.resources.SourceKinds, check.MailboxChecks and redrive.Redrives ask ------

    def source(self, config: MailboxConfig, wiring: Wiring) -> Source[Any, Any, Any]:
        return self.of(config).source(config, wiring)

    def shares(self, config: MailboxConfig) -> Shares:
        return self.of(config).shares(config)

    async def check(self, report: Report, config: MailboxConfig) -> None:
        await self.of(config).check(report, config)

    def redrive(self, config: MailboxConfig) -> Redrive | None:
        return self.of(config).redrive
