"""``make demo``: mailroom end to end on this machine, with nothing to configure.

Starts a throwaway Dovecot on 127.0.0.1 (its own config in a temp dir), the example webhook
receiver, and ``python -m mailroom -c examples/demo.yml``; appends a sample message and the
receiver prints it. Press Enter to send another, Ctrl-C to stop everything it started.
With ``--once`` it stops by itself after the first message arrived (used by the tests).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers.dovecot import Dovecot, free_port  # noqa: E402

SAMPLE = (
    "From: Ada Lovelace <ada@sender.example>\r\n"
    "To: Support <incoming+{key}@demo.example>\r\n"
    "Subject: Hello from the mailroom demo ({n})\r\n"
    "Message-ID: <demo-{n}-{stamp}@sender.example>\r\n"
    "Date: {date}\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "This message was appended to the demo Dovecot by examples/demo.py.\r\n"
    "mailroom saw it through IMAP IDLE and posted it to the receiver.\r\n"
)
START_TIMEOUT_S = 15.0


def sample(n: int) -> bytes:
    return SAMPLE.format(
        key="ticket-42",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="stop after the first delivery")
    args = parser.parse_args()

    started: list[subprocess.Popen[bytes]] = []
    with Dovecot() as dovecot:
        dovecot.start()
        account = dovecot.add_user("demo")
        port = free_port()
        secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "DEMO_IMAP_PORT": str(dovecot.tls_port),
            "DEMO_CA_FILE": str(dovecot.ca_file),
            "DEMO_IMAP_USER": account.user,
            "DEMO_IMAP_PASSWORD": account.password,
            "DEMO_WEBHOOK_URL": f"http://127.0.0.1:{port}/incoming",
            "DEMO_WEBHOOK_SECRET": secret,
        }
        print(
            f"demo: Dovecot (pid {dovecot.pid}) on 127.0.0.1:{dovecot.tls_port}, "
            f"user {account.user}",
            flush=True,
        )
        try:
            receiver = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "examples" / "receiver.py"),
                    "--port",
                    str(port),
                    "--secret",
                    secret,
                ]
                + (["--once"] if args.once else []),
                env=env,
            )
            started.append(receiver)
            wait_for_port(port, receiver)
            print(f"demo: receiver (pid {receiver.pid}) on http://127.0.0.1:{port}/", flush=True)
            mailroom = subprocess.Popen(
                [sys.executable, "-m", "mailroom", "-c", str(ROOT / "examples" / "demo.yml")],
                env=env,
            )
            started.append(mailroom)
            print(f"demo: mailroom (pid {mailroom.pid}) watching the INBOX", flush=True)
            dovecot.append(account, sample(1))
            print("demo: appended a sample message", flush=True)
            if args.once:
                return receiver.wait(START_TIMEOUT_S * 2)
            print("demo: press Enter to append another message, Ctrl-C to stop", flush=True)
            for n in range(2, 10_000):
                if not sys.stdin.readline():  # no terminal: just wait for Ctrl-C
                    signal.pause()
                dovecot.append(account, sample(n))
                print(f"demo: appended message {n}", flush=True)
        except KeyboardInterrupt:
            print("\ndemo: stopping", flush=True)
        finally:
            for proc in reversed(started):  # by pid, newest first
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in reversed(started):
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
