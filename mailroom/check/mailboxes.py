"""``mailroom check`` of the mailboxes: IMAP (through ``ImapSession``) and Microsoft Graph."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from mailroom.check import route
from mailroom.check.net import certificate, tcp
from mailroom.check.report import SESSION_TIMEOUT_S, Failed, Finding, Report, Status, Target
from mailroom.config import FolderMailboxConfig, GraphMailboxConfig, ImapMailboxConfig
from mailroom.errors import MailroomError
from mailroom.sources.graph_client import (
    GraphClient,
    discard,
    message_url,
    messages_url,
    read_mime,
    user_url,
)
from mailroom.sources.imap import NO_PUSH_POLL_S, search_criteria
from mailroom.sources.imap_session import ImapSession
from mailroom.trust.entra import TokenProvider
from mailroom.trust.providers import token_provider

__all__ = ["backlog", "graph", "imap"]

COUNT_AT_MOST = 1000  # messages whose headers `unseen` reads to count the decisions
COUNT_BATCH = 200
GRAPH_COUNT_AT_MOST = 100  # one request each: fewer than over IMAP
GRAPH_PAGES_AT_MOST = 10
IDLE_PROBE_S = 0.2  # check IDLEs this long to read the server's answer to it


async def imap(report: Report, config: ImapMailboxConfig) -> None:
    target = Target(report, f"imap[{config.id}]")
    tokens = token_provider(config.oauth, label=config.id) if config.oauth is not None else None
    session: ImapSession | None = None

    async def token() -> Finding:
        assert tokens is not None and config.oauth is not None
        await tokens.token()
        return Status.OK, f"access token for {tokens.scope} acquired ({config.oauth.client})"

    async def connect() -> Finding:
        nonlocal session
        session = await ImapSession.connect(
            config, timeout_s=SESSION_TIMEOUT_S, token=tokens.token if tokens else None
        )
        if config.ssl or config.start_tls:
            how = "implicit TLS" if config.ssl else "STARTTLS"
            return certificate(session.tls, verified=config.tls_verify, how=how)
        return Status.WARN, (
            "IMAP greeting on a plain connection: the password crosses the network in clear "
            "text; set ssl: true (port 993) or start_tls: true"
        )

    async def login() -> Finding:
        assert session is not None
        await session.login()
        how = "XOAUTH2" if config.auth == "xoauth2" else "password"
        return Status.OK, f"logged in as {config.user} ({how})"

    async def select() -> Finding:
        assert session is not None
        await session.select()
        return Status.OK, f"{config.mailbox} selected (UIDVALIDITY {session.uidvalidity})"

    def capability(name: str, missing: str, present: str) -> Callable[[], Awaitable[Finding]]:
        async def check() -> Finding:
            assert session is not None
            if name in session.capabilities:
                return Status.OK, f"{name} advertised: {present}"
            return Status.WARN, f"{name} not advertised: {missing}"

        return check

    async def idle(*, selected: bool) -> Finding:
        assert session is not None
        if "IDLE" not in session.capabilities:
            return Status.WARN, (
                "IDLE not advertised: mail will only be found by the periodic sweep, every "
                f"{config.idle_timeout_s:g}s (idle_timeout)"
            )
        if not selected:
            return Status.OK, "IDLE advertised (not tried: the mailbox could not be selected)"
        # IDLE for a moment (nothing is written to the mailbox): Courier's answer says which
        # IDLE it runs; no other server's does, so whether it pushes is seen at run time.
        await session.idle([asyncio.Event()], IDLE_PROBE_S)
        await session.end_idle()
        reply = (session.idle_reply or "").lower()
        if "entering idle mode" in reply:
            return Status.WARN, (
                "IDLE advertised, but Courier looks for new mail during IDLE only every "
                "IMAP_IDLE_TIMEOUT (IMAP_ENHANCEDIDLE=0): set IMAP_ENHANCEDIDLE=1 in Courier's "
                "imapd config, or a shorter idle_timeout; mailroom asks every "
                f"{NO_PUSH_POLL_S:g}s once it sees no push"
            )
        if "enhanced idle mode" in reply:
            return Status.OK, "IDLE advertised, and new mail is pushed (Courier's enhanced IDLE)"
        return Status.OK, (
            "IDLE advertised (whether the server pushes is seen at run time: without push, a "
            "warning, mailroom_idle_without_push, and mailroom asks for new mail every "
            f"{NO_PUSH_POLL_S:g}s)"
        )

    async def unseen() -> Finding:
        assert session is not None
        criteria = search_criteria(config)
        uids = await session.search(criteria)  # what the run searches
        tally = route.Tally()
        for start in range(0, min(len(uids), COUNT_AT_MOST), COUNT_BATCH):
            batch = uids[start : min(start + COUNT_BATCH, COUNT_AT_MOST)]
            # Routing reads only the header block: no bodies are fetched, nothing is marked.
            for item in await session.fetch(batch, "UID RFC822.SIZE BODY.PEEK[HEADER]"):
                tally.add(route.decide(item.body or b"", config, size=item.size))
        search = f"match search_command {config.search_command}"
        if " UNSEEN " in f" {criteria} " and "UNSEEN" not in search.upper():
            search += " and are unseen (mailroom adds UNSEEN)"
        return backlog(tally, len(uids), config, search=search)

    async def failed_folder() -> Finding:
        assert session is not None
        folder = config.failed_folder
        if folder is None:
            return (
                Status.OK,
                "not set: dead letters are flagged $MailroomFailed and \\Seen in place",
            )
        where = await session.resolve(folder)
        named = repr(folder) if where == folder else f"{folder!r} ({where} on this server)"
        if await session.folder_exists(folder):
            return Status.OK, f"{named} exists"
        try:
            await session.create(folder)
        except MailroomError as exc:
            raise Failed(
                f"{named} does not exist and cannot be created ({exc}); create it by hand, "
                "or fix failed_folder"
            ) from exc
        return Status.OK, f"{named} did not exist; created it (as the first dead letter would)"

    try:
        await target.run("tcp", lambda: tcp(config.host, config.port))
        if tokens is not None:
            await target.run("oauth token", token)
        await target.run("tls" if config.ssl or config.start_tls else "connect", connect)
        await target.run("login", login)
        selected = await target.run("mailbox", select, blocking=False)
        await target.run("idle", functools.partial(idle, selected=bool(selected)), blocking=False)
        await target.run(
            "uidplus",
            capability(
                "UIDPLUS",
                "deleted messages are expunged only with expunge_deleted: true, and then by "
                "plain EXPUNGE, which also removes messages other clients marked \\Deleted",
                "only mailroom's own messages are expunged (UID EXPUNGE)",
            ),
            blocking=False,
        )
        await target.run(
            "move",
            capability(
                "MOVE",
                "dead letters are copied and the originals flagged \\Deleted: not atomic (a "
                "crash in between leaves a copy in both folders)",
                "dead letters are moved atomically (UID MOVE)",
            ),
            blocking=False,
        )
        await target.run("failed_folder", failed_folder, blocking=False)
        if selected or target.blocked is not None:
            await target.run("unseen", unseen, blocking=False)
        else:
            report.add(target.name, "unseen", Status.SKIP, "skipped: mailbox failed")
    finally:
        if session is not None:
            await session.logout()
        if tokens is not None:
            tokens.close()


def backlog(
    tally: route.Tally,
    found: int,
    config: FolderMailboxConfig,
    *,
    more: str = "",
    search: str = "are unread",
) -> Finding:
    """What the first start does with the ``found`` messages waiting (those that ``search``),
    and a warning when some would not reach the webhook: an inbox people read loses its unread
    mail that way."""
    if not found:
        return Status.OK, f"no messages {search}: the first start finds none waiting"
    counted = sum(tally.actions.values())
    of = f" (of the first {counted})" if counted < found else ""
    parts = [tally.text(action) for action in route.Action if tally.actions[action]]
    settle = "deleted" if config.delete_after_delivery else "marked read"
    which = "all but the dead letters are" if tally.actions[route.Action.DEAD_LETTER] else "all are"
    detail = (
        f"{found}{more} messages {search}; the first start takes them on{of}: "
        f"{', '.join(parts)}; {which} then {settle} "
        f"(delete_after_delivery: {str(config.delete_after_delivery).lower()})"
    )
    if tally.actions[route.Action.DELIVER] == counted:
        return Status.OK, detail
    return Status.WARN, (
        f"{detail}. If people read this mailbox, give mailroom a mailbox of its own; "
        "`mailroom route -c FILE message.eml` shows the decision on one message"
    )


# -- Microsoft Graph -------------------------------------------------------------------------


async def graph(report: Report, config: GraphMailboxConfig) -> None:
    target = Target(report, f"graph[{config.id}]")
    options = config.inbox_options
    tokens = TokenProvider(options.oauth, label=config.id)
    user = user_url(config)
    folder_url = messages_url(user, config.mailbox)
    sample: list[tuple[str, list[str]]] = []  # (id, categories) of one unread message

    async def token() -> Finding:
        await tokens.token()
        return Status.OK, f"access token for {tokens.scope} acquired (client {options.client_id})"

    async with GraphClient(options, tokens, label=config.id) as client:

        async def folder() -> Finding:
            # The poller's own listing, one message long.
            url = f"{folder_url}?$filter=isRead%20eq%20false&$select=id,categories&$top=1"
            page = await client.send("GET", url)
            for item in page.get("value", []):
                if isinstance(item.get("id"), str):
                    categories = [c for c in item.get("categories") or [] if isinstance(c, str)]
                    sample.append((item["id"], categories))
            unread = "at least one unread message" if sample else "no unread messages"
            return (
                Status.OK,
                f"users/{config.user}/mailFolders/{config.mailbox} readable ({unread})",
            )

        async def patch() -> Finding:
            if not sample:
                return Status.WARN, (
                    "not tried: no unread message to PATCH without changing it; send the mailbox "
                    "a message and check again"
                )
            message_id, categories = sample[0]
            # Writes back the categories it has: a real PATCH needing Mail.ReadWrite that
            # changes nothing a poller relies on (isRead stays as it is).
            await client.send(
                "PATCH",
                message_url(user, message_id),
                body={"categories": categories},
                read=discard,
            )
            return Status.OK, "PATCH of a message allowed (Mail.ReadWrite)"

        async def unread() -> Finding:
            # The poller's own listing, then each message's header block from its $value (read
            # no further: read_mime with a limit of 0 stops after the headers).
            url: str | None = f"{folder_url}?$filter=isRead%20eq%20false&$select=id&$top=100"
            ids: list[str] = []
            for _ in range(GRAPH_PAGES_AT_MOST):
                if url is None:
                    break
                page = await client.send("GET", url)
                ids += [i["id"] for i in page.get("value", []) if isinstance(i.get("id"), str)]
                url = client.next_link(page)
            tally = route.Tally()
            for message_id in ids[:GRAPH_COUNT_AT_MOST]:
                mime = f"{folder_url}/{quote(message_id, safe='')}/$value"
                header, size, _ = await client.send(
                    "GET", mime, read=lambda response: read_mime(response, 0), accept="*/*"
                )
                tally.add(route.decide(header, config, size=size if size > len(header) else None))
            more = " or more" if url is not None else ""
            return backlog(tally, len(ids), config, more=more)

        try:
            await target.run("token", token)
            await target.run("folder", folder)
            await target.run("unread", unread, blocking=False)
            await target.run("patch", patch)
        finally:
            tokens.close()
