"""An aiosmtpd SMTP server on 127.0.0.1 for the tests: plain, STARTTLS or implicit TLS, optional
AUTH, scripted failures, and every message recorded.

aiosmtpd's ``Controller`` runs its own event loop in a thread. Its handler records into lists
under a lock and wakes the test's waiters with ``call_soon_threadsafe``, so a test awaits an
event instead of sleeping.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from types import TracebackType
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.servers import tls
from tests.servers.dovecot import free_port

Mode = Literal["plain", "start_tls", "ssl"]
Stage = Literal["AUTH", "MAIL", "RCPT", "DATA"]


def _null(address: str) -> str:
    """aiosmtpd hands the null reverse-path over as "<>"; record it as ""."""
    return "" if address in ("", "<>") else address


@dataclass(frozen=True)
class ReceivedMail:
    """One accepted message: the envelope as the client gave it and the exact bytes."""

    mail_from: str  # "" for the null reverse-path MAIL FROM:<>
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...]  # e.g. ("SMTPUTF8",)
    login: str | None  # the AUTH user, if the client authenticated
    tls: bool  # whether the session was encrypted (STARTTLS or implicit TLS)

    def message(self) -> EmailMessage:
        """The data parsed with the modern email policy."""
        parsed = BytesParser(policy=policy.default).parsebytes(self.data)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass(frozen=True)
class Attempt:
    """One transaction step the server answered: which stage and with what code."""

    stage: Stage
    code: int
    mail_from: str


class SmtpServer:
    """An SMTP server that accepts everything, unless told to fail or to require AUTH.

    ``fail_next(n, code)`` answers the next ``n`` transactions with ``code`` at ``stage``
    (``recover()`` clears what is left); ``refuse_null_sender`` answers ``MAIL FROM:<>`` with
    553. With ``user``/``password``, MAIL is refused with 530 until the client authenticated.
    ``smtputf8`` offers SMTPUTF8 (RFC 6531), which aiosmtpd does not by default.
    """

    def __init__(
        self,
        mode: Mode = "plain",
        *,
        user: str | None = None,
        password: str | None = None,
        refuse_null_sender: bool = False,
        smtputf8: bool = False,
    ) -> None:
        self.mode = mode
        self.smtputf8 = smtputf8
        self.host = "127.0.0.1"
        self.port = free_port()
        self.user = user
        self.password = password
        self.refuse_null_sender = refuse_null_sender
        self.messages: list[ReceivedMail] = []
        self.attempts: list[Attempt] = []
        self._failures: list[tuple[Stage, int, str]] = []
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._controller: Controller | None = None

    # -- controls ---------------------------------------------------------------------------

    def fail_next(
        self, n: int, code: int = 451, text: str | None = None, *, stage: Stage = "DATA"
    ) -> None:
        """Answer the next ``n`` transactions with ``code`` at ``stage``."""
        text = text or {4: "4.3.0 Try again later", 5: "5.7.1 Refused"}[code // 100]
        with self._lock:
            self._failures = [(stage, code, text)] * n

    def recover(self) -> None:
        """Drop the failures not yet used: accept from now on."""
        with self._lock:
            self._failures = []

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMail]:
        """Wait until at least ``count`` messages were accepted; return all of them."""
        await self._wait(lambda: len(self.messages) >= count, timeout, f"{count} message(s)")
        with self._lock:
            return list(self.messages)

    async def wait_for_attempts(self, count: int, timeout: float = 10.0) -> list[Attempt]:
        """Wait until at least ``count`` answered attempts (failed or not); return them."""
        await self._wait(lambda: len(self.attempts) >= count, timeout, f"{count} attempt(s)")
        with self._lock:
            return list(self.attempts)

    async def _wait(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event.clear()
                    with self._lock:
                        if done():
                            return
                    await event.wait()
        except TimeoutError:
            raise AssertionError(
                f"smtp: expected {what} within {timeout} s; got {len(self.messages)} message(s) "
                f"and {len(self.attempts)} attempt(s)"
            ) from None
        finally:
            with self._lock:
                self._waiters.remove(waiter)

    def _notify(self) -> None:
        """Called with the lock held, from the server's thread."""
        for loop, event in self._waiters:
            loop.call_soon_threadsafe(event.set)

    # -- aiosmtpd handler hooks (run in the controller's thread) ----------------------------

    def _scripted(self, stage: Stage, mail_from: str) -> str | None:
        with self._lock:
            if self._failures and self._failures[0][0] == stage:
                _, code, text = self._failures.pop(0)
                self.attempts.append(Attempt(stage, code, _null(mail_from)))
                self._notify()
                return f"{code} {text}"
        return None

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        if self.user is not None and not session.authenticated:
            return self._refuse("MAIL", 530, "5.7.0 Authentication required", address)
        if self.refuse_null_sender and _null(address) == "":
            return self._refuse("MAIL", 553, "5.1.7 The null sender is not accepted", address)
        if (answer := self._scripted("MAIL", address)) is not None:
            return answer
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if (answer := self._scripted("RCPT", envelope.mail_from)) is not None:
            return answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if (answer := self._scripted("DATA", envelope.mail_from)) is not None:
            return answer
        auth = session.auth_data
        mail = ReceivedMail(
            mail_from=_null(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=bytes(envelope.original_content or envelope.content),
            mail_options=tuple(envelope.mail_options),
            login=auth.login.decode() if isinstance(auth, LoginPassword) else None,
            tls=self.mode == "ssl" or session.ssl is not None,
        )
        with self._lock:
            self.attempts.append(Attempt("DATA", 250, _null(envelope.mail_from)))
            self.messages.append(mail)
            self._notify()
        return "250 Message accepted"

    def _refuse(self, stage: Stage, code: int, text: str, mail_from: str) -> str:
        with self._lock:
            self.attempts.append(Attempt(stage, code, _null(mail_from)))
            self._notify()
        return f"{code} {text}"

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.user is not None
            and self.password is not None
            and auth_data.login == self.user.encode()
            and auth_data.password == self.password.encode()
        )
        if not ok:
            self._refuse("AUTH", 535, "", "")
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    # -- server -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving (on the same port after a ``stop()``)."""
        if self._controller is not None:
            return
        params: dict[str, Any] = {"enable_SMTPUTF8": self.smtputf8}
        if self.mode == "start_tls":
            params.update(tls_context=tls.server_ssl_context(), require_starttls=True)
        if self.user is not None:
            params["authenticator"] = self._authenticate
            # aiosmtpd only counts STARTTLS as TLS; on an implicit TLS port AUTH is safe anyway.
            params["auth_require_tls"] = self.mode != "ssl"
        controller = Controller(
            self,
            hostname=self.host,
            port=self.port,
            ssl_context=tls.server_ssl_context() if self.mode == "ssl" else None,
            ready_timeout=10.0,
            **params,
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Stop serving; connections are refused until ``start()``."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> SmtpServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
