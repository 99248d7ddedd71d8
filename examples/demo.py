"""``make demo``: mailroom end to end on this machine, with nothing to configure.

Starts a throwaway Dovecot on 127.0.0.1 (its own config in a temp dir), the example webhook
receiver, and ``python -m mailroom -c examples/demo.yml``; appends a sample message and the
receiver prints it. Press Enter to send another; Ctrl-C, SIGTERM or SIGHUP stops everything it
started and removes the temp dir.

``--serve`` starts only Dovecot and the receiver, puts three unseen messages in the INBOX (one
for the application, one for a person, one auto-reply) and writes a ready config for them
(``mailroom-demo.yml``): a target for a first config of your own, for ``mailroom check`` and
``mailroom route`` before any real mailbox. ``--once`` stops by itself after the first message
arrived (used by the tests).
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers.dovecot import Account, Dovecot, free_port  # noqa: E402

SAMPLE = (
    "From: Ada Lovelace <ada@sender.example>\r\n"
    "To: {to}\r\n"
    "Subject: {subject} ({n})\r\n"
    "Message-ID: <demo-{n}-{stamp}@sender.example>\r\n"
    "Date: {date}\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "{extra}"
    "\r\n"
    "This message was appended to the demo Dovecot by examples/demo.py.\r\n"
)
START_TIMEOUT_S = 15.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
CONFIG = """\
# Written by examples/demo.py --serve for its throwaway Dovecot and receiver; it stops working
# when the demo stops (the CA file and the account go with it). Edit it as you like.
mailboxes:
  - id: demo
    address: "incoming+%{{key}}@demo.example"
    host: 127.0.0.1
    port: {port}
    ssl: true
    ca_file: {ca_file}             # the demo's own CA
    user: {user}
    password: "{password}"
    delete_after_delivery: false   # delivered mail stays in the INBOX, marked \\Seen
webhook:
  url: {url}
  signing_secret: "{secret}"      # the receiver checks the signature
log: {{format: text}}
"""


class Stop(Exception):
    """A stop signal arrived: unwind, so that every ``finally`` cleans up."""


def _stop(signum: int, frame: FrameType | None) -> None:
    for sig in STOP_SIGNALS:  # the cleanup below must not be cut short by a second signal
        signal.signal(sig, signal.SIG_IGN)
    raise Stop(signal.Signals(signum).name)


def sample(
    n: int, *, to: str = "Support <incoming+ticket-42@demo.example>", **fields: str
) -> bytes:
    return SAMPLE.format(
        to=to,
        subject=fields.get("subject", "Hello from the mailroom demo"),
        extra=fields.get("extra", ""),
        n=n,
        stamp=time.time_ns(),
        date=time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime()),
    ).encode()


def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: {proc.args!r} exited early")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"demo: nothing listens on port {port} after {START_TIMEOUT_S:g}s")


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--once", action="store_true", help="stop after the first delivery")
    modes.add_argument(
        "--serve",
        action="store_true",
        help="run only Dovecot and the receiver, and write a config for them",
    )
    parser.add_argument(
        "--config",
        default="mailroom-demo.yml",
        help="with --serve: where to write the config (default: %(default)s)",
    )
    args = parser.parse_args()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)

    started: list[subprocess.Popen[bytes]] = []
    dovecot = Dovecot()
    try:
        dovecot.start()
        account = dovecot.add_user("demo")
        say(
            f"Dovecot (pid {dovecot.pid}) on 127.0.0.1:{dovecot.tls_port}, user "
            f"{account.user}; its files in {dovecot.root}"
        )
        run(args, dovecot, account, started)
    except Stop as exc:
        print(f"\ndemo: {exc}: stopping everything it started", flush=True)
    finally:
        stop(started)
        dovecot.close()
    return 0


def run(
    args: argparse.Namespace,
    dovecot: Dovecot,
    account: Account,
    started: list[subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/incoming"
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DEMO_IMAP_PORT": str(dovecot.tls_port),
        "DEMO_CA_FILE": str(dovecot.ca_file),
        "DEMO_IMAP_USER": account.user,
        "DEMO_IMAP_PASSWORD": account.password,
        "DEMO_WEBHOOK_URL": url,
        "DEMO_WEBHOOK_SECRET": secret,
    }
    receiver_args = [str(ROOT / "examples" / "receiver.py"), "--port", str(port)]
    receiver = subprocess.Popen(
        [sys.executable, *receiver_args, "--secret", secret, *(["--once"] if args.once else [])],
        env=env,
    )
    started.append(receiver)
    wait_for_port(port, receiver)
    say(f"receiver (pid {receiver.pid}) on http://127.0.0.1:{port}/")
    if args.serve:
        serve(args.config, dovecot, account, url, secret)
    else:
        mailroom = subprocess.Popen(
            [sys.executable, "-m", "mailroom", "-c", str(ROOT / "examples" / "demo.yml")],
            env=env,
        )
        started.append(mailroom)
        say(f"mailroom (pid {mailroom.pid}) watching the INBOX")
        dovecot.append(account, sample(1))
        say("appended a sample message")
        if args.once:
            receiver.wait(START_TIMEOUT_S * 2)
            return
    say("press Enter to append another message; Ctrl-C to stop everything")
    for n in range(2, 10_000):
        if not sys.stdin.readline():  # no terminal: wait for a signal
            signal.pause()
        dovecot.append(account, sample(n))
        say(f"appended message {n}")


def serve(config: str, dovecot: Dovecot, account: Account, url: str, secret: str) -> None:
    """Seed the INBOX and write a config for it (mode 0600: it holds the password)."""
    dovecot.append(account, sample(1))
    dovecot.append(account, sample(2, to="Ada <ada@demo.example>", subject="Lunch on Friday?"))
    auto = "Auto-Submitted: auto-replied\r\n"
    dovecot.append(account, sample(3, subject="Out of office", extra=auto))
    path = Path(config).resolve()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(
            CONFIG.format(
                port=dovecot.tls_port,
                ca_file=dovecot.ca_file,
                user=account.user,
                password=account.password,
                url=url,
                secret=secret,
            )
        )
    say(
        "3 unseen messages in the INBOX: one for the application (key ticket-42), one for a "
        "person, one auto-reply"
    )
    eml = path.with_suffix(".eml")
    eml.write_bytes(sample(1))
    say(f"wrote {path} and a sample message {eml.name}; try, in another terminal:")
    mailroom = _command()
    for command in (f"check -c {path.name}", f"route -c {path.name} {eml.name}", f"-c {path.name}"):
        print(f"    {mailroom} {command}", flush=True)


def _command() -> str:
    """How to run mailroom from here: the venv's script this demo runs under, if any."""
    script = Path(sys.executable).parent / "mailroom"
    if not script.exists():
        return f"{sys.executable} -m mailroom"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def stop(started: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM what was started, newest first; SIGKILL what does not stop in time."""
    for proc in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(started):
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    sys.exit(main())
