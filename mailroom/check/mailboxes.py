"""``mailroom check`` of the mailboxes: IMAP (through ``ImapSession``) and Microsoft Graph."""

from __future__ import annotations

import asyncio
import functools
from urllib.parse import quote

from mailroom.check import route
from mailroom.check.net import certificate, tcp
from mailroom.check.report import SESSION_TIMEOUT_S, Failed, Finding, Report, Status, Target
from mailroom.config import (
    FolderMailboxConfig,
    GraphMailboxConfig,
    ImapMailboxConfig,
    ImapOAuthConfig,
)
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
from mailroom.trust.tokens import Tokens

__all__ = ["backlog", "graph", "imap"]

COUNT_AT_MOST = 1000  # messages whose headers `unseen` reads to count the decisions
COUNT_BATCH = 200
GRAPH_COUNT_AT_MOST = 100  # one request each: fewer than over IMAP
GRAPH_PAGES_AT_MOST = 10
IDLE_PROBE_S = 0.2  # check IDLEs this long to read the server's answer to it


async def imap(report: Report, config: ImapMailboxConfig) -> None:
    """The checks of one IMAP mailbox, in the order a watcher meets what they check."""
    steps = _ImapSteps(config)
    try:
        await steps.run(Target(report, f"imap[{config.id}]"))
    finally:
        await steps.close()


class _ImapSteps:
    """One IMAP mailbox's checks; those after ``connect`` use the session it opened (a failed
    connect is blocking: they are skipped)."""

    def __init__(self, config: ImapMailboxConfig) -> None:
        self.config = config
        self.tokens = None
        if config.oauth is not None:
            self.tokens = token_provider(config.oauth, label=config.id)
        self._session: ImapSession | None = None

    @property
    def session(self) -> ImapSession:
        if self._session is None:
            raise Failed("not connected: the connection failed")
        return self._session

    async def run(self, target: Target) -> None:
        config = self.config
        await target.run("tcp", lambda: tcp(config.host, config.port))
        if self.tokens is not None and config.oauth is not None:
            token = functools.partial(_token, self.tokens, config.oauth)
            await target.run("oauth token", token)
        await target.run("tls" if config.ssl or config.start_tls else "connect", self.connect)
        await target.run("login", self.login)
        selected = await target.run("mailbox", self.select, blocking=False)
        idle = functools.partial(self.idle, selected=bool(selected))
        await target.run("idle", idle, blocking=False)
        for name, missing, present in self._capabilities():
            check = functools.partial(self.capability, name, missing, present)
            await target.run(name.lower(), check, blocking=False)
        await target.run("failed_folder", self.failed_folder, blocking=False)
        if selected or target.blocked is not None:
            await target.run("unseen", self.unseen, blocking=False)
        else:
            target.report.add(target.name, "unseen", Status.SKIP, "skipped: mailbox failed")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.logout()
        if self.tokens is not None:
            self.tokens.close()

    async def connect(self) -> Finding:
        config = self.config
        self._session = await ImapSession.connect(
            config,
            timeout_s=SESSION_TIMEOUT_S,
            token=self.tokens.token if self.tokens is not None else None,
        )
        if config.ssl or config.start_tls:
            how = "implicit TLS" if config.ssl else "STARTTLS"
            return certificate(self._session.tls, verified=config.tls_verify, how=how)
        return Status.WARN, (
            "IMAP greeting on a plain connection: the password crosses the network in clear "
            "text; set ssl: true (port 993) or start_tls: true"
        )

    async def login(self) -> Finding:
        await self.session.login()
        how = "XOAUTH2" if self.config.auth == "xoauth2" else "password"
        return Status.OK, f"logged in as {self.config.user} ({how})"

    async def select(self) -> Finding:
        await self.session.select()
        uidvalidity = self.session.uidvalidity
        return Status.OK, f"{self.config.mailbox} selected (UIDVALIDITY {uidvalidity})"

    def _capabilities(self) -> list[tuple[str, str, str]]:
        """What each capability mailroom uses gives, and what its absence costs."""
        return [
            (
                "UIDPLUS",
                "deleted messages are expunged only with expunge_deleted: true, and then by "
                "plain EXPUNGE, which also removes messages other clients marked \\Deleted",
                "only mailroom's own messages are expunged (UID EXPUNGE)",
            ),
            (
                "MOVE",
                "dead letters are copied and the originals flagged \\Deleted: not atomic (a "
                "crash in between leaves a copy in both folders)",
                "dead letters are moved atomically (UID MOVE)",
            ),
        ]

    async def idle(self, *, selected: bool) -> Finding:
        """IDLE advertised, and whether the server pushes where that can be known without
        writing to the mailbox: Courier's answer to IDLE says which IDLE it runs; no other
        server's does, so elsewhere the run finds out (``ImapWatcher``)."""
        session = self.session
        if "IDLE" not in session.capabilities:
            return Status.WARN, (
                "IDLE not advertised: mail will only be found by the periodic sweep, every "
                f"{self.config.idle_timeout_s:g}s (idle_timeout)"
            )
        if not selected:
            return Status.OK, "IDLE advertised (not tried: the mailbox could not be selected)"
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

    async def capability(self, name: str, missing: str, present: str) -> Finding:
        if name in self.session.capabilities:
            return Status.OK, f"{name} advertised: {present}"
        return Status.WARN, f"{name} not advertised: {missing}"

    async def unseen(self) -> Finding:
        config = self.config
        criteria = search_criteria(config)
        uids = await self.session.search(criteria)  # what the run searches
        tally = route.Tally()
        for start in range(0, min(len(uids), COUNT_AT_MOST), COUNT_BATCH):
            batch = uids[start : min(start + COUNT_BATCH, COUNT_AT_MOST)]
            # Routing reads only the header block: no bodies are fetched, nothing is marked.
            for item in await self.session.fetch(batch, "UID RFC822.SIZE BODY.PEEK[HEADER]"):
                tally.add(route.decide(item.body or b"", config, size=item.size))
        search = f"match search_command {config.search_command}"
        if " UNSEEN " in f" {criteria} " and "UNSEEN" not in search.upper():
            search += " and are unseen (mailroom adds UNSEEN)"
        return backlog(tally, len(uids), config, search=search)

    async def failed_folder(self) -> Finding:
        folder = self.config.failed_folder
        if folder is None:
            return (
                Status.OK,
                "not set: dead letters are flagged $MailroomFailed and \\Seen in place",
            )
        named = await self.session.named(folder)  # INBOX.Failed on Cyrus and Courier
        if await self.session.folder_exists(folder):
            return Status.OK, f"{named} exists"
        try:
            await self.session.create(folder)
        except MailroomError as exc:
            raise Failed(
                f"{named} does not exist and cannot be created ({exc}); create it by hand, "
                "or fix failed_folder"
            ) from exc
        return Status.OK, f"{named} did not exist; created it (as the first dead letter would)"


