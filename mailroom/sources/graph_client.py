"""HTTP to Microsoft Graph v1.0 for one mailbox: bearer tokens, immutable ids, Graph's errors.

The ``aiohttp.ClientSession`` is shared by every mailbox of one ``graph_endpoint`` (``session``
builds it; TLS trusts what every mailroom client trusts, ``mailroom.tls``); a client given none
makes its own for the length of its ``async with``. Every request carries
``Prefer: IdType="ImmutableId"`` (Graph, "Obtain immutable identifiers for Outlook
resources"), so a message keeps its id when moved. A 401 gets one fresh token and one retry;
every other failure becomes a ``GraphError`` with the status, Graph's error ``code`` and the
``Retry-After`` seconds (Graph, "Microsoft Graph throttling guidance"; RFC 9110 §10.2.3).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from mailroom import USER_AGENT
from mailroom.backoff import ONCE_MORE, Retry, retry_after
from mailroom.config import GraphInboxOptions, GraphMailboxConfig
from mailroom.errors import GraphError
from mailroom.trust.entra import TokenProvider
from mailroom.trust.proxies import proxy_for
from mailroom.trust.tls import client_context

__all__ = [
    "GraphClient",
    "discard",
    "message_url",
    "messages_url",
    "read_mime",
    "session",
    "user_url",
]

log = logging.getLogger("mailroom.graph")

TIMEOUT = aiohttp.ClientTimeout(total=None, connect=15, sock_connect=15, sock_read=60)
HEADER_LIMIT = 256 * 1024  # a too-large message: at most this much of its header block
CHUNK = 64 * 1024

Reader = Callable[[aiohttp.ClientResponse], Awaitable[Any]]


def user_url(config: GraphMailboxConfig) -> str:
    """``.../v1.0/users/{user}``: where every URL of one mailbox begins."""
    return f"{config.inbox_options.graph_endpoint}/v1.0/users/{quote(config.user, safe='@')}"


def messages_url(user: str, folder: str) -> str:
    """The messages of ``folder`` (a well-known name, a display name's id, or an id) under
    ``user`` (``user_url``)."""
    return f"{user}/mailFolders/{quote(folder, safe='')}/messages"


def message_url(user: str, message_id: str) -> str:
    """One message of ``user`` (``user_url``), whichever folder it is in."""
    return f"{user}/messages/{quote(message_id, safe='')}"


def session(options: GraphInboxOptions, *, limit: int = 8) -> aiohttp.ClientSession:
    """An HTTP session for ``options.graph_endpoint``, at most ``limit`` connections."""
    context = client_context(ca_file=options.ca_file, verify=options.tls_verify)
    connector = aiohttp.TCPConnector(ssl=context, limit=limit)
    # trust_env=False: proxies come from mailroom.proxies, per request; .netrc is never read.
    return aiohttp.ClientSession(connector=connector, trust_env=False)


class GraphClient:
    """Authenticated requests to one ``graph_endpoint``; ``async with`` owns the session."""

    def __init__(
        self,
        options: GraphInboxOptions,
        tokens: TokenProvider,
        *,
        label: str,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        self.label = label
        self.tokens = tokens
        self._options = options
        self._origin = urlsplit(options.graph_endpoint)[:2]
        self._shared = http
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GraphClient:
        self._http = self._shared or session(self._options)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None and self._http is not self._shared:
            await self._http.close()
        self._http = None

    def next_link(self, page: dict[str, Any]) -> str | None:
        """``@odata.nextLink`` of a page (Graph, "Paging Microsoft Graph data"), or None."""
        link = page.get("@odata.nextLink")
        if link is None:
            return None
        # The token goes wherever the link points: only ever back to graph_endpoint.
        if not isinstance(link, str) or urlsplit(link)[:2] != self._origin:
            raise GraphError(f"@odata.nextLink {link!r} leaves graph_endpoint; not followed")
        return link

    async def send(
        self,
        method: str,
        url: str,
        *,
        body: dict[str, Any] | None = None,
        read: Reader | None = None,
        accept: str = "application/json",
    ) -> Any:
        """One request; ``read`` turns a 2xx answer into the result (default: a JSON object).

        ``url`` is already percent-encoded (it is sent as is, like a server's nextLink).
        """
        http = self._http
        if http is None:
            raise RuntimeError("use GraphClient in `async with`")
        retry = Retry(ONCE_MORE)  # a 401 gets one fresh token
        while True:
            retry.begin()
            headers = {
                "Authorization": f"Bearer {await self.tokens.token()}",
                "Accept": accept,
                "Prefer": 'IdType="ImmutableId"',
                "User-Agent": USER_AGENT,
            }
            try:
                async with http.request(
                    method,
                    URL(url, encoded=True),
                    json=body,
                    headers=headers,
                    timeout=TIMEOUT,
                    allow_redirects=False,
                    proxy=proxy_for(url, self._options.proxy),
                ) as response:
                    if response.status == 401 and (delay := retry.delay()) is not None:
                        log.warning(
                            "%s: Graph refused the access token (401, attempt %d); getting a new "
                            "one and trying again",
                            self.label,
                            retry.attempt,
                            extra={"mailbox": self.label, **retry.extra(None, delay)},
                        )
                        self.tokens.invalidate()
                        continue
                    if not 200 <= response.status < 300:
                        raise await _error(method, url, response)
                    return await (read or _json)(response)
            except TimeoutError as exc:
                raise GraphError(f"{method} {_path(url)}: no answer in time") from exc
            except aiohttp.ClientError as exc:
                raise GraphError(f"{method} {_path(url)}: {type(exc).__name__}: {exc}") from exc

    async def find_folder(self, user_url: str, name: str) -> str | None:
        """The id of the mail folder ``name`` under the mailbox root, or None."""
        odata_name = name.replace("'", "''")  # OData string literal
        query = quote(f"displayName eq '{odata_name}'", safe="")
        url = f"{user_url}/mailFolders?$filter={query}&$select=id,displayName"
        found = (await self.send("GET", url)).get("value")
        return _folder_id(found[0]) if found and isinstance(found, list) else None

    async def folder_id(self, user_url: str, name: str) -> str:
        """The id of the mail folder ``name`` under the mailbox root, created when missing."""
        retry = Retry(ONCE_MORE)  # created by another client meanwhile: found the second time
        while True:
            retry.begin()
            if (found := await self.find_folder(user_url, name)) is not None:
                return found
            try:
                created = await self.send(
                    "POST", f"{user_url}/mailFolders", body={"displayName": name}
                )
            except GraphError as exc:
                if exc.status == 409 and retry.delay() is not None:  # ErrorFolderExists
                    continue
                raise
            log.info("%s: created the folder %r", self.label, name, extra={"mailbox": self.label})
            return _folder_id(created)


def _path(url: str) -> str:
    return urlsplit(url).path


async def _json(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The JSON object of a 2xx answer; anything else (HTML from a proxy, say) a GraphError."""
    where = f"{response.method} {response.url.path}: HTTP {response.status}"
    try:
        document = await response.json(content_type=None)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise GraphError(f"{where}: the answer is not JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise GraphError(f"{where}: the answer is not a JSON object")
    return document


def _folder_id(folder: Any) -> str:
    folder_id = folder.get("id") if isinstance(folder, dict) else None
    if not isinstance(folder_id, str) or not folder_id:
        raise GraphError(f"Graph answered a mail folder without an id: {str(folder)[:200]}")
    return folder_id


async def read_mime(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, int, bool]:
    """The MIME bytes, their size and False; or, over ``limit`` bytes, only the header block,
    the size and True."""
    declared = response.content_length
    too_large = declared is not None and declared > limit
    buffer = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK):
        buffer += chunk
        too_large = too_large or len(buffer) > limit
        if too_large and (_header_end(buffer) or len(buffer) >= HEADER_LIMIT):
            break  # stop reading: the connection is dropped, not drained
    if not too_large:
        return bytes(buffer), len(buffer), False
    end = _header_end(buffer) or HEADER_LIMIT
    return bytes(buffer[:end]), max(declared or 0, len(buffer)), True


def _header_end(buffer: bytearray) -> int:
    """The length of the header block including its blank line, or 0 when not yet seen."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        index = buffer.find(separator)
        if index >= 0:
            return index + len(separator)
    return 0


async def discard(response: aiohttp.ClientResponse) -> None:
    """A ``read`` for answers whose body is of no interest (204, PATCH echoes)."""
    await response.read()


async def _error(method: str, url: str, response: aiohttp.ClientResponse) -> GraphError:
    """Graph's error object: ``{"error": {"code": ..., "message": ...}}`` (Graph "Errors")."""
    code, message = None, ""
    try:
        document = await response.json(content_type=None)
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict):
            code, message = error.get("code"), str(error.get("message") or "")
    except (ValueError, aiohttp.ClientError):
        pass
    hint = {
        401: "; is the access token for this graph_endpoint?",
        403: "; grant the app Mail.ReadWrite and check its application access policy",
        404: "; check user and mailbox",
    }.get(response.status, "")
    text = f"{method} {_path(url)}: HTTP {response.status} {code or ''} {message[:200]}".rstrip()
    return GraphError(
        text + hint,
        status=response.status,
        code=code,
        retry_after_s=retry_after(response.headers.get("Retry-After")),
    )
