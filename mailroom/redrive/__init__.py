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

from collections.abc import Callable, Iterable, Sequence

from mailroom.arbitration import store
from mailroom.config import Config, GraphMailboxConfig, ImapMailboxConfig, MailboxConfig
from mailroom.errors import MailroomError
from mailroom.redrive.graph import redrive as redrive_graph
from mailroom.redrive.imap import redrive as redrive_imap
from mailroom.redrive.job import Job, Options, Stopped, parse_since

__all__ = ["Options", "conflicts", "parse_since", "run"]


def conflicts(config: Config, chosen: Iterable[MailboxConfig]) -> list[str]:
    """Mailboxes whose ``failed_folder`` is also another's, or a folder a mailbox watches, on
    the same account: which of its messages are whose dead letters is unknowable there, and
    redriving it would post mail that is no dead letter."""
    uses: dict[tuple[str, ...], list[str]] = {}
    for mailbox in config.mailboxes:
        watched = _folder_key(mailbox, mailbox.mailbox)
        uses.setdefault(watched, []).append(f"the folder mailbox {mailbox.id} watches")
        if mailbox.failed_folder is not None:
            failed = _folder_key(mailbox, mailbox.failed_folder)
            uses.setdefault(failed, []).append(f"the failed_folder of {mailbox.id}")
    problems = []
    for mailbox in chosen:
        if mailbox.failed_folder is None:
            continue
        own = f"the failed_folder of {mailbox.id}"
        others = [u for u in uses[_folder_key(mailbox, mailbox.failed_folder)] if u != own]
        if others:
            problems.append(
                f"mailboxes[{mailbox.id}].failed_folder: {mailbox.failed_folder!r} is also "
                f"{' and '.join(others)} on the same account, so its dead letters cannot be "
                "told from other mail; give each mailbox a failed_folder of its own (and sort "
                "that folder's messages by hand)"
            )
    return problems


def _folder_key(mailbox: MailboxConfig, folder: str) -> tuple[str, ...]:
    """A folder of an account, as the server names it (INBOX in any case is INBOX, RFC 3501
    §5.1; Graph's display names and well-known names ignore case)."""
    if isinstance(mailbox, ImapMailboxConfig):
        name = "INBOX" if folder.upper() == "INBOX" else folder
        return ("imap", mailbox.host.lower(), str(mailbox.port), mailbox.user, name)
    endpoint = mailbox.inbox_options.graph_endpoint
    return ("graph", endpoint, mailbox.user.lower(), folder.lower())


async def run(
    config: Config,
    mailboxes: Sequence[MailboxConfig],
    options: Options,
    out: Callable[[str], None],
) -> bool:
    """Redrive the dead letters of ``mailboxes``, one after another; True when nothing
    failed. The last line printed is the summary."""
    markers = None
    if config.arbitration.enabled and not options.dry_run:
        markers = store(config.arbitration)
    job = Job(options, out, markers)
    ok = True
    try:
        for mailbox in mailboxes:
            before = job.done + job.failed
            try:
                if isinstance(mailbox, GraphMailboxConfig):
                    await redrive_graph(mailbox, job)
                else:
                    await redrive_imap(mailbox, job)
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
