"""``make demo``: mailroom end to end on this machine, with nothing to configure.

Starts a throwaway Dovecot on 127.0.0.1 (its own config in a temp dir), the example webhook
receiver (``examples/receiver.py``, which refuses keys starting with ``closed-`` with a 422),
an SMTP sink that prints the reject notices (``examples/smtp_sink.py``), and ``python -m
mailroom -c examples/demo.yml``; appends a sample message and the receiver prints it. Press
Enter to send another; Ctrl-C, SIGTERM or SIGHUP stops everything it started and removes the
temp dir.

``--serve`` starts Dovecot, the receiver and the sink but not mailroom, puts three unseen
messages in the INBOX (one for the application, one for a person, one auto-reply) and writes a
ready config for them (``mailroom-demo.yml``): a target for a first config of your own, for
``mailroom check`` and ``mailroom route`` before any real mailbox. ``--once`` stops by itself
after the first message arrived (used by the tests).

``send`` puts a message into the demo's INBOX while ``--serve`` runs (it reads the IMAP
settings from ``mailroom-demo.yml``): a sample for the application by default, ``--to`` and
``--subject`` of your choice, ``--auto-reply``, or a ``.eml`` file as it is.
"""

from __future__ import annotations

import argparse
import base64
import imaplib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers.dovecot import Account, Dovecot, free_port  # noqa: E402

SAMPLE = (
    "From: {sender}\r\n"
    "To: {to}\r\n"
    "Subject: {subject}\r\n"
    "Message-ID: <demo-{stamp}@sender.example>\r\n"
    "Date: {date}\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "{extra}"
    "\r\n"
    "This message was appended to the demo Dovecot by examples/demo.py.\r\n"
)
SENDER = "Ada Lovelace <ada@sender.example>"
TO_APP = "Support <incoming+ticket-42@demo.example>"
SUBJECT = "Hello from the mailroom demo"
AUTO_REPLY = "Auto-Submitted: auto-replied\r\n"
REFUSED_PREFIX = "closed-"  # the receiver answers 422 to these keys, as an application may
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
reject_notices:                    # to the demo's SMTP sink, which prints them
  from: "Demo support <noreply@demo.example>"
  smtp: {{host: 127.0.0.1, port: {smtp_port}}}
log: {{format: text}}
"""


class Stop(Exception):
    """A stop signal arrived: unwind, so that every ``finally`` cleans up."""


def _stop(signum: int, frame: FrameType | None) -> None:
    for sig in STOP_SIGNALS:  # the cleanup below must not be cut short by a second signal
        signal.signal(sig, signal.SIG_IGN)
    raise Stop(signal.Signals(signum).name)


def sample(
    subject: str = SUBJECT, *, to: str = TO_APP, sender: str = SENDER, extra: str = ""
) -> bytes:
    """A small message, with a fresh Message-ID and today's date."""
    return SAMPLE.format(
        sender=sender,
        to=to,
        subject=subject,
        extra=extra,
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
    if sys.argv[1:2] == ["send"]:
        return send(sys.argv[2:])
    parser = argparse.ArgumentParser(
        description="mailroom end to end on this machine (also: demo.py send --help)"
    )
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
    smtp_port = free_port()
    env["DEMO_SMTP_PORT"] = str(smtp_port)
    receiver_args = [str(ROOT / "examples" / "receiver.py"), "--port", str(port)]
    receiver_args += ["--secret", secret, "--refuse", REFUSED_PREFIX]
    receiver = subprocess.Popen(
        [sys.executable, *receiver_args, *(["--once"] if args.once else [])], env=env
    )
    started.append(receiver)
    wait_for_port(port, receiver)
    say(f"receiver (pid {receiver.pid}) on http://127.0.0.1:{port}/")
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "smtp_sink.py"), "--port", str(smtp_port)],
        env=env,
    )
    started.append(sink)
    wait_for_port(smtp_port, sink)
    say(f"SMTP sink (pid {sink.pid}) on 127.0.0.1:{smtp_port}: it prints the reject notices")
    if args.serve:
        serve(args.config, dovecot, account, url, secret, smtp_port)
    else:
        mailroom = subprocess.Popen(
            [sys.executable, "-m", "mailroom", "-c", str(ROOT / "examples" / "demo.yml")],
            env=env,
        )
        started.append(mailroom)
        say(f"mailroom (pid {mailroom.pid}) watching the INBOX")
        dovecot.append(account, sample(f"{SUBJECT} (1)"))
        say("appended a sample message")
        if args.once:
            receiver.wait(START_TIMEOUT_S * 2)
            return
    say("press Enter to append another message; Ctrl-C to stop everything")
    for n in range(2, 10_000):
        if not sys.stdin.readline():  # no terminal: wait for a signal
            signal.pause()
        dovecot.append(account, sample(f"{SUBJECT} ({n})"))
        say(f"appended message {n}")


