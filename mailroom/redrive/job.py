"""What one ``mailroom redrive`` run does and says: options, the dead letters found, one line
per message, the tally, and the delivered markers it deletes (with replicas)."""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailroom.errors import MailroomError
from mailroom.redact import printable

if TYPE_CHECKING:
    from mailroom.arbitration.store import RedisStore

__all__ = ["Job", "Letter", "Options", "Stopped", "parse_since", "printable", "utc_text"]

SHOWN_AT_MOST = 200  # characters of a Message-ID in a line


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    since: datetime.datetime | None = None  # aware; only mail received then or later
    dry_run: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Letter:
    """One dead letter found: where it is, and the webhook-id it will be posted under."""

    where: str  # "uid 17 in Failed", "message …Q1AAA= in inbox"
    received: datetime.datetime | None
    message_id: str | None
    webhook_id: str
    legacy_id: str | None = None  # the id a $MailroomId_ keyword (before 0.2) carries


class Stopped(MailroomError):
    """A change failed: the rest of the mailbox is left as it is (its lines are printed)."""


class Job:
    """One run: its options, its output (one line per message), the tally, the markers."""

    def __init__(
        self, options: Options, out: Callable[[str], None], markers: RedisStore | None = None
    ) -> None:
        self.options = options
        self.out = out
        self.markers = markers
        self.done = self.failed = 0

    def wanted(self, received: datetime.datetime | None) -> bool:
        """Received at or after ``--since`` (everything without it)."""
        since = self.options.since
        return since is None or (received is not None and received >= since)

    async def apply(
        self,
        mailbox: str,
        letters: Sequence[Letter],
        change: Callable[[], Awaitable[object]],
        done: str,
        would: str,
    ) -> None:
        """Delete the letters' markers and ``change`` them on the server (in a dry run,
        neither), then print a line for each; on a failure print it for each, and stop."""
        if not letters:
            return
        if not self.options.dry_run:
            try:
                if self.markers is not None:
                    await self.markers.forget([x.webhook_id for x in letters])
                await change()
            except MailroomError as exc:
                self.failed += len(letters)
                for letter in letters:
                    self.out(self._line(mailbox, letter, f"FAILED: {exc}"))
                raise Stopped(str(exc)) from exc
        for letter in letters:
            self.done += 1
            self.out(self._line(mailbox, letter, would if self.options.dry_run else done))

    def _line(self, mailbox: str, letter: Letter, what: str) -> str:
        received = "unknown" if letter.received is None else utc_text(letter.received)
        message_id = "(no Message-ID)"
        if letter.message_id:  # Graph's internetMessageId has the brackets, message.parse not
            message_id = printable(f"<{letter.message_id.strip('<>')}>", SHOWN_AT_MOST)
        webhook = f"webhook-id {letter.webhook_id}"
        if letter.legacy_id == letter.webhook_id:
            webhook += " (its $MailroomId_ keyword: legacy_id_keywords)"
        elif letter.legacy_id is not None:
            webhook += (
                f"; not {letter.legacy_id}, which its $MailroomId_ keyword names "
                "(legacy_id_keywords: false)"
            )
        return f"{mailbox}: {letter.where}, received {received}, {message_id}: {what}; {webhook}"

    @property
    def since_text(self) -> str:
        since = self.options.since
        return f" received since {utc_text(since)}" if since is not None else ""

    def summary(self) -> str:
        count = self.done
        since = self.since_text
        if self.options.dry_run:
            return (
                f"mailroom redrive: dry run: {count} dead letter(s){since} would be redriven "
                "under their webhook-ids; nothing was changed"
            )
        failed = f"; {self.failed} FAILED" if self.failed else ""
        if not count:
            return f"mailroom redrive: no dead letters{since} redriven{failed}"
        return (
            f"mailroom redrive: {count} dead letter(s){since} redriven under their webhook-ids"
            f"{failed}; a running mailroom delivers them at its next sweep or poll"
        )


def utc_text(moment: datetime.datetime) -> str:
    """``2026-05-01T12:30:00Z``: how lines show a moment, and Graph's ``$filter`` takes it."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_since(text: str) -> datetime.datetime:
    """``--since``: an ISO 8601 date or date and time; without a zone, this machine's local
    time. ``ValueError`` says what is accepted."""
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r} is not a date; give 2026-05-01, 2026-05-01T14:30 or "
            "2026-05-01T14:30+02:00 (without a zone: this machine's local time)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # the local zone
    return moment.astimezone(datetime.UTC)
