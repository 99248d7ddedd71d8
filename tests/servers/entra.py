"""A mock Microsoft Entra ID and Microsoft Graph over HTTPS (aiohttp, trustme CA) on 127.0.0.1.

It implements the documented shapes that mailroom uses, and checks what a real service checks:

- OpenID configuration: ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (what msal's
  tenant discovery fetches; msal reads ``authorization_endpoint`` and ``token_endpoint``).
- v2.0 token endpoint: ``POST /{tenant}/oauth2/v2.0/token`` with ``grant_type=
  client_credentials`` (RFC 6749 §4.4), the client authenticated by its secret or by a client
  assertion (``private_key_jwt``, RFC 7523 §2.2: a JWT signed with the key of a certificate
  uploaded to the app, found by its ``x5t`` or ``x5t#S256`` thumbprint; ``aud`` the token
  endpoint, ``iss`` and ``sub`` the client id, current ``exp``, a ``jti``); errors as
  ``{"error", "error_description", "error_codes", ...}`` with Entra's AADSTS numbers.
- Token introspection (RFC 7662): ``POST /introspect`` with ``token=...``, for Dovecot's oauth2
  passdb; ``username`` is the mailbox the client was granted.
- Graph v1.0 under ``graph_prefix``: list messages (``$filter`` by ``isRead``,
  ``receivedDateTime ge`` and ``categories/any``; ``$orderby=receivedDateTime`` only with
  that property first in ``$filter``, else 400 InefficientFilter,
  ``$select``, ``$top``/``$skip`` paging with ``@odata.nextLink``), ``$value``, PATCH, DELETE,
  move, and list/create mail folders. Every Graph call needs a live token whose scope is
  ``<graph base>/.default``, else 401 ``InvalidAuthenticationToken``.

Failures are injected per kind (``"token"``, ``"list"``, ``"value"``, ``"patch"``, ...) with
``fail_next`` (a 2xx with a ``body``: a malformed answer), one message's ``$value`` always with
``broken``; ``paging`` makes ``@odata.nextLink`` cyclic or endless. Every request is recorded;
``wait_for`` awaits a condition on the records.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from yarl import URL

from tests.servers.https import HttpsMock

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
GRAPH_MESSAGE = re.compile(r"^/v1\.0/users/([^/]+)/messages/([^/]+)$")
GRAPH_MOVE = re.compile(r"^/v1\.0/users/([^/]+)/messages/([^/]+)/move$")
GRAPH_FOLDER_MESSAGES = re.compile(r"^/v1\.0/users/([^/]+)/mailFolders/([^/]+)/messages$")
GRAPH_VALUE = re.compile(r"^/v1\.0/users/([^/]+)/mailFolders/([^/]+)/messages/([^/]+)/\$value$")
GRAPH_FOLDERS = re.compile(r"^/v1\.0/users/([^/]+)/mailFolders$")
WELL_KNOWN_FOLDERS = ("inbox", "deleteditems")


@dataclass
class Message:
    """A message in the mock mailbox."""

    id: str
    raw: bytes
    folder: str = "inbox"
    is_read: bool = False
    received: str = ""  # receivedDateTime, ISO 8601 UTC
    categories: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Token:
    """An access token the mock issued."""

    value: str
    client_id: str
    scope: str
    expires_at: float  # time.monotonic()


@dataclass(frozen=True)
class Request:
    """One request as the mock saw it."""

    kind: str  # discovery, token, introspect, list, value, patch, delete, move, folders, ...
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    token: str | None
    status: int
    at: float


class EntraGraph(HttpsMock):
    """The mock identity provider and Graph service; ``async with EntraGraph() as mock``."""

    name = "mock Graph"

    def __init__(
        self,
        *,
        tenant: str = "contoso-tenant",
        clients: dict[str, str] | None = None,
        graph_prefix: str = "",
        page_size: int | None = None,
    ) -> None:
        super().__init__()
        self.tenant = tenant
        self.clients = dict(clients or {"app-client": "app-secret-0123456789"})
        self.certificates: dict[str, list[x509.Certificate]] = {}  # client id → uploaded ones
        self.grants: dict[str, str] = {}  # client id → mailbox for IMAP (introspection username)
        self.graph_prefix = graph_prefix
        self.page_size = page_size  # serve fewer than $top per page (Graph may)
        self.token_lifetime_s = 3599
        self.scopes: set[str] = set()  # more scopes tokens are issued for (another Graph)
        self.paging = "normal"  # "cyclic": nextLink back to page 1; "endless": always a nextLink
        self.broken: dict[str, int] = {}  # message id → the status its $value always answers
        self.tokens: dict[str, Token] = {}
        self.messages: dict[str, Message] = {}
        self.folders: dict[str, str] = {}  # displayName → id (user folders)
        self.requests: list[Request] = []
        self.introspected: list[tuple[str, bool]] = []  # (token, active) as answered
        self._failures: dict[str, list[tuple[int, dict[str, str], bytes | None]]] = {}

    # -- addresses ---------------------------------------------------------------------------

    @property
    def login_endpoint(self) -> str:
        """``azure_ad_endpoint`` (authority host) for mailroom's config."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def graph_endpoint(self) -> str:
        """``graph_endpoint`` for mailroom's config."""
        return f"https://127.0.0.1:{self.port}{self.graph_prefix}"

    @property
    def introspection_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/introspect"

    # -- controls ----------------------------------------------------------------------------

    def add_message(self, raw: bytes, folder: str = "inbox", received: str | None = None) -> str:
        """Store a message (received now, or at ``received``); return its (Graph-looking) id."""
        message_id = "AAMkAGI2TG93AAA" + secrets.token_urlsafe(24) + "AAA="
        received = received or f"2026-01-01T00:00:{len(self.messages):02d}Z"
        self.messages[message_id] = Message(message_id, raw, folder, received=received)
        return message_id

    def in_folder(self, folder: str) -> list[Message]:
        return [m for m in self.messages.values() if m.folder == folder]

    def fail_next(
        self,
        kind: str,
        n: int = 1,
        status: int = 503,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> None:
        """Answer the next ``n`` requests of ``kind`` with ``status`` (and ``body``)."""
        self._failures.setdefault(kind, []).extend([(status, dict(headers or {}), body)] * n)

    def revoke(self, token: str) -> None:
        """Make ``token`` invalid at once (as if it expired early)."""
        old = self.tokens[token]
        self.tokens[token] = Token(old.value, old.client_id, old.scope, 0.0)

    def of_kind(self, *kinds: str) -> list[Request]:
        return [r for r in self.requests if r.kind in kinds]

    def polls_after(self, at: float) -> int:
        """How many message listings started after ``at`` (time.monotonic())."""
        return sum(1 for r in self.of_kind("list") if r.at > at)

    # -- server ------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        kind, handler = self._route(request)
        token = None
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth.removeprefix("Bearer ")
        if self._failures.get(kind):
            status, headers, raw = self._failures[kind].pop(0)
            error = {"error": {"code": "TooManyRequests" if status == 429 else "Injected"}}
            response: web.StreamResponse = web.json_response(error, status=status, headers=headers)
            if raw is not None:
                response = web.Response(body=raw, status=status, content_type="text/html")
        else:
            response = await handler(request, body, token)
        self.requests.append(
            Request(
                kind,
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                body,
                token,
                response.status,
                time.monotonic(),
            )
        )
        await self._changed_now()
        return response

    def _route(self, request: web.Request) -> tuple[str, Any]:
        path, method, tenant = request.path, request.method, f"/{self.tenant}"
        if method == "GET" and path == f"{tenant}/v2.0/.well-known/openid-configuration":
            return "discovery", self._discovery
        if path.endswith("/v2.0/.well-known/openid-configuration"):
            return "discovery", self._unknown_tenant
        if method == "POST" and path == f"{tenant}/oauth2/v2.0/token":
            return "token", self._token
        if method == "POST" and path == "/introspect":
            return "introspect", self._introspect
        if self.graph_prefix and not path.startswith(self.graph_prefix + "/"):
            return "other", self._not_found
        path = path.removeprefix(self.graph_prefix)
        routes = [
            ("GET", GRAPH_FOLDER_MESSAGES, "list", self._list),
            ("GET", GRAPH_VALUE, "value", self._value),
            ("PATCH", GRAPH_MESSAGE, "patch", self._patch),
            ("DELETE", GRAPH_MESSAGE, "delete", self._delete),
            ("POST", GRAPH_MOVE, "move", self._move),
            ("GET", GRAPH_FOLDERS, "folders", self._list_folders),
            ("POST", GRAPH_FOLDERS, "create_folder", self._create_folder),
        ]
        for verb, pattern, kind, handler in routes:
            if method == verb and (match := pattern.match(path)):
                return kind, self._graph(handler, match)
        return "other", self._not_found

    # -- identity provider -------------------------------------------------------------------

    async def _discovery(self, request: web.Request, body: bytes, token: str | None) -> Any:
        base = f"https://{request.host}/{self.tenant}"
        return web.json_response(
            {
                "issuer": f"{base}/v2.0",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "jwks_uri": f"https://{request.host}/{self.tenant}/discovery/v2.0/keys",
                "response_types_supported": ["code", "id_token", "code id_token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
                "tenant_region_scope": "EU",
            }
        )

    async def _unknown_tenant(self, request: web.Request, body: bytes, token: str | None) -> Any:
        return _aad_error(400, "invalid_tenant", "AADSTS90002: Tenant not found.", 90002)

    async def _token(self, request: web.Request, body: bytes, token: str | None) -> Any:
        form = {k: str(v) for k, v in (await request.post()).items()}
        client_id = form.get("client_id", "")
        if form.get("grant_type") != "client_credentials":
            return _aad_error(400, "unsupported_grant_type", "AADSTS70003: unsupported.", 70003)
        if client_id not in self.clients and client_id not in self.certificates:
            return _aad_error(
                400, "unauthorized_client", "AADSTS700016: Application not found.", 700016
            )
        if "client_assertion" in form or "client_assertion_type" in form:
            endpoint = f"https://{request.host}/{self.tenant}/oauth2/v2.0/token"
            refusal = self._assertion_refusal(client_id, form, endpoint)
            if refusal is not None:
                return refusal
        elif client_id not in self.clients or not secrets.compare_digest(
            form.get("client_secret", ""), self.clients[client_id]
        ):
            return _aad_error(
                401,
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent "
                "in the request is the client secret value, not the client secret ID.",
                7000215,
            )
        scope = str(form.get("scope", ""))
        allowed = {f"{self.graph_endpoint}/.default", "https://outlook.office365.com/.default"}
        allowed |= self.scopes
        if scope.split() != [scope] or scope not in allowed:
            return _aad_error(400, "invalid_scope", f"AADSTS1002012: bad scope {scope}", 1002012)
        value = f"eyJ0eXAi.{secrets.token_urlsafe(24)}.sig"
        lifetime = self.token_lifetime_s
        self.tokens[value] = Token(value, client_id, scope, time.monotonic() + lifetime)
        return web.json_response(
            {
                "token_type": "Bearer",
                "expires_in": lifetime,
                "ext_expires_in": lifetime,
                "access_token": value,
            }
        )

    def _assertion_refusal(
        self, client_id: str, form: dict[str, str], endpoint: str
    ) -> web.Response | None:
        """None when the client assertion proves the client (RFC 7523 §3), else Entra's error."""
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            return _aad_error(400, "invalid_request", "AADSTS50027: bad assertion type", 50027)
        assertion = form.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            return _aad_error(
                400, "invalid_request", "AADSTS50027: JWT token is invalid or malformed.", 50027
            )
        registered = [
            certificate
            for certificate in self.certificates.get(client_id, [])
            # msal keeps the base64 padding that JOSE leaves out (RFC 7515 §2); Entra takes both.
            if str(header.get("x5t", "")).rstrip("=") == _thumbprint(certificate, hashes.SHA1())
            or str(header.get("x5t#S256", "")).rstrip("=")
            == _thumbprint(certificate, hashes.SHA256())
        ]
        if not registered:
            return _aad_error(
                401,
                "invalid_client",
                "AADSTS700027: The certificate with identifier used to sign the client "
                "assertion is not registered on application. [Reason - The key was not found.]",
                700027,
            )
        try:
            claims = jwt.decode(
                assertion,
                registered[0].public_key(),  # type: ignore[arg-type]
                algorithms=["RS256", "PS256"],
                audience=endpoint,
                issuer=client_id,
                options={"require": ["aud", "iss", "sub", "exp", "jti"]},
            )
        except jwt.InvalidSignatureError:
            return _aad_error(
                401,
                "invalid_client",
                "AADSTS700027: Client assertion contains an invalid signature.",
                700027,
            )
        except jwt.PyJWTError as exc:
            return _aad_error(
                401, "invalid_client", f"AADSTS700023: Client assertion: {exc}", 700023
            )
        if claims["sub"] != client_id:
            return _aad_error(401, "invalid_client", "AADSTS700021: bad sub", 700021)
        return None

    async def _introspect(self, request: web.Request, body: bytes, token: str | None) -> Any:
        form = dict(await request.post())
        value = str(form.get("token", ""))
        found = self.tokens.get(value)
        active = found is not None and found.expires_at > time.monotonic()
        self.introspected.append((value, active))
        if found is None or not active:
            return web.json_response({"active": False})  # RFC 7662 §2.2
        return web.json_response(
            {
                "active": True,
                "client_id": found.client_id,
                "scope": found.scope,
                "token_type": "Bearer",
                "username": self.grants.get(found.client_id, ""),
            }
        )

    # -- Graph -------------------------------------------------------------------------------

    def _graph(self, handler: Any, match: re.Match[str]) -> Any:
        async def checked(request: web.Request, body: bytes, token: str | None) -> Any:
            found = self.tokens.get(token or "")
            if (
                found is None
                or found.expires_at <= time.monotonic()
                or found.scope != f"{self.graph_endpoint}/.default"
            ):
                return _graph_error(401, "InvalidAuthenticationToken", "Access token is invalid.")
            return await handler(request, body, *match.groups())

        return checked

    async def _list(self, request: web.Request, body: bytes, user: str, folder: str) -> Any:
        query = request.query
        clauses = query.get("$filter", "").split(" and ")
        order = query.get("$orderby", "").split()
        tests = [_clause(clause) for clause in clauses]
        if None in tests:
            return _graph_error(400, "BadRequest", f"mock: cannot filter by {clauses}")
        if order and (order[0] != "receivedDateTime" or not clauses[0].startswith(order[0])):
            return _graph_error(400, "InefficientFilter", "The sort order is too complex.")
        top = int(query.get("$top", "10"))
        skip = int(query.get("$skip", "0"))
        size = min(top, self.page_size or top)
        unread = [
            m
            for m in self.messages.values()
            if m.folder == folder and all(test(m) for test in tests if test is not None)
        ]
        if order:
            unread.sort(key=lambda m: m.received, reverse=order[1:] == ["desc"])
        page = unread[skip : skip + size]
        fields = query.get("$select", "").split(",")
        document: dict[str, Any] = {
            "@odata.context": f"{self.graph_endpoint}/v1.0/$metadata#users('{user}')/messages",
            "value": [_select(m, fields) for m in page],
        }
        if skip + size < len(unread) or self.paging != "normal":
            rest = {k: v for k, v in query.items() if k != "$skip"}
            rest["$skip"] = "0" if self.paging == "cyclic" else str(skip + size)
            document["@odata.nextLink"] = str(
                URL(
                    f"{self.graph_endpoint}/v1.0/users/{user}/mailFolders/{folder}/messages"
                ).with_query(rest)
            )
        return web.json_response(document)

    async def _value(
        self, request: web.Request, body: bytes, user: str, folder: str, message_id: str
    ) -> Any:
        message = self.messages.get(message_id)
        status = 404 if message is None or message.folder != folder else 200
        status = self.broken.get(message_id, status)
        if message is None or status != 200:
            return _graph_error(status, "ErrorItemNotFound" if status == 404 else "Injected", "")
        return web.Response(body=message.raw, content_type="text/plain")

    async def _patch(self, request: web.Request, body: bytes, user: str, message_id: str) -> Any:
        message = self.messages.get(message_id)
        if message is None:
            return _graph_error(404, "ErrorItemNotFound", "The specified object was not found.")
        document = await request.json()
        if "isRead" in document:
            message.is_read = bool(document["isRead"])
        if "categories" in document:
            message.categories = list(document["categories"])
        return web.json_response(_select(message, ["id", "isRead", "categories"]))

    async def _delete(self, request: web.Request, body: bytes, user: str, message_id: str) -> Any:
        message = self.messages.get(message_id)
        if message is None:
            return _graph_error(404, "ErrorItemNotFound", "The specified object was not found.")
        message.folder = "deleteditems"  # a soft delete, as Exchange does
        return web.Response(status=204)

    async def _move(self, request: web.Request, body: bytes, user: str, message_id: str) -> Any:
        message = self.messages.get(message_id)
        if message is None:
            return _graph_error(404, "ErrorItemNotFound", "The specified object was not found.")
        destination = (await request.json()).get("destinationId")
        if destination not in self.folders.values() and destination not in WELL_KNOWN_FOLDERS:
            return _graph_error(400, "ErrorInvalidIdMalformed", "Id is malformed.")
        message.folder = destination
        return web.json_response(_select(message, ["id"]), status=201)

    async def _list_folders(self, request: web.Request, body: bytes, user: str) -> Any:
        match = re.fullmatch(r"displayName eq '((?:[^']|'')*)'", request.query.get("$filter", ""))
        names = [match.group(1).replace("''", "'")] if match else list(self.folders)
        found = [{"id": self.folders[n], "displayName": n} for n in names if n in self.folders]
        return web.json_response({"value": found})

    async def _create_folder(self, request: web.Request, body: bytes, user: str) -> Any:
        name = (await request.json())["displayName"]
        if name in self.folders:
            return _graph_error(409, "ErrorFolderExists", "A folder with the name exists.")
        self.folders[name] = "AAMkFolder" + secrets.token_urlsafe(12)
        return web.json_response({"id": self.folders[name], "displayName": name}, status=201)

    async def _not_found(self, request: web.Request, body: bytes, token: str | None) -> Any:
        return _graph_error(404, "ResourceNotFound", f"mock: no route for {request.path}")


def _clause(clause: str) -> Callable[[Message], bool] | None:
    """One ``$filter`` clause the mock knows (``isRead eq ...``, ``receivedDateTime ge ...``,
    ``categories/any(c:c eq '...')``) as a test, or None."""
    if match := re.fullmatch(r"isRead eq (true|false)", clause):
        is_read = match.group(1) == "true"
        return lambda m: m.is_read == is_read
    if match := re.fullmatch(r"receivedDateTime ge (\S+Z)", clause):
        start = match.group(1)
        return lambda m: m.received >= start  # ISO 8601 in UTC sorts as text
    if match := re.fullmatch(r"categories/any\((\w+):\1 eq '((?:[^']|'')*)'\)", clause):
        category = match.group(2).replace("''", "'")
        return lambda m: category in m.categories
    return None


def _select(message: Message, fields: list[str]) -> dict[str, Any]:
    full = {
        "id": message.id,
        "isRead": message.is_read,
        "categories": message.categories,
        "receivedDateTime": message.received,
        "internetMessageId": _message_id(message.raw),
    }
    return {k: v for k, v in full.items() if k in fields}


def _thumbprint(certificate: x509.Certificate, algorithm: hashes.HashAlgorithm) -> str:
    """The ``x5t`` (SHA-1) or ``x5t#S256`` JOSE header value of ``certificate`` (RFC 7515)."""
    return base64.urlsafe_b64encode(certificate.fingerprint(algorithm)).rstrip(b"=").decode()


def _message_id(raw: bytes) -> str | None:
    match = re.search(rb"^Message-ID: *(\S+)", raw, re.IGNORECASE | re.MULTILINE)
    return match.group(1).decode(errors="replace") if match else None


def _aad_error(status: int, error: str, description: str, code: int) -> web.Response:
    return web.json_response(
        {
            "error": error,
            "error_description": f"{description}\r\nTrace ID: 0000\r\nCorrelation ID: 0000",
            "error_codes": [code],
            "timestamp": "2026-11-22 10:00:00Z",
            "trace_id": "00000000-0000-0000-0000-000000000000",
            "correlation_id": "00000000-0000-0000-0000-000000000000",
        },
        status=status,
    )


def _graph_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)