def serve(  # noqa: PLR0917
    config: str, dovecot: Dovecot, account: Account, url: str, secret: str, smtp_port: int
) -> None:
    """Seed the INBOX and write a config for it (mode 0600: it holds the password)."""
    dovecot.append(account, sample(f"{SUBJECT} (1)"))
    dovecot.append(account, sample("Lunch on Friday?", to="Ada <ada@demo.example>"))
    dovecot.append(account, sample("Out of office", extra=AUTO_REPLY))
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
                smtp_port=smtp_port,
            )
        )
    say(
        "3 unseen messages in the INBOX: one for the application (key ticket-42), one for a "
        "person, one auto-reply"
    )
    eml = path.with_suffix(".eml")
    eml.write_bytes(sample())
    say(f"wrote {path} and a sample message {eml.name}; try, in another terminal:")
    mailroom = _command()
    for command in (f"check -c {path.name}", f"route -c {path.name} {eml.name}", f"-c {path.name}"):
        print(f"    {mailroom} {command}", flush=True)
    demo = _here(Path(__file__))
    config_option = "" if path == Path("mailroom-demo.yml").resolve() else f" --config {path}"
    say("then, while mailroom runs, put messages into the demo mailbox (docs/getting-started.md):")
    for options, what in (
        ("", "delivered: the receiver prints it"),
        (
            "--to nobody@demo.example --from grace@sender.example",
            "rejected: the sink prints a notice",
        ),
        ("--auto-reply", "ignored: no webhook, no notice"),
        (f"--to incoming+{REFUSED_PREFIX}7@demo.example", "the receiver answers 422: a notice"),
    ):
        command = f"{_here(Path(sys.executable))} {demo} send{config_option} {options}"
        print(f"    {command.rstrip()}  # {what}", flush=True)


def send(argv: list[str]) -> int:
    """``demo.py send``: APPEND one message to the INBOX of a running ``--serve`` demo."""
    parser = argparse.ArgumentParser(
        prog="demo.py send",
        description="Put a message into the INBOX of the demo that `make demo-serve` runs.",
    )
    parser.add_argument("file", nargs="?", help="a message (.eml) to append as it is")
    parser.add_argument("--to", default=TO_APP, help="the To header (default: %(default)s)")
    parser.add_argument("--subject", default=SUBJECT, help="the Subject (default: %(default)s)")
    parser.add_argument("--from", dest="sender", default=SENDER, help="(default: %(default)s)")
    parser.add_argument(
        "--auto-reply", action="store_true", help="an out-of-office reply (Auto-Submitted)"
    )
    parser.add_argument(
        "--config",
        default="mailroom-demo.yml",
        help="the config demo.py --serve wrote (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.file is not None:
        try:
            raw = Path(args.file).read_bytes()
        except OSError as exc:
            print(f"demo: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
            return 1
    elif args.auto_reply:
        raw = sample("Out of office", to=args.to, sender=args.sender, extra=AUTO_REPLY)
    else:
        raw = sample(args.subject, to=args.to, sender=args.sender)
    try:
        box = yaml.safe_load(Path(args.config).read_text())["mailboxes"][0]
        context = ssl.create_default_context(cafile=box["ca_file"])
        with imaplib.IMAP4_SSL(box["host"], int(box["port"]), ssl_context=context) as imap:
            imap.login(box["user"], box["password"])
            imap.append("INBOX", None, None, raw)
    except (OSError, KeyError, TypeError, yaml.YAMLError, imaplib.IMAP4.error) as exc:
        print(
            f"demo: cannot append to the demo mailbox of {args.config} ({exc}); is "
            "`make demo-serve` running, and is this the config it wrote?",
            file=sys.stderr,
        )
        return 1
    what = args.file or f"To: {args.to}" + (", an auto-reply" if args.auto_reply else "")
    say(f"appended {what} ({len(raw)} bytes) to the demo INBOX")
    return 0


def _here(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _command() -> str:
    """How to run mailroom from here: the venv's script this demo runs under, if any."""
    script = Path(sys.executable).parent / "mailroom"
    if not script.exists():
        return f"{sys.executable} -m mailroom"
    return _here(script)


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
