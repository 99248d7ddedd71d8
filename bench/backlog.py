"""One mailbox's backlog, on loopback and across a slow link (issue 23), mailroom a process.

A run: mailroom (``python -m mailroom``, one plain-IMAP mailbox on a private Dovecot, its
defaults: delete_after_delivery, JSON logs at info) starts and idles; then ``BACKLOG`` 2 KB
messages are appended in one MULTIAPPEND over a connection of the bench's own; the receiver
(bench/receiver.py, a process of its own) records each webhook-id's first 2xx. Printed per
run: APPEND OK → the last POST, the first → the last POST, and mailroom's CPU per message
(utime + stime from /proc, APPEND to quiet). ``--rtt-ms`` puts bench/delay_proxy.py between
mailroom and Dovecot (the bench's APPEND goes direct): each of mailroom's IMAP round trips then
costs that much.

``make bench`` runs it on loopback and at a 50 ms round trip. Options: ``--runs N``,
``--rtt-ms MS`` (several: ``0,50``), ``--count N``, ``--profile DIR`` (a CPU-time profile of
each drain, bench/cpu_profile.py, summarised in the output).

Targets (issue 23): at a 50 ms round trip, the first → the last POST under 1 s; on loopback
4 times faster than MailRoom 0.11.1's 2.43-2.65 s on the same machine (which cannot run here:
its gem comes from rubygems.org); CPU per message at most 0.4 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.delay_proxy import DelayProxy  # noqa: E402
from bench.observe import Mailroom, cpu_s, load_average, multiappend, profiled, wait_quiet  # noqa: E402
from bench.receiver import Receiver  # noqa: E402
from tests.helpers import WHSEC, message  # noqa: E402
from tests.servers.dovecot import Account, Dovecot, free_port  # noqa: E402

BACKLOG = 1000
MESSAGE_BYTES = 2048
RUNS = 3
START_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 300.0
MAILROOM_S = 2.5  # MailRoom 0.11.1, first -> last POST on loopback, this machine (issue 23)


@dataclass(frozen=True)
class Run:
    appended_to_last_s: float
    first_to_last_s: float
    cpu_per_message_ms: float
    load: str


def one_run(
    dovecot: Dovecot,
    receiver: Receiver,
    workdir: Path,
    n: int,
    *,
    rtt_ms: float,
    count: int,
    profile: Path | None,
) -> Run:
    account = dovecot.add_user()
    raws = [message(k, size=MESSAGE_BYTES) for k in range(count)]
    receiver.ask(reset=True)
    with contextlib.ExitStack() as stack:
        port = dovecot.port
        if rtt_ms:
            port = stack.enter_context(DelayProxy(dovecot.host, dovecot.port, rtt_ms)).port
        mailroom = Mailroom(
            config(dovecot, account, port, receiver),
            workdir,
            free_port(),
            f"backlog{n}",
            profile=profile is not None,
        )
        stack.callback(mailroom.stop)
        mailroom.start()
        wait_idle(dovecot, account, mailroom)
        phase = profile / f"drain-{rtt_ms:g}ms-{n}.txt" if profile is not None else None
        with dovecot.imap(account) as conn, profiled(mailroom, phase):
            cpu0 = cpu_s(mailroom.pid)
            load = load_average()
            multiappend(conn, raws)
            appended = time.monotonic()
            receiver.wait_delivered(count, DRAIN_TIMEOUT_S)
            wait_quiet(mailroom.pid, 30)
            cpu = cpu_s(mailroom.pid) - cpu0
        span = receiver.ask(span=True)
    return Run(
        appended_to_last_s=span["last"] - appended,
        first_to_last_s=span["last"] - span["first"],
        cpu_per_message_ms=cpu / count * 1000,
        load=load,
    )


def config(dovecot: Dovecot, account: Account, port: int, receiver: Receiver) -> dict[str, object]:
    return {
        "mailboxes": [
            {
                "id": account.user,
                "address": "incoming+%{key}@example.com",
                "host": dovecot.host,
                "port": port,
                "ssl": False,
                "user": account.user,
                "password": account.password,
            }
        ],
        "webhook": {"url": receiver.url, "signing_secret": WHSEC},
        "log": {"format": "json", "level": "info"},
    }


def wait_idle(dovecot: Dovecot, account: Account, mailroom: Mailroom) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while (account.user, "IDLE") not in dovecot.sessions():
        mailroom.alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"mailroom did not IDLE within {START_TIMEOUT_S:g} s")
        time.sleep(0.05)
    time.sleep(0.5)  # its start-up settles (the first sweep found nothing)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--rtt-ms", default="0,50", help="round trips to try, comma-separated")
    parser.add_argument("--count", type=int, default=BACKLOG)
    parser.add_argument("--profile", type=Path, help="CPU-time profiles of the drains here")
    options = parser.parse_args()
    if options.profile is not None:
        options.profile.mkdir(parents=True, exist_ok=True)
    print(f"backlog: {options.count} x 2 KB, one mailbox, {os.cpu_count()} CPUs")
    with (
        tempfile.TemporaryDirectory(prefix="mailroom-backlog-") as tmp,
        Dovecot() as dovecot,
    ):
        receiver = Receiver(free_port())
        try:
            for rtt_ms in (float(x) for x in options.rtt_ms.split(",")):
                runs = []
                for n in range(options.runs):
                    run = one_run(
                        dovecot,
                        receiver,
                        Path(tmp),
                        n,
                        rtt_ms=rtt_ms,
                        count=options.count,
                        profile=options.profile,
                    )
                    runs.append(run)
                    print(
                        f"  {rtt_ms:g} ms round trip, run {n + 1}: APPEND -> last POST "
                        f"{run.appended_to_last_s:.2f} s, first -> last POST "
                        f"{run.first_to_last_s:.2f} s, {run.cpu_per_message_ms:.3f} ms CPU "
                        f"a message (load average {run.load})",
                        flush=True,
                    )
                report(rtt_ms, runs)
        finally:
            receiver.close()


def report(rtt_ms: float, runs: list[Run]) -> None:
    spans = [run.first_to_last_s for run in runs]
    cpu = [run.cpu_per_message_ms for run in runs]
    best = min(spans)
    if rtt_ms:
        verdict = f"target < 1 s: {'ok' if best < 1 else 'MISSED'}"
    else:
        times = MAILROOM_S / best
        verdict = f"{times:.1f} x MailRoom's ~{MAILROOM_S} s (target >= 4 x)"
    print(
        f"{rtt_ms:g} ms round trip: first -> last POST median {statistics.median(spans):.2f} s, "
        f"best {best:.2f} s ({verdict}); CPU a message median {statistics.median(cpu):.3f} ms "
        f"(target <= 0.4 ms: {'ok' if statistics.median(cpu) <= 0.4 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
