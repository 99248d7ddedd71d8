"""A private Courier-IMAP 5.0 for the tests, from Debian's packages unpacked by ``make test``.

Debian's courier-imap conflicts with dovecot-imapd (both provide imap-server), so it is never
installed: the Makefile unpacks it (with courier-base, courier-authlib, courier-authdaemon and
courier-authlib-userdb) into ``.venv/imap-servers/root``. Courier's programs find each other
and their configuration at compiled-in paths (``/usr/lib/courier``, ``/etc/courier``,
``/run/courier/authdaemon``), so the instance runs in a private mount namespace of its own
(``unshare -m``: the tests run as root): the unpacked ``/usr`` and ``/etc`` are overlaid on the
machine's, the instance's ``etc`` directory is bound on ``/etc/courier`` and ``/run`` is a fresh
tmpfs. Nothing outside the namespace sees any of it.

Inside: ``authdaemond`` with the userdb module (users in the instance's ``userdb.dat``, written
with Courier's own ``makedatprog``), and two ``couriertcpd``: the plain port (STARTTLS) and the
implicit-TLS port (``couriertls``). Stock Debian settings but for ``push``: Courier pushes new
mail during IDLE only with ``IMAP_ENHANCEDIDLE=1`` (FAM, through gamin); with ``push=False``
(Debian's default, ``IMAP_ENHANCEDIDLE=0``) it looks for new mail every ``IMAP_IDLE_TIMEOUT``
(here 600 s: never, in a test). Folders are under ``INBOX.``, with ``.`` as the separator.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import pwd
import secrets
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from tests.servers import tls
from tests.servers.imap import PACKAGES, Account, ImapServer, check_user_name, new_user_name

__all__ = ["Courier"]

MAIL_USER = "nobody"  # every user's mail is owned by this uid (userdb uid=, gid=)
NO_PUSH_POLL_S = 600
# Debian's /etc/courier/imapd, without AUTH=CRAM-* (userdb keeps hashed passwords only).
CAPABILITY = (
    "IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT THREAD=REFERENCES SORT QUOTA IDLE"
)
_MAKEDAT = PACKAGES / "usr/lib/courier/courier-authlib/makedatprog"
_IMAPD = PACKAGES / "usr/bin/imapd"

# Run by `unshare -m` as the instance's main process: $1 the unpacked packages, $2 the
# instance's etc directory, $3 and $4 the ports.
_SCRIPT = """\
set -e
mount -t overlay mailroom-courier -o "lowerdir=$1/usr:/usr" /usr
mount -t overlay mailroom-courier -o "lowerdir=$1/etc:/etc" /etc
mount --bind "$2" /etc/courier
mount --bind "$2/passwd" /etc/passwd
mount --bind "$2/group" /etc/group
mount -t tmpfs -o mode=0755 mailroom-courier /run
mkdir -p /run/courier/authdaemon
/usr/lib/courier/courier-authlib/authdaemond &
tcpd="/usr/sbin/couriertcpd -address=127.0.0.1 -nodnslookup -noidentlookup -maxprocs=1000 \
-maxperip=1000"
imap="/usr/lib/courier/courier/imaplogin /usr/bin/imapd Maildir"
$tcpd "$3" $imap &
IMAP_TLS=1 $tcpd "$4" /usr/bin/couriertls -server -tcpd $imap &
wait
"""

_AUTHDAEMONRC = """\
authmodulelist="authuserdb"
daemons=2
authdaemonvar=/run/courier/authdaemon
DEBUG_LOGIN=0
DEFAULTOPTIONS=""
LOGGEROPTS=""
"""


class Courier(ImapServer):
    """A private Courier-IMAP (authdaemond, couriertcpd, imapd) in a mount namespace."""

    name = "courier"
    delimiter = "."
    personal = "INBOX."

    def __init__(
        self, *, push: bool = True, capability: str = CAPABILITY, env: dict[str, str] | None = None
    ) -> None:
        super().__init__()
        self.push = push
        self.etc = self.root / "etc"
        self.etc.mkdir()
        (self.root / "home").mkdir(mode=0o755)
        self._counter = itertools.count(1)
        self._deliveries = itertools.count(1)
        self._userdb: dict[str, str] = {}  # user → fields (userdb.dat)
        self._shadow: dict[str, str] = {}  # user → password fields (userdbshadow.dat)
        self._namespace: str | None = None
        mail = pwd.getpwnam(MAIL_USER)
        self._mail_ids = (mail.pw_uid, mail.pw_gid)
        certs = tls.write_server_cert(self.root)
        pem = self.etc / "imapd.pem"  # Courier wants key and certificate in one file
        pem.write_bytes(certs.key.read_bytes() + certs.cert.read_bytes())
        pem.chmod(0o600)
        os.chown(pem, *self._mail_ids)  # STARTTLS's couriertls runs as "courier" (below)
        (self.etc / "authdaemonrc").write_text(_AUTHDAEMONRC)
        # imaplogin runs couriertls for STARTTLS as the user "courier" (compiled in): the
        # namespace's /etc/passwd and /etc/group have it, as nobody's ids.
        uid, gid = self._mail_ids
        passwd = Path("/etc/passwd").read_text()
        (self.etc / "passwd").write_text(
            f"{passwd}courier:x:{uid}:{gid}::/nonexistent:/bin/false\n"
        )
        (self.etc / "group").write_text(f"{Path('/etc/group').read_text()}courier:x:{gid}:\n")
        self._write_userdb()
        self._env = {
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "IMAP_CAPABILITY": capability,
            "IMAP_CAPABILITY_TLS": f"{capability} AUTH=PLAIN",
            "IMAP_KEYWORDS": "1",
            "IMAP_ACL": "1",
            "IMAP_ENHANCEDIDLE": "1" if push else "0",
            "IMAP_IDLE_TIMEOUT": "60" if push else str(NO_PUSH_POLL_S),
            "IMAP_STARTTLS": "YES",
            "IMAP_TLS_REQUIRED": "0",
            "IMAP_USELOCKS": "1",
            "IMAP_UMASK": "022",
            "IMAP_MAILBOX_SANITY_CHECK": "1",
            "IMAP_TRASHFOLDERNAME": "Trash",
            "IMAP_EMPTYTRASH": "",
            "COURIERTLS": "/usr/bin/couriertls",
            "TLS_CERTFILE": "/etc/courier/imapd.pem",
            "TLS_VERIFYPEER": "NONE",
            "MAILDIRPATH": "Maildir",
            # FAM (gamin) serves each GAM_CLIENT_ID with a server of its own: instances, each
            # in its own namespace, never share one.
            "GAM_CLIENT_ID": f"mailroom-courier-{self.port}",
            **(env or {}),
        }

    def missing(self) -> str | None:
        return None if _IMAPD.exists() else str(_IMAPD)

    def _command(self) -> list[str]:
        return [
            "env",
            "-i",
            *(f"{key}={value}" for key, value in self._env.items()),
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _SCRIPT,
            "courier",
            str(PACKAGES),
            str(self.etc),
            str(self.port),
            str(self.tls_port),
        ]

    def start(self, timeout: float = 15.0) -> None:
        super().start(timeout)
        if self._proc is not None:
            self._namespace = os.readlink(f"/proc/{self._proc.pid}/ns/mnt")

    def _stopped(self, pid: int) -> None:
        """End every process left in this instance's mount namespace (gamin's FAM server
        detaches from the process group): all of them were started by this instance."""
        namespace, self._namespace = self._namespace, None
        if namespace is None:
            return
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry.name}/ns/mnt") == namespace:
                    os.kill(int(entry.name), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue

    def add_user(self, name: str | None = None, password: str | None = None) -> Account:
        user = name or new_user_name("user", self._counter)
        check_user_name(user, self._accounts)
        account = Account(user=user, password=password or secrets.token_urlsafe(12))
        home = self.root / "home" / user
        for sub in ("", "Maildir", "Maildir/cur", "Maildir/new", "Maildir/tmp"):
            (home / sub).mkdir(mode=0o700)
            os.chown(home / sub, *self._mail_ids)
        digest = base64.b64encode(hashlib.sha1(account.password.encode()).digest()).decode()
        uid, gid = self._mail_ids
        # makeuserdb adds "_=" (the userdb file's location) to the fields that are not
        # passwords, and puts those (*pw=) into userdbshadow.dat.
        self._userdb[user] = f"uid={uid}|gid={gid}|home={home}|mail={home}/Maildir|_="
        self._shadow[user] = f"systempw={{SHA}}{digest}"
        self._accounts[user] = account
        self._write_userdb()
        return account

    def append_many(
        self, account: Account, raws: Iterable[bytes], mailbox: str = "INBOX"
    ) -> list[int]:
        """Many messages into INBOX at once, as an MTA delivers them: files in Maildir/new
        (Courier has no MULTIAPPEND: one APPEND each would take a round trip each); their
        UIDs, which Courier gives them on the next look."""
        if mailbox != "INBOX":
            return super().append_many(account, raws, mailbox)
        maildir = self.root / "home" / account.user / "Maildir"
        count = 0
        for raw in raws:
            name = f"{time.time_ns()}.M{next(self._deliveries)}P{os.getpid()}.mailroom-test"
            tmp = maildir / "tmp" / name
            tmp.write_bytes(raw.replace(b"\r\n", b"\n"))  # a Maildir holds LF lines
            os.chown(tmp, *self._mail_ids)
            tmp.rename(maildir / "new" / name)
            count += 1
        with self.imap(account) as conn:
            conn.select("INBOX")
            typ, data = conn.uid("SEARCH", "ALL")
            if typ != "OK":
                raise RuntimeError(f"UID SEARCH failed: {data!r}")
        uids = [int(uid) for uid in (data[0] or b"").split()]
        return uids[len(uids) - count :]

    def _write_userdb(self) -> None:
        """userdb.dat and userdbshadow.dat, as ``makeuserdb`` makes them (atomically)."""
        for name, entries in (("userdb", self._userdb), ("userdbshadow", self._shadow)):
            lines = "".join(f"{user}\t{fields}\n" for user, fields in entries.items())
            subprocess.run(
                [str(_MAKEDAT), "-", str(self.etc / f"{name}.tmp"), str(self.etc / f"{name}.dat")],
                input=(lines + ".\n").encode(),
                check=True,
                capture_output=True,
                timeout=30,
            )
