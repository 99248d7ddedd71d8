"""Shared fixtures: a session-wide Dovecot, fresh accounts, extra Dovecots, the same for Cyrus
and Courier (``imap_server``: each test once per server), a webhook receiver, SMTP servers."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol, TypeVar

import pytest

from tests.servers.courier import Courier
from tests.servers.cyrus import Cyrus
from tests.servers.dovecot import DOVECOT, Account, Dovecot
from tests.servers.imap import ImapServer
from tests.servers.redis import REDIS_SERVER, RedisServer
from tests.servers.smtp import SmtpServer
from tests.servers.webhook import WebhookReceiver


class _Server(Protocol):
    def start(self) -> None: ...


S = TypeVar("S", bound=_Server)


def _require(path: str, package: str) -> None:
    if not os.path.exists(path):
        pytest.fail(
            f"{path} is missing: run `make test` (it installs {package}), "
            f"or `apt-get install {package}` as root",
            pytrace=False,
        )


def _factory(make: Callable[..., S], end: Callable[[S], None]) -> Iterator[Callable[..., S]]:
    """The body of a factory fixture: each call makes a server with the arguments given and
    starts it; ``end`` stops each one at teardown."""
    started: list[S] = []

    def factory(*args: Any, **kwargs: Any) -> S:
        server = make(*args, **kwargs)
        started.append(server)
        server.start()
        return server

    yield factory
    for server in started:
        end(server)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One private Dovecot for the whole session; use `account` for isolation."""
    _require(DOVECOT, "dovecot-imapd")
    with Dovecot() as server:
        yield server


@pytest.fixture
def account(dovecot: Dovecot) -> Account:
    """A fresh user with an empty INBOX on the session Dovecot."""
    return dovecot.add_user()


@pytest.fixture
def dovecot_factory() -> Iterator[Callable[..., Dovecot]]:
    """Start extra private Dovecots (for restart/kill tests, or with ``Dovecot``'s options such
    as an oauth2 passdb); all are removed at teardown."""
    _require(DOVECOT, "dovecot-imapd")
    yield from _factory(Dovecot, Dovecot.close)


SERVERS: dict[str, type[ImapServer]] = {"dovecot": Dovecot, "cyrus": Cyrus, "courier": Courier}


def _start(kind: type[ImapServer]) -> Iterator[ImapServer]:
    server = kind()
    try:
        if (missing := server.missing()) is not None:
            pytest.fail(
                f"{missing} is missing: run `make test` (it unpacks Debian's {kind.name} "
                "packages into .venv/imap-servers)",
                pytrace=False,
            )
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def cyrus() -> Iterator[ImapServer]:
    """One private Cyrus IMAP (with idled: it pushes) for the whole session."""
    yield from _start(Cyrus)


@pytest.fixture(scope="session")
def courier() -> Iterator[ImapServer]:
    """One private Courier-IMAP (IMAP_ENHANCEDIDLE=1: it pushes) for the whole session."""
    yield from _start(Courier)


@pytest.fixture(params=list(SERVERS))
def imap_server(request: pytest.FixtureRequest) -> ImapServer:
    """The session's Dovecot, Cyrus and Courier in turn: a test using it runs on each."""
    server: ImapServer = request.getfixturevalue(request.param)
    return server


@pytest.fixture
def imap_account(imap_server: ImapServer) -> Account:
    """A fresh user with an empty INBOX on ``imap_server``."""
    return imap_server.add_user()


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ImapServer]]:
    """Start extra private servers: ``server_factory("cyrus", push=False)``; all are removed
    at teardown."""

    def make(name: str, **kwargs: Any) -> ImapServer:
        server = SERVERS[name](**kwargs)
        if (missing := server.missing()) is not None:
            server.close()
            pytest.fail(f"{missing} is missing: run `make test`", pytrace=False)
        return server

    yield from _factory(make, ImapServer.close)


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookReceiver]:
    """A running WebhookReceiver in the test's event loop."""
    async with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    """A running plain-text aiosmtpd server that accepts and records every message."""
    with SmtpServer() as server:
        yield server


@pytest.fixture
def smtp_factory() -> Iterator[Callable[..., SmtpServer]]:
    """Start SMTP servers with other settings (``SmtpServer`` arguments); stopped at teardown."""
    yield from _factory(SmtpServer, SmtpServer.stop)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port (no persistence), removed at teardown."""
    _require(REDIS_SERVER, "redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers with other settings (``RedisServer`` arguments)."""
    _require(REDIS_SERVER, "redis-server")
    yield from _factory(RedisServer, RedisServer.close)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """For a test that runs ``cli.main``: its ``logs.configure`` replaces the root logger's
    handlers (with one on the captured stderr, closed after the test) and the ``mailroom``
    logger's level; both are put back."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("mailroom").level)
    yield
    for handler in root.handlers:
        if handler not in saved[0] and isinstance(handler, logging.FileHandler):
            handler.close()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("mailroom").setLevel(saved[2])
