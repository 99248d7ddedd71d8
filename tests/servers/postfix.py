"""A private Postfix instance for the tests: Debian's postfix binaries, a config and a queue of
its own in a temp directory, SMTP on a loopback port, never the system's service.

``Postfix(lines)`` writes a main.cf of the settings a private instance needs plus ``lines`` (a
recipe's), and a master.cf with every service unchrooted; ``start()`` runs ``postfix -c DIR
start`` as root (the daemons run as the ``postfix`` user the package created). ``queue()`` is
``postqueue -j`` (one JSON object per queued message), ``flush()`` is ``postqueue -f``. The log
goes to ``maillog`` in the directory (postlogd), which a failure shows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.servers.dovecot import free_port

POSTFIX = "/usr/sbin/postfix"
POSTQUEUE = "/usr/sbin/postqueue"
STEP_TIMEOUT_S = 30.0

MASTER_CF = """\
{smtp} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
lmtp      unix  - - n -     - lmtp
smtp      unix  - - n -     - smtp
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class Postfix:
    """One private Postfix: ``smtp_port`` takes mail on 127.0.0.1."""

    def __init__(self, lines: str) -> None:
        # Not under pytest's tmp_path: the daemons run as `postfix` and must reach the queue.
        self.root = Path(tempfile.mkdtemp(prefix="mailroom-postfix-"))
        self.root.chmod(0o755)
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.maillog = self.root / "maillog"
        self.smtp_port = free_port()
        self.lines = lines
        self.started = False

    def main_cf(self) -> str:
        return f"""\
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {self.maillog}
maillog_file_prefixes = {self.root}
myhostname = mta.test.example
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
alias_maps =
alias_database =
biff = no
{self.lines}
"""

    def start(self) -> None:
        for path in (self.config_dir, self.queue_dir, self.data_dir):
            path.mkdir()
        shutil.chown(self.data_dir, "postfix")
        (self.config_dir / "main.cf").write_text(self.main_cf())
        (self.config_dir / "master.cf").write_text(
            MASTER_CF.format(smtp=f"127.0.0.1:{self.smtp_port}")
        )
        self._run(POSTFIX, "-c", str(self.config_dir), "start")
        self.started = True
        self._wait(lambda: self._master_pid() is not None, "the master process")

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), "stop"], check=False, capture_output=True
        )
        try:
            self._wait(lambda: self._master_pid() is None, "the master to exit")
        except AssertionError:
            subprocess.run(
                [POSTFIX, "-c", str(self.config_dir), "abort"], check=False, capture_output=True
            )

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def queue(self) -> list[dict[str, Any]]:
        """``postqueue -j``: the messages in the queue (recipients, delay reasons)."""
        out = self._run(POSTQUEUE, "-c", str(self.config_dir), "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        """``postqueue -f``: deliver the deferred mail now."""
        self._run(POSTQUEUE, "-c", str(self.config_dir), "-f")

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def _master_pid(self) -> int | None:
        pid_file = self.queue_dir / "pid" / "master.pid"
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            args, check=False, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
        )
        if done.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({done.returncode}): {done.stderr}\n{self.log()}"
            )
        return done.stdout

    def _wait(self, check: Any, what: str) -> None:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.05)
        raise AssertionError(f"Postfix: timed out waiting for {what}\n{self.log()}")

    def __enter__(self) -> Postfix:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
