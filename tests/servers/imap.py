"""What every private IMAP server of the tests shares (Dovecot, Cyrus, Courier): two loopback
ports (plain with STARTTLS, implicit TLS), a temp directory of its own with a CA of the test's,
process control, and stdlib-imaplib helpers that check server state independently of the code
under test.

A subclass says how to start its server (``_command``), how to add a user (``add_user``) and
what its folders look like (``delimiter``, ``personal``): ``folder("Failed/Mailroom")`` is
``Failed/Mailroom`` on Dovecot and ``INBOX.Failed.Mailroom`` on Cyrus and Courier.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import imaplib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

from tests.servers import tls

# Where `make test` unpacks the Debian packages of Cyrus and Courier (see the Makefile).
PACKAGES = Path(
    os.environ.get(
        "MAILROOM_TEST_IMAP_SERVERS",
        Path(__file__).resolve().parents[2] / ".venv" / "imap-servers" / "root",
    )
)
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
APPEND_BATCH_BYTES = 8 * 1024 * 1024  # append_many: at most this much per MULTIAPPEND command
_LINE_END = re.compile(rb"\r\n|\r|\n")
_USER_NAME = re.compile(r"[A-Za-z0-9._@+-]+")


@dataclass(frozen=True)
class Account:
    """An IMAP login on a test server."""

    user: str
    password: str


@dataclass(frozen=True)
class Stored:
    """A message as stored on the server (flags without the session-local \\Recent)."""

    uid: int
    flags: frozenset[str]
    raw: bytes


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def quote_mailbox(name: str) -> str:
    """A mailbox name as an IMAP quoted string, non-ASCII in modified UTF-7 (RFC 3501)."""
    encoded = re.sub(r"&|[^\x20-\x7e]+", _mutf7_chunk, name)
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mutf7_chunk(match: re.Match[str]) -> str:
    text = match.group()
    if text == "&":
        return "&-"
    b64 = base64.b64encode(text.encode("utf-16-be")).decode().rstrip("=")
    return "&" + b64.replace("/", ",") + "-"


def decode_mailbox(name: str) -> str:
    """Decode a modified UTF-7 mailbox name."""

    def chunk(match: re.Match[str]) -> str:
        b64 = match.group(1)
        if not b64:
            return "&"
        b64 = b64.replace(",", "/") + "=" * (-len(b64) % 4)
        return base64.b64decode(b64).decode("utf-16-be")

    return re.sub(r"&([^-]*)-", chunk, name)


def new_user_name(prefix: str, counter: Iterator[int]) -> str:
    return f"{prefix}{next(counter)}-{secrets.token_hex(3)}"


def check_user_name(user: str, taken: Iterable[str]) -> None:
    if user in taken or not _USER_NAME.fullmatch(user):
        raise ValueError(f"bad or duplicate user name: {user!r}")


def _check(typ: str, data: Sequence[object], what: str) -> None:
    if typ != "OK":
        raise RuntimeError(f"IMAP {what} failed: {typ} {data!r}")


class ImapServer:
    """A private IMAP server on two free 127.0.0.1 ports (plain+STARTTLS, implicit TLS).

    ``start()`` / ``stop()`` / ``restart()`` / ``kill()``; usable as a context manager (which
    also removes the temp directory).
    """

    host = "127.0.0.1"
    name: ClassVar[str]
    delimiter: ClassVar[str] = "/"
    personal: ClassVar[str] = ""  # the personal namespace's prefix (RFC 2342)

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"mailroom-{self.name}-"))
        self.root.chmod(0o755)  # the mail user (nobody) must traverse it
        self.port = free_port()
        self.tls_port = free_port()
        while self.tls_port == self.port:
            self.tls_port = free_port()
        self.ca_file = tls.write_ca(self.root)
        self._proc: subprocess.Popen[bytes] | None = None
        self._accounts: dict[str, Account] = {}

    # -- what a subclass says ------------------------------------------------------------------

    def _command(self) -> list[str]:
        """The server's command line (run in a session of its own, in ``root``)."""
        raise NotImplementedError

    def missing(self) -> str | None:
        """What is not installed, or None."""
        return None

    def add_user(self, name: str | None = None, password: str | None = None) -> Account:
        """A new user with an empty INBOX, able to log in at once."""
        raise NotImplementedError

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's log files, for error messages."""
        out: list[str] = []
        for path in self._logs():
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(out) or f"(no {self.name} log)"

    def _logs(self) -> list[Path]:
        return [self.root / "stdout.log"]

    def _stopped(self, pid: int) -> None:
        """After the process group ``pid`` is gone: end what it left behind (Courier's FAM)."""

    # -- process control -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The server's main pid while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server; return once both ports answer with an IMAP greeting."""
        if self.running:
            return
        if (missing := self.missing()) is not None:
            raise RuntimeError(f"{missing} not found: `make test` installs it")
        with open(self.root / "stdout.log", "ab") as out:
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: kill() takes the children too
            )
        deadline = time.monotonic() + timeout
        pending = {self.port: False, self.tls_port: True}
        last_error: Exception | None = None
        for _ in range(10_000):
            if not pending:
                return
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"{self.name} exited during startup\n{self.log_tail()}")
            if time.monotonic() > deadline:
                break
            for port, implicit_tls in list(pending.items()):
                try:
                    self._probe(port, implicit_tls)
                    del pending[port]
                except (OSError, RuntimeError) as exc:
                    last_error = exc
            if pending:
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(
            f"{self.name} did not greet on ports {sorted(pending)} within {timeout} s "
            f"(last error: {last_error!r})\n{self.log_tail()}"
        )

    def _probe(self, port: int, implicit_tls: bool) -> None:
        with socket.create_connection((self.host, port), timeout=2.0) as raw:
            if implicit_tls:
                ctx = tls.client_ssl_context()
                with ctx.wrap_socket(raw, server_hostname=self.host) as sock:
                    greeting = sock.recv(200)
            else:
                greeting = raw.recv(200)
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"unexpected greeting on {port}: {greeting!r}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM and wait (SIGKILL after ``timeout``). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._killpg(proc.pid)
                proc.wait(timeout)
        self._killpg(proc.pid)  # any straggling child still holding a port
        self._stopped(proc.pid)

    def kill(self) -> None:
        """SIGKILL the server and all its children at once (a crash). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._killpg(proc.pid)
        proc.wait(STOP_TIMEOUT)
        self._stopped(proc.pid)

    @staticmethod
    def _killpg(pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again: same ports, same accounts and mail."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Kill it and remove the temp directory (as RedisServer does): nothing of a throwaway
        instance needs the graceful stop, which takes Dovecot a second."""
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- folders ---------------------------------------------------------------------------------

    def folder(self, name: str) -> str:
        """The server's name of the folder ``name`` (levels separated by "/", under the
        personal namespace): what a user who writes ``failed_folder: name`` means."""
        levels = name.split("/")
        if levels[0].upper() == "INBOX":
            return self.delimiter.join(["INBOX", *levels[1:]])
        return self.personal + self.delimiter.join(levels)

    # -- imaplib helpers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def imap(self, account: Account, *, implicit_tls: bool = False) -> Iterator[imaplib.IMAP4]:
        """A logged-in imaplib connection (plain port, or the TLS port); a password that is not
        ASCII logs in with AUTHENTICATE PLAIN (imaplib's LOGIN would quote it)."""
        conn: imaplib.IMAP4
        if implicit_tls:
            ctx = tls.client_ssl_context()
            conn = imaplib.IMAP4_SSL(self.host, self.tls_port, ssl_context=ctx, timeout=10)
        else:
            conn = imaplib.IMAP4(self.host, self.port, timeout=10)
        try:
            if account.password.isascii():
                conn.login(account.user, account.password)
            else:
                plain = f"\0{account.user}\0{account.password}".encode()
                conn.authenticate("PLAIN", lambda _: plain)
            yield conn
        finally:
            try:
                conn.logout()  # also closes the socket
            except (imaplib.IMAP4.error, OSError):
                with contextlib.suppress(OSError):
                    conn.shutdown()

    def append(
        self,
        account: Account,
        raw: bytes,
        mailbox: str = "INBOX",
        flags: str | None = None,
        date: str | None = None,
    ) -> int:
        """APPEND one message (``date``: an INTERNALDATE, ``"01-Feb-2026 10:00:00 +0000"``);
        return its UID (from APPENDUID). Bare LF becomes CRLF."""
        with self.imap(account) as conn:
            typ, data = conn.append(
                quote_mailbox(mailbox), flags, f'"{date}"' if date else None, raw
            )
            _check(typ, data, "APPEND")
            return _appenduids(data)[0]

    def append_many(
        self, account: Account, raws: Iterable[bytes], mailbox: str = "INBOX"
    ) -> list[int]:
        """APPEND many messages over one connection: with MULTIAPPEND and LITERAL+ one command
        per batch, else one APPEND each; their UIDs."""
        uids: list[int] = []
        batch: list[bytes] = []
        size = 0
        with self.imap(account) as conn:
            if not {"MULTIAPPEND", "LITERAL+"} <= set(conn.capabilities):
                for raw in raws:
                    typ, data = conn.append(quote_mailbox(mailbox), None, None, raw)
                    _check(typ, data, "APPEND")
                    uids += _appenduids(data)
                return uids
            for raw in raws:
                batch.append(_LINE_END.sub(b"\r\n", raw))  # as imaplib.append does
                size += len(raw)
                if size >= APPEND_BATCH_BYTES:
                    uids += _multiappend(conn, quote_mailbox(mailbox), batch)
                    batch, size = [], 0
            if batch:
                uids += _multiappend(conn, quote_mailbox(mailbox), batch)
        return uids

    def messages(self, account: Account, mailbox: str = "INBOX") -> list[Stored]:
        """All messages with UID, flags and raw bytes (EXAMINE + BODY.PEEK: changes nothing)."""
        with self.imap(account) as conn:
            typ, data = conn.select(quote_mailbox(mailbox), readonly=True)
            _check(typ, data, "EXAMINE")
            if data[0] in (b"0", None):
                return []
            typ, fetched = conn.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[])")
            _check(typ, fetched, "FETCH")
        return _parse_fetch(fetched)

    def uidvalidity(self, account: Account, mailbox: str = "INBOX") -> int:
        """The mailbox's UIDVALIDITY (STATUS: selects nothing)."""
        with self.imap(account) as conn:
            typ, data = conn.status(quote_mailbox(mailbox), "(UIDVALIDITY)")
            _check(typ, data, "STATUS")
        match = re.search(rb"UIDVALIDITY (\d+)", data[0] if isinstance(data[0], bytes) else b"")
        if match is None:
            raise RuntimeError(f"no UIDVALIDITY in {data!r}")
        return int(match.group(1))

    def mailboxes(self, account: Account) -> list[str]:
        """Names of all mailboxes (decoded), as the server spells them."""
        with self.imap(account) as conn:
            typ, data = conn.list()
            _check(typ, data, "LIST")
        names = []
        for line in data:
            if not isinstance(line, bytes):
                continue
            match = re.match(rb'\([^)]*\) (?:"(?:[^"\\]|\\.)*"|NIL) (.+)$', line)
            if match:
                name = match.group(1).decode()
                if name.startswith('"'):
                    name = re.sub(r"\\(.)", r"\1", name[1:-1])
                names.append(decode_mailbox(name))
        return names

    def create_mailbox(self, account: Account, name: str) -> None:
        """CREATE a mailbox (as the server spells it)."""
        with self.imap(account) as conn:
            typ, data = conn.create(quote_mailbox(name))
            _check(typ, data, "CREATE")

    async def aappend(
        self, account: Account, raw: bytes, mailbox: str = "INBOX", flags: str | None = None
    ) -> int:
        """``append`` in a worker thread (does not block the event loop)."""
        return await asyncio.to_thread(self.append, account, raw, mailbox, flags)

    async def aappend_many(
        self, account: Account, raws: Iterable[bytes], mailbox: str = "INBOX"
    ) -> list[int]:
        """``append_many`` in a worker thread."""
        return await asyncio.to_thread(self.append_many, account, list(raws), mailbox)

    async def amessages(self, account: Account, mailbox: str = "INBOX") -> list[Stored]:
        """``messages`` in a worker thread."""
        return await asyncio.to_thread(self.messages, account, mailbox)

    async def aflags(self, account: Account, mailbox: str = "INBOX") -> list[frozenset[str]]:
        """The flags of every message in ``mailbox`` (none when it does not exist yet)."""

        def flags() -> list[frozenset[str]]:
            if mailbox != "INBOX" and mailbox not in self.mailboxes(account):
                return []
            return [m.flags for m in self.messages(account, mailbox)]

        return await asyncio.to_thread(flags)