async def _token(tokens: Tokens, oauth: ImapOAuthConfig) -> Finding:
    await tokens.token()
    return Status.OK, f"access token for {tokens.scope} acquired ({oauth.client})"


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
    """The checks of one Microsoft Graph mailbox: the token, the folder, its unread mail, and
    that the app may change a message (as settling does)."""
    target = Target(report, f"graph[{config.id}]")
    tokens = TokenProvider(config.inbox_options.oauth, label=config.id)
    try:
        async with GraphClient(config.inbox_options, tokens, label=config.id) as client:
            steps = _GraphSteps(config, tokens, client)
            await target.run("token", steps.token)
            await target.run("folder", steps.folder)
            await target.run("unread", steps.unread, blocking=False)
            await target.run("patch", steps.patch)
    finally:
        tokens.close()


class _GraphSteps:
    """One Graph mailbox's checks, through one client; ``folder`` keeps an unread message's
    id and categories for ``patch``."""

    def __init__(self, config: GraphMailboxConfig, tokens: TokenProvider, client: GraphClient):
        self.config, self.tokens, self.client = config, tokens, client
        self.user = user_url(config)
        self.folder_url = messages_url(self.user, config.mailbox)
        self.sample: list[tuple[str, list[str]]] = []  # (id, categories) of one unread message

    async def token(self) -> Finding:
        await self.tokens.token()
        client_id = self.config.inbox_options.client_id
        return Status.OK, f"access token for {self.tokens.scope} acquired (client {client_id})"

    async def folder(self) -> Finding:
        # The poller's own listing, one message long.
        url = f"{self.folder_url}?$filter=isRead%20eq%20false&$select=id,categories&$top=1"
        page = await self.client.send("GET", url)
        for item in page.get("value", []):
            if isinstance(item.get("id"), str):
                categories = [c for c in item.get("categories") or [] if isinstance(c, str)]
                self.sample.append((item["id"], categories))
        unread = "at least one unread message" if self.sample else "no unread messages"
        config = self.config
        return Status.OK, f"users/{config.user}/mailFolders/{config.mailbox} readable ({unread})"

    async def patch(self) -> Finding:
        if not self.sample:
            return Status.WARN, (
                "not tried: no unread message to PATCH without changing it; send the mailbox "
                "a message and check again"
            )
        message_id, categories = self.sample[0]
        # Writes back the categories it has: a real PATCH needing Mail.ReadWrite that changes
        # nothing a poller relies on (isRead stays as it is).
        await self.client.send(
            "PATCH",
            message_url(self.user, message_id),
            body={"categories": categories},
            read=discard,
        )
        return Status.OK, "PATCH of a message allowed (Mail.ReadWrite)"

    async def unread(self) -> Finding:
        # The poller's own listing, then each message's header block from its $value (read no
        # further: read_mime with a limit of 0 stops after the headers).
        url: str | None = f"{self.folder_url}?$filter=isRead%20eq%20false&$select=id&$top=100"
        ids: list[str] = []
        for _ in range(GRAPH_PAGES_AT_MOST):
            if url is None:
                break
            page = await self.client.send("GET", url)
            ids += [i["id"] for i in page.get("value", []) if isinstance(i.get("id"), str)]
            url = self.client.next_link(page)
        tally = route.Tally()
        for message_id in ids[:GRAPH_COUNT_AT_MOST]:
            mime = f"{self.folder_url}/{quote(message_id, safe='')}/$value"
            header, size, _ = await self.client.send(
                "GET", mime, read=lambda response: read_mime(response, 0), accept="*/*"
            )
            size_known = size if size > len(header) else None
            tally.add(route.decide(header, self.config, size=size_known))
        more = " or more" if url is not None else ""
        return backlog(tally, len(ids), self.config, more=more)
