"""Peak RSS and a healthy mailbox's latency while a hostile IMAP server misbehaves (issue 18).

For each mode of ``tests/servers/hostile_imap.py``, ``python -m mailroom`` runs as a process of
its own with two mailboxes: a healthy one on a private Dovecot and one on the hostile server.
For ``--seconds`` (default 20) a message goes into the healthy mailbox every second; the bench
prints the growth of mailroom's peak RSS (VmHWM, reset once mailroom is connected) and the
healthy mailbox's latency, APPEND to webhook arrival (median and max).

Run ``python bench/hostile.py [--mode MODE ...] [--seconds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.observe import Mailroom, expected_id, hwm_mib, reset_hwm, rss_mib  # noqa: E402
from bench.receiver import Receiver  # noqa: E402
from tests.helpers import WHSEC, message  # noqa: E402
from tests.servers.dovecot import Dovecot, free_port  # noqa: E402
from tests.servers.hostile_imap import MODES, PASSWORD, USER, HostileImap  # noqa: E402


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def run(mode: str, seconds: float, dovecot: Dovecot, receiver: Receiver, workdir: Path) -> str:
    account = dovecot.add_user()
    with HostileImap(mode, max_seconds=seconds) as server:
        health = free_port()
        config = {
            "mailboxes": [
                {"id": "healthy", "address": "incoming+%{key}@example.com", "host": dovecot.host,
                 "port": dovecot.port, "user": account.user, "password": account.password},
                {"id": "hostile", "address": "incoming+%{key}@example.com", "host": server.host,
                 "port": server.port, "user": USER, "password": PASSWORD},
            ],
            "webhook": {"url": receiver.url, "signing_secret": WHSEC},
            "health": {"listen": f"127.0.0.1:{health}"},
            "log": {"format": "json", "level": "warning"},
        }  # fmt: skip
        mailroom = Mailroom(config, workdir, health, f"hostile-{mode.replace('@', '-')}")
        mailroom.start()
        try:
            deadline = time.monotonic() + 30
            while not _healthy(health) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # connected and swept
            before = rss_mib(mailroom.pid)
            reset_hwm(mailroom.pid)
            sent: list[tuple[str, float]] = []
            for n in range(int(seconds)):
                raw = message(n)
                with dovecot.imap(account) as conn:
                    conn.append("INBOX", "", "", raw)
                sent.append((expected_id(dovecot, account, raw, dovecot.port), time.monotonic()))
                time.sleep(1.0)
            times: list[float | None] = []
            for _ in range(60):
                times = receiver.times([key for key, _ in sent])
                if all(t is not None for t in times):
                    break
                time.sleep(0.5)
            peak = hwm_mib(mailroom.pid) - before
            mailroom.alive()
        finally:
            mailroom.stop()
    latencies = [t - at for (_, at), t in zip(sent, times, strict=True) if t is not None]
    lost = len(sent) - len(latencies)
    if not latencies:
        return f"{mode:<18} peak RSS +{peak:6.1f} MiB   healthy: none delivered"
    return (
        f"{mode:<18} peak RSS +{peak:6.1f} MiB   healthy latency median "
        f"{statistics.median(latencies) * 1000:6.0f} ms, max {max(latencies) * 1000:6.0f} ms"
        f"{f', {lost} not delivered' if lost else ''}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", action="append", choices=MODES)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailroom-hostile-") as tmp, Dovecot() as dovecot:
        receiver = Receiver(free_port())
        try:
            for mode in args.mode or MODES:
                print(run(mode, args.seconds, dovecot, receiver, Path(tmp)), flush=True)
        finally:
            receiver.close()


if __name__ == "__main__":
    main()
