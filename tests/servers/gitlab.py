"""A stand-in for GitLab's internal mail_room API, written from GitLab's behaviour.

``POST /api/v4/internal/mail_room/<mailbox_type>`` (lib/api/internal/mail_room.rb), in the order
GitLab checks:

1. a body whose media type Grape does not accept (GitLab's API takes ``text/plain`` and
   ``application/json``) → 415, before any authentication;
2. a mailbox type that is not enabled, or a ``Gitlab-Mailroom-Api-Request`` JWT that does not
   verify as HS256 with that type's *decoded* secret, issuer ``gitlab-mailroom`` and an ``iat``
   within the last 5 minutes (Gitlab::MailRoom::Authenticator) → 401 ``{"message": "401
   Unauthorized"}``;
3. on demand (``refuse_next``), 400 ``{"success": false, "message": ...}``: GitLab could not
   queue the mail (too large) and has already answered the sender;
4. otherwise 200 ``{"success": true}``, the raw message recorded as delivered.

Any other path is a 404. Every request is recorded with its status.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from types import TracebackType

import jwt
from aiohttp import web
from multidict import CIMultiDict

from tests.servers.http import serve

HEADER = "Gitlab-Mailroom-Api-Request"
ISSUER = "gitlab-mailroom"
EXPIRATION_S = 300  # Gitlab::MailRoom::Authenticator::EXPIRATION
PREFIX = "/api/v4/internal/mail_room/"
ACCEPTED = frozenset({"text/plain", "application/json"})


@dataclass(frozen=True)
class Request:
    """One request as the stand-in saw it, and what it answered."""

    mailbox_type: str
    status: int
    headers: CIMultiDict[str]
    body: bytes


class GitLabInternalApi:
    """GitLab's internal API on 127.0.0.1, for the mailbox types in ``secrets`` (type → the
    decoded 32-byte secret GitLab verifies with)."""

    def __init__(self, secrets: dict[str, bytes]) -> None:
        self.secrets = dict(secrets)
        self.requests: list[Request] = []
        self.port = 0
        self._refusals: list[str] = []
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """What gitlab.yml calls ``gitlab_url``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def delivered(self) -> list[Request]:
        return [r for r in self.requests if r.status == 200]

    def refuse_next(self, message: str, n: int = 1) -> None:
        """Answer the next ``n`` authenticated requests 400 ``{"success": false, message}``."""
        self._refusals = [message] * n

    async def wait_for(self, count: int, *, status: int = 200, timeout: float = 15.0) -> None:
        """Wait until ``count`` requests were answered with ``status``."""

        def enough() -> bool:
            return sum(1 for r in self.requests if r.status == status) >= count

        async with self._arrived:
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait_for(enough)
            except TimeoutError:
                statuses = [r.status for r in self.requests]
                raise AssertionError(
                    f"gitlab: expected {count} answer(s) {status} in {timeout}s, got {statuses}"
                ) from None

    def _authenticated(self, mailbox_type: str, token: str | None) -> bool:
        secret = self.secrets.get(mailbox_type)
        if secret is None or token is None:
            return False
        try:
            claims = jwt.decode(
                token, secret, algorithms=["HS256"], issuer=ISSUER, options={"require": ["iat"]}
            )
        except jwt.PyJWTError:
            return False
        return int(claims["iat"]) >= time.time() - EXPIRATION_S

    def _answer(self, mailbox_type: str, request: web.Request, body: bytes) -> web.Response:
        media_type = request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if body and media_type not in ACCEPTED:
            return web.json_response(
                {"error": f"The provided content-type '{media_type}' is not supported."},
                status=415,
            )
        if not self._authenticated(mailbox_type, request.headers.get(HEADER)):
            return web.json_response({"message": "401 Unauthorized"}, status=401)
        if self._refusals:
            return web.json_response(
                {"success": False, "message": self._refusals.pop(0)}, status=400
            )
        return web.json_response({"success": True}, status=200)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.method != "POST" or not request.path.startswith(PREFIX):
            response = web.json_response({"message": "404 Not Found"}, status=404)
            mailbox_type = ""
        else:
            mailbox_type = request.path.removeprefix(PREFIX)
            response = self._answer(mailbox_type, request, body)
        async with self._arrived:
            self.requests.append(
                Request(mailbox_type, response.status, CIMultiDict(request.headers), body)
            )
            self._arrived.notify_all()
        return response

    async def start(self) -> None:
        self._runner, self.port = await serve(
            self._handle, port=self.port, client_max_size=64 * 1024 * 1024
        )

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> GitLabInternalApi:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
