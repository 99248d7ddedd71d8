"""``mailroom redrive``: dead letters put back, to be delivered again under their webhook-id.

- IMAP (``redrive.imap``): in the mailbox, a message flagged ``$MailroomFailed`` gets that
  keyword and ``\\Seen`` cleared. In ``failed_folder``, every message is cleared the same way
  and moved back (``UID MOVE``). Either way it keeps its webhook-id: that is made from the
  mailbox's server identity and the message's bytes (``mailroom.identity``), which a move
  does not change.
- Microsoft Graph (``redrive.graph``): the category ``MailroomFailed`` is removed and the
  message marked unread; from ``failed_folder`` it is also moved back. Immutable ids (the
  poller asks for them) keep the webhook-id across both moves.

With replicas, the ``dead_lettered`` markers of those webhook-ids are deleted first: otherwise
the replica that finds the message again would settle it by its marker without posting it.
A running mailroom needs no signal: the messages are unseen (unread) again, where it looks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

from mailroom.arbitration import redis_store
from mailroom.config import Config, FolderMailboxConfig, MailboxConfig
from mailroom.errors import MailroomError
from mailroom.redrive.job import Job, Options, Stopped, parse_since

__all__ = ["Options", "Redrives", "conflicts", "parse_since", "run"]

Redrive = Callable[[Any, Job], Awaitable[None]]  # one mailbox's dead letters put back


class Redrives(Protocol):
    """What ``mailroom redrive`` asks of the kinds of source (``mailroom.kinds.KINDS``)."""

    def redrive(self, config: MailboxConfig) -> Redrive | None:
        """How ``config``'s dead letters are put back; None: redrive does not apply."""
        ...


def conflicts(config: Config, chosen: Iterable[MailboxConfig]) -> list[str]:
    """Mailboxes whose ``failed_folder`` is also another's, or a folder a mailbox watches, on
    the same account: which of its messages are whose dead letters is unknowable there, and
    redriving it would post mail that is no dead letter."""
    uses: dict[tuple[str, ...], list[str]] = {}
    folders = [m for m in config.mailboxes if isinstance(m, FolderMailboxConfig)]
    for mailbox in folders:
        watched = mailbox.folder_key(mailbox.mailbox)
        uses.setdefault(watched, []).append(f"the folder mailbox {mailbox.id} watches")
        if mailbox.failed_folder is not None:
            failed = mailbox.folder_key(mailbox.failed_folder)
            uses.setdefault(failed, []).append(f"the failed_folder of {mailbox.id}")
    problems = []
    for chosen_box in chosen:
        if not isinstance(chosen_box, FolderMailboxConfig) or chosen_box.failed_folder is None:
            continue
        own = f"the failed_folder of {chosen_box.id}"
        others = [u for u in uses[chosen_box.folder_key(chosen_box.failed_folder)] if u != own]
        if others:
            problems.append(
                f"mailboxes[{chosen_box.id}].failed_folder: {chosen_box.failed_folder!r} is also "
                f"{' and '.join(others)} on the same account, so its dead letters cannot be "
                "told from other mail; give each mailbox a failed_folder of its own (and sort "
                "that folder's messages by hand)"
            )
    return problems


async def run(
    config: Config,
    mailboxes: Sequence[MailboxConfig],
    options: Options,
    out: Callable[[str], None],
    *,
    kinds: Redrives,
) -> bool:
    """Redrive the dead letters of ``mailboxes``, one after another; True when nothing
    failed. The last line printed is the summary."""
    markers = None
    if config.arbitration.enabled and not options.dry_run:
        markers = redis_store(config.arbitration)
    job = Job(options, out, markers)
    ok = True
    try:
        for mailbox in mailboxes:
            before = job.done + job.failed
            redrive = kinds.redrive(mailbox)
            if redrive is None:
                out(f"{mailbox.id}: redrive does not apply to {mailbox.inbox_method} mailboxes")
                continue
            try:
                await redrive(mailbox, job)
            except Stopped:
                ok = False
                out(f"{mailbox.id}: stopped after that failure; the rest is left as it is")
                continue
            except MailroomError as exc:
                ok = False
                out(f"{mailbox.id}: FAILED: {exc}; its dead letters are left as they are")
                continue
            if job.done + job.failed == before:
                out(f"{mailbox.id}: no dead letters{job.since_text}")
    finally:
        if markers is not None:
            await markers.close()
    out(job.summary())
    return ok and not job.failed
