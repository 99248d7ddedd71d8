"""A private Exim for the tests: Debian's exim4 binary taken out of its package (it conflicts
with postfix, which the tests install), a config, spool and log of its own in a temp directory,
SMTP on a loopback port.

``Exim(routers, transports)`` writes a config of what a private instance needs plus a recipe's
router and transport (the blocks of examples/lmtp/exim-*.conf), and a last router that drops
everything else (the bounces Exim would make). ``start()`` runs the daemon (``-bd``), as root:
with an untrusted ``-C`` file Exim drops to the ``Debian-exim`` user it is built for (``make
exim`` creates that user). ``queue()`` is ``exim -bp``, ``flush()`` is ``exim -qff``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.helpers import ROOT
from tests.servers.dovecot import free_port

EXIM = ROOT / ".venv" / "exim" / "usr" / "sbin" / "exim4"
USER = "Debian-exim"
STEP_TIMEOUT_S = 30.0


class Exim:
    """One private Exim: ``smtp_port`` takes mail on 127.0.0.1."""

    def __init__(self, routers: str, transports: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mailroom-exim-"))
        self.root.chmod(0o755)
        self.config = self.root / "exim.conf"
        self.mainlog = self.root / "log" / "mainlog"
        self.smtp_port = free_port()
        self.routers = routers
        self.transports = transports
        self.pid: int | None = None

    def text(self) -> str:
        return f"""\
exim_path = {EXIM}
primary_hostname = mta.test.example
spool_directory = {self.root}/spool
log_file_path = {self.root}/log/%slog
pid_file_path = {self.root}/exim.pid
daemon_smtp_ports = {self.smtp_port}
local_interfaces = 127.0.0.1
keep_environment =
tls_advertise_hosts =
never_users =
domainlist relay_to_domains = incoming.example.com
acl_smtp_rcpt = acl_check_rcpt

begin acl
acl_check_rcpt:
  accept domains = +relay_to_domains
  deny message = relay not permitted

begin routers
{self.routers}
drop_the_rest:
  driver = redirect
  data = :blackhole:

begin transports
{self.transports}

begin retry
* * F,1h,1m
"""

    def start(self) -> None:
        for name in ("spool", "log"):
            (self.root / name).mkdir()
            shutil.chown(self.root / name, USER, USER)
        self.config.write_text(self.text())
        self._run("-bd")
        deadline = time.monotonic() + STEP_TIMEOUT_S
        pid_file = self.root / "exim.pid"
        while time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text().strip():
                self.pid = int(pid_file.read_text().split()[0])
                return
            time.sleep(0.05)
        raise AssertionError(f"Exim did not start\n{self.log()}")

    def queue(self) -> str:
        """``exim -bp``: the queued messages, with their recipients."""
        return self._run("-bp")

    def flush(self) -> None:
        """``exim -qff``: a queue run that tries every message now, frozen ones too."""
        self._run("-qff")

    def log(self) -> str:
        return self.mainlog.read_text(errors="replace") if self.mainlog.exists() else ""

    def close(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            [str(EXIM), "-C", str(self.config), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT_S,
        )
        if done.returncode != 0:
            raise AssertionError(f"exim {' '.join(args)} failed: {done.stderr}\n{self.log()}")
        return done.stdout

    def __enter__(self) -> Exim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