def _appenduids(data: Sequence[object]) -> list[int]:
    text = b" ".join(d for d in data if isinstance(d, bytes)).decode(errors="replace")
    match = re.search(r"\[APPENDUID \d+ ([0-9:,]+)\]", text)
    if not match:
        raise RuntimeError(f"no APPENDUID in {data!r}")
    return _uid_set(match.group(1))


def _uid_set(text: str) -> list[int]:
    uids: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition(":")
        uids.extend(range(int(low), int(high or low) + 1))
    return uids


def _multiappend(conn: imaplib.IMAP4, mailbox: str, raws: list[bytes]) -> list[int]:
    """One MULTIAPPEND command with non-synchronizing literals: no round trip per message."""
    tag = b"MR" + secrets.token_hex(4).encode()
    parts = [tag + b" APPEND " + mailbox.encode()]
    for raw in raws:
        parts.append(b" {%d+}\r\n" % len(raw) + raw)
    conn.send(b"".join(parts) + b"\r\n")
    for _ in range(100_000):  # bounded; the server answers with a few untagged lines at most
        line = conn.readline()
        if not line:
            raise RuntimeError("connection closed during APPEND")
        if line.startswith(tag + b" "):
            if not line.startswith(tag + b" OK"):
                raise RuntimeError(f"APPEND failed: {line!r}")
            uids = _appenduids([line])
            if len(uids) != len(raws):
                raise RuntimeError(f"APPENDUID for {len(uids)} of {len(raws)} messages")
            return uids
    raise RuntimeError("no tagged APPEND response")


def _parse_fetch(data: Sequence[Any]) -> list[Stored]:
    """imaplib's FETCH result: (b'n (UID u FLAGS (...) BODY[] {k}', raw) then b')' items."""
    entries: list[tuple[bytes, bytes]] = []
    for item in data:
        if isinstance(item, tuple):
            entries.append((bytes(item[0]), bytes(item[1])))
        elif isinstance(item, bytes) and entries:
            meta, raw = entries[-1]
            entries[-1] = (meta + b" " + item, raw)  # FLAGS may come after the literal
    out = []
    for meta, raw in entries:
        uid = re.search(rb"UID (\d+)", meta)
        flags = re.search(rb"FLAGS \(([^)]*)\)", meta)
        if uid is None or flags is None:
            raise RuntimeError(f"unparsable FETCH response: {meta!r}")
        names = frozenset(flags.group(1).decode().split()) - {"\\Recent"}
        out.append(Stored(uid=int(uid.group(1)), flags=names, raw=raw))
    return sorted(out, key=lambda s: s.uid)
