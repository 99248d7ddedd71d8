"""Shared fixtures: a session-wide Dovecot, fresh accounts, extra Dovecots, a webhook receiver,
SMTP servers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tests.servers.dovecot import DOVECOT, Account, Dovecot
from tests.servers.redis import REDIS_SERVER, RedisServer
from tests.servers.smtp import SmtpServer
from tests.servers.webhook import WebhookReceiver


def _require_dovecot() -> None:
    if not os.path.exists(DOVECOT):
        pytest.fail(
            f"{DOVECOT} is missing: run `make test` (it installs dovecot-imapd), "
            "or `apt-get install dovecot-imapd` as root",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """One private Dovecot for the whole session; use `account` for isolation."""
    _require_dovecot()
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
    _require_dovecot()
    started: list[Dovecot] = []

    def factory(**options: Any) -> Dovecot:
        server = Dovecot(**options)
        started.append(server)
        server.start()
        return server

    yield factory
    for server in started:
        server.close()


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
    started: list[SmtpServer] = []

    def factory(*args: Any, **kwargs: Any) -> SmtpServer:
        server = SmtpServer(*args, **kwargs)
        started.append(server)
        server.start()
        return server

    yield factory
    for server in started:
        server.stop()


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
    started: list[RedisServer] = []

    def factory(**kwargs: Any) -> RedisServer:
        server = RedisServer(**kwargs)
        started.append(server)
        server.start()
        return server

    yield factory
    for server in started:
        server.close()


def _require(path: str, package: str) -> None:
    if not os.path.exists(path):
        pytest.fail(
            f"{path} is missing: run `make test` (it installs {package}), "
            f"or `apt-get install {package}` as root",
            pytrace=False,
        )
