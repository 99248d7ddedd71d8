"""A thousand mailboxes in one mailroom process (issue 9), on a private Dovecot on loopback.

mailroom runs as ``python -m mailroom -c FILE`` and the webhook receiver as a process of its own
(bench/receiver.py); this process appends the mail and watches both from outside: /proc/<pid>
(VmRSS, VmHWM, utime + stime) and /metrics. Every wait is bounded; at the end a table of
measured against target.

1. start: Popen → every mailbox's session in IDLE (Dovecot's process titles); RSS at rest; CPU
   while idle over ``IDLE_CPU_S``;
2. load: ``PER_MAILBOX`` messages to every mailbox at once (one MULTIAPPEND each from a thread
   pool, over connections opened beforehand): all delivered, the time, mailroom's CPU-seconds
   per 1,000 messages, the p99 of the event loop's lag (``mailroom_event_loop_lag_seconds``);
3. outage: the same load while the receiver answers 503 for ``OUTAGE_S``: peak RSS against the
   configured ``limits``, everything delivered once it answers again, nothing twice (the
   receiver counts its 2xx answers per webhook-id);
4. a ``BIG_BYTES`` message, in a fresh mailroom process: its peak RSS (VmHWM, reset first) over
   the RSS before, and the APPEND → arrival latency of small messages on other mailboxes while
   it is processed, against the same without it.

``make bench`` runs it after bench/imap_latency.py. Options: ``--mailboxes N``, ``--tls``
(implicit TLS instead of the plain port), ``--skip idle,load,outage,big``, ``--profile DIR``
(CPU-time profiles of the phases, summarised in the output: bench/cpu_profile.py; and
py-spy's wall-time ones beside them when it is installed), ``--workdir DIR`` (keep mailroom's
config and log).
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.observe import (  # noqa: E402
    Appenders,
    Mailroom,
    Scrape,
    Table,
    big_message,
    cpu_s,
    expected_id,
    hwm_mib,
    load_average,
    ms,
    multiappend,
    profiled,
    reset_hwm,
    rss_mib,
    sampling_rss,
    tree_cpu_s,
    wait_quiet,
)
from bench.receiver import Receiver  # noqa: E402
from tests.helpers import WHSEC, message  # noqa: E402
from tests.servers.dovecot import Account, Dovecot, free_port  # noqa: E402

MAILBOXES = 1000
PER_MAILBOX = 10
MESSAGE_BYTES = 2048
IDLE_CPU_S = 60.0
OUTAGE_S = 60.0
BIG_BYTES = 25_000_000  # under the default max_message_bytes (25 MiB)
PROBES = 40  # small messages per latency sample (phase 4), one every PROBE_EVERY_S
PROBE_EVERY_S = 0.1
START_TIMEOUT_S = 120.0
DELIVERY_TIMEOUT_S = 900.0
# The limits, set explicitly (they are the defaults): the outage is measured against them.
LIMITS = {"in_flight_messages": 2048, "in_flight_bytes": 64 * 1024 * 1024, "connects": 16}

# Every IMAP session is an `imap` process of its own (client_limit 1); logins go through a few
# long-lived imap-login processes (service_count 0: "high-performance mode"). The appenders of
# phases 2-3 double the sessions. anvil, auth, stats and config serve every session or login.
SESSIONS = 4096
DOVECOT_LIMITS = f"""
default_process_limit = {SESSIONS}
default_client_limit = {SESSIONS}
default_vsz_limit = 512M
mail_max_userip_connections = 100
service imap {{
  process_limit = {SESSIONS}
  client_limit = 1
}}
service imap-login {{
  service_count = 0
  process_min_avail = 2
  process_limit = 16
  client_limit = {SESSIONS}
  vsz_limit = 1G
}}
service anvil {{
  client_limit = {2 * SESSIONS + 100}
}}
service auth {{
  client_limit = {2 * SESSIONS + 100}
}}
service stats {{
  client_limit = {2 * SESSIONS + 100}
}}
service config {{
  client_limit = {SESSIONS}
}}
"""


def mailroom_config(
    dovecot: Dovecot, accounts: list[Account], hook: Receiver, health_port: int, **how: Any
) -> dict[str, Any]:
    """One mailbox per account with mailroom's defaults (delete_after_delivery, idle_timeout
    60 s, webhook retry 1..600 s, concurrency 8), the limits set explicitly."""
    boxes = []
    for account in accounts:
        box: dict[str, Any] = {
            "id": account.user,
            "address": "incoming+%{key}@example.com",
            "host": dovecot.host,
            "user": account.user,
            "password": account.password,
        }
        if how["tls"]:
            box.update(port=dovecot.tls_port, ssl=True, ca_file=str(dovecot.ca_file))
        else:
            box.update(port=dovecot.port, ssl=False)
        boxes.append(box)
    return {
        "mailboxes": boxes,
        "webhook": {"url": hook.url, "signing_secret": WHSEC},
        "limits": {**LIMITS, "connects": how["connects"]},
        "health": {"listen": f"127.0.0.1:{health_port}"},
        "log": {"format": "json", "level": how["log_level"]},
    }


# -- the phases --------------------------------------------------------------------------------


@dataclass
class Bench:
    dovecot: Dovecot
    accounts: list[Account]
    receiver: Receiver
    workdir: Path
    options: argparse.Namespace
    table: Table = field(default_factory=Table)
    delivered: int = 0  # webhook-ids the receiver has by now

    @property
    def port(self) -> int:
        """The port mailroom watches the mailboxes on (part of their webhook-ids)."""
        return self.dovecot.tls_port if self.options.tls else self.dovecot.port

    runs: int = 0

    def mailroom(self) -> Mailroom:
        health_port = free_port()
        options = self.options
        config = mailroom_config(
            self.dovecot,
            self.accounts,
            self.receiver,
            health_port,
            tls=options.tls,
            log_level=options.log_level,
            connects=options.connects,
        )
        self.runs += 1
        profile = self.options.profile is not None
        return Mailroom(config, self.workdir, health_port, f"mailroom{self.runs}", profile=profile)

    def profile(
        self, mailroom: Mailroom, phase: str, *, fresh: bool = True
    ) -> contextlib.AbstractContextManager[None]:
        folder = self.options.profile
        return profiled(mailroom, folder / f"{phase}.txt" if folder else None, fresh=fresh)

    def start(self, mailroom: Mailroom, label: str) -> None:
        """Popen → every mailbox's session in IDLE."""
        users = {a.user for a in self.accounts}
        others0 = self.others_cpu()
        mailroom.start()
        deadline = mailroom.started + START_TIMEOUT_S
        with self.profile(mailroom, f"start-{self.runs}", fresh=False):
            seconds = self.wait_idle(mailroom, users, deadline)
        self.table.add(
            f"{label}: start -> all {len(users)} in IDLE",
            f"{seconds:.1f} s",
            "< 10 s",
            seconds < 10,
        )
        dovecot, _, bench = (b - a for a, b in zip(others0, self.others_cpu(), strict=True))
        self.table.add(
            "  CPU meanwhile",
            f"mailroom {cpu_s(mailroom.pid):.1f} s (its start-up included), Dovecot "
            f"{dovecot:.1f} s, this bench {bench:.1f} s (load average {load_average()})",
        )

    def wait_idle(self, mailroom: Mailroom, users: set[str], deadline: float) -> float:
        """Until every session of ``users`` is in IDLE (bounded); the seconds since start."""
        for _ in range(100_000):
            mailroom.alive()
            idle = sum(
                1 for user, cmd in self.dovecot.sessions() if cmd == "IDLE" and user in users
            )
            seconds = time.monotonic() - mailroom.started
            if idle == len(users):
                return seconds
            if time.monotonic() > deadline:
                raise RuntimeError(f"{idle} of {len(users)} sessions in IDLE after {seconds:.0f} s")
            time.sleep(0.1)
        raise RuntimeError("not all in IDLE")

    def quiet_scrapes(self, mailroom: Mailroom) -> tuple[Scrape, Scrape]:
        """Two scrapes a second apart at rest: the first one's own lag sample (a scrape runs on
        the loop) shows what the second one's will add to the window that it opens."""
        first = mailroom.scrape()
        time.sleep(1)
        return first, mailroom.scrape()

    def at_rest(self, mailroom: Mailroom) -> None:
        time.sleep(5)  # past the start's last sweeps
        rss = rss_mib(mailroom.pid)
        self.table.add("RSS at rest", f"{rss:.0f} MiB", "< 120 MB", rss * 2**20 < 120e6)
        first, before = self.quiet_scrapes(mailroom)
        started, cpu0 = time.monotonic(), cpu_s(mailroom.pid)
        with self.profile(mailroom, "idle"):
            time.sleep(self.options.idle_s)
        share = (cpu_s(mailroom.pid) - cpu0) / (time.monotonic() - started)
        self.table.add(
            f"CPU while idle ({self.options.idle_s:.0f} s)",
            f"{share * 100:.2f} % of a core",
            "< 2 %",
            share < 0.02,
        )
        lag = mailroom.scrape().lag_since(before).without_one_like(before.lag_since(first))
        self.table.add("  p99 event-loop lag at rest", f"{ms(lag.quantile(0.99))} (n={lag.n})")
        self.table.add("  RSS after the idle minute", f"{rss_mib(mailroom.pid):.0f} MiB")
        cpu0, started = cpu_s(mailroom.pid), time.monotonic()
        scraped = mailroom.scrape()
        self.table.add(
            "  one /metrics scrape (on the loop)",
            f"{ms(time.monotonic() - started)} wall, {ms(cpu_s(mailroom.pid) - cpu0)} "
            f"CPU, {scraped.text_bytes / 1024:.0f} KiB",
        )

    def batches(self, first: int) -> dict[Account, list[bytes]]:
        return {
            account: [message(first + n, size=MESSAGE_BYTES) for n in range(PER_MAILBOX)]
            for account in self.accounts[: self.options.loaded or None]
        }

    def others_cpu(self) -> tuple[float, float, float]:
        """CPU seconds so far of Dovecot (its live processes), the receiver, this process."""
        dovecot = tree_cpu_s(
            f"dovecot-mailroom-test-{self.dovecot.port}".encode(), self.dovecot.pid
        )
        return dovecot, cpu_s(self.receiver.proc.pid), time.process_time()

    def load(self, mailroom: Mailroom, appenders: Appenders) -> None:
        batches = self.batches(0)
        total = sum(map(len, batches.values()))
        first, before = self.quiet_scrapes(mailroom)
        started, cpu0, others0 = time.monotonic(), cpu_s(mailroom.pid), self.others_cpu()
        with self.profile(mailroom, "load"):
            keys = appenders.append(batches)
            appended = time.monotonic() - started
            self.delivered += len(set(keys))
            self.receiver.wait_delivered(self.delivered, DELIVERY_TIMEOUT_S)
        # The load's lag samples, before a quiet tail dilutes them (this scrape's own CPU,
        # about 0.2 s with 1,000 mailboxes, counts in the phase's).
        after = mailroom.scrape()
        wait_quiet(mailroom.pid, 60)  # the last settlements
        cpu = cpu_s(mailroom.pid) - cpu0
        others = [b - a for a, b in zip(others0, self.others_cpu(), strict=True)]
        times = self.receiver.times(keys)
        last = max(t for t in times if t is not None)
        settled = mailroom.scrape().value("mailroom_settled_total")
        arrived = sum(t is not None for t in times)
        self.table.add(
            f"{PER_MAILBOX} x {len(batches)} mailboxes at once: delivered",
            f"{arrived} of {total}",
            f"{total}",
            arrived == total,
        )
        self.table.add("  APPENDs took", f"{appended:.1f} s")
        self.table.add(
            "  first APPEND -> last arrival",
            f"{last - started:.1f} s ({total / (last - started):.0f} messages/s)",
        )
        per_k = cpu / total * 1000
        self.table.add(
            "  mailroom CPU per 1,000 messages",
            f"{per_k:.2f} CPU-s ({cpu:.1f} s in all; {settled:.0f} settled)",
            "<= 0.6 CPU-s",
            per_k <= 0.6,
        )
        lag = after.lag_since(before).without_one_like(before.lag_since(first))
        p99 = lag.quantile(0.99)
        self.table.add("  p99 event-loop lag", f"{ms(p99)} (n={lag.n})", "< 50 ms", p99 < 0.05)
        self.table.add(
            "  CPU meanwhile of the others",
            f"Dovecot {others[0]:.1f} s, receiver {others[1]:.1f} s, this bench {others[2]:.1f} s",
        )
        self.table.add("  peak RSS (VmHWM)", f"{hwm_mib(mailroom.pid):.0f} MiB")

    def outage(self, mailroom: Mailroom, appenders: Appenders) -> None:
        batches = self.batches(PER_MAILBOX)
        total = sum(map(len, batches.values()))
        before = rss_mib(mailroom.pid)
        self.receiver.ask(status=503)
        down = time.monotonic()
        looks = []  # (in flight, bytes in flight, fetches waiting) seen meanwhile
        with sampling_rss(mailroom.pid) as samples:
            keys = appenders.append(batches)
            for at in (self.options.outage_s / 2, self.options.outage_s - 5):
                time.sleep(max(0.0, down + at - time.monotonic()))
                found = mailroom.scrape()
                names = ("in_flight_messages", "in_flight_bytes", "budget_waiting")
                looks.append(tuple(found.value(f"mailroom_{name}") for name in names))
            time.sleep(max(0.0, down + self.options.outage_s - time.monotonic()))
            refused = self.receiver.ask(status=200)["refused"]
            back, cpu0 = time.monotonic(), cpu_s(mailroom.pid)
            self.delivered += len(set(keys))
            with self.profile(mailroom, "drain"):
                counts = self.receiver.wait_delivered(self.delivered, DELIVERY_TIMEOUT_S)
            cpu = cpu_s(mailroom.pid) - cpu0
        times = self.receiver.times(keys)
        arrived = [t for t in times if t is not None]
        held, held_bytes, waiting = (max(look[i] for look in looks) for i in range(3))
        peak = max(samples)
        limit_mib = LIMITS["in_flight_bytes"] / 2**20
        self.table.add(
            f"webhook down {self.options.outage_s:.0f} s, {total} messages: refused",
            f"{refused} requests",
        )
        within = held <= LIMITS["in_flight_messages"] and held_bytes <= LIMITS["in_flight_bytes"]
        self.table.add(
            "  in flight meanwhile",
            f"{held:.0f} messages, {held_bytes / 2**20:.1f}"
            f" MiB; {waiting:.0f} fetches waiting for room",
            f"<= {LIMITS['in_flight_messages']}, {limit_mib:.0f} MiB",
            within,
        )
        per_message = (peak - before) * 1024 / max(held, 1)
        self.table.add(
            "  peak RSS",
            f"{peak:.0f} MiB ({before:.0f} before: "
            f"{per_message:.1f} KiB more per message in flight)",
        )
        self.table.add(
            "  delivered once it answers",
            f"{len(arrived)} of {total}",
            f"{total}",
            len(arrived) == total,
        )
        if arrived:
            self.table.add(
                "    first / last arrival after it came back",
                f"{min(arrived) - back:.1f} s / {max(arrived) - back:.1f} s "
                f"({cpu / total * 1000:.2f} CPU-s per 1,000)",
            )
        twice = counts["answered_2xx"] - counts["delivered"]
        self.table.add("  delivered twice (2xx per webhook-id > 1)", f"{twice}", "0", twice == 0)

    def probe(self, probes: list[tuple[Account, imaplib.IMAP4]], count: int) -> list[float]:
        """APPEND OK -> arrival of ``count`` small messages, one every PROBE_EVERY_S, round
        robin over ``probes``."""
        sent: list[tuple[str, float]] = []
        next_at = time.monotonic()
        for n in range(count):
            account, conn = probes[n % len(probes)]
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += PROBE_EVERY_S
            raw = message(100_000 + n)
            multiappend(conn, [raw])
            sent.append((expected_id(self.dovecot, account, raw, self.port), time.monotonic()))
        self.delivered += len(sent)
        self.receiver.wait_delivered(self.delivered, 120)
        times = self.receiver.times([key for key, _ in sent])
        return [t - at for (_, at), t in zip(sent, times, strict=True) if t is not None]

    def big(self, mailroom: Mailroom) -> None:
        raw = big_message(BIG_BYTES)
        target, others = self.accounts[0], self.accounts[1 : 1 + PROBES]
        with contextlib.ExitStack() as stack:
            probes = [(a, stack.enter_context(self.dovecot.imap(a))) for a in others]
            quiet = self.probe(probes, PROBES)
            first, lag_before = self.quiet_scrapes(mailroom)
            wait_quiet(mailroom.pid, 30)
            before = rss_mib(mailroom.pid)
            reset_hwm(mailroom.pid)
            key: list[str] = []

            def append_big() -> None:
                with self.dovecot.imap(target) as conn:
                    multiappend(conn, [raw])
                key.append(expected_id(self.dovecot, target, raw, self.port))

            appender = threading.Thread(target=append_big)
            started = time.monotonic()
            with self.profile(mailroom, "big"):
                appender.start()
                busy = self.probe(probes, PROBES)
                appender.join(120)
                self.delivered += 1
                self.receiver.wait_delivered(self.delivered, 120)
            (arrived,) = self.receiver.times(key)
            assert arrived is not None
            wait_quiet(mailroom.pid, 30)
        peak = hwm_mib(mailroom.pid)  # before a scrape allocates its text
        lag = mailroom.scrape().lag_since(lag_before).without_one_like(lag_before.lag_since(first))
        size_mib = len(raw) / 2**20
        self.table.add(
            f"one {len(raw) / 1e6:.0f} MB message: APPEND -> arrival", f"{arrived - started:.1f} s"
        )
        times = (peak - before) / size_mib
        self.table.add(
            "  peak RSS over the RSS before",
            f"{peak - before:.0f} MiB ({before:.0f} -> {peak:.0f} MiB): {times:.1f} x its size",
            "< 3 x",
            times < 3,
        )
        self.table.add(
            "  mailroom's event-loop lag meanwhile",
            f"p99 {ms(lag.quantile(0.99))}, the longest <= {ms(lag.longest())} (n={lag.n})",
        )
        during = [
            latency for n, latency in enumerate(busy) if n * PROBE_EVERY_S < arrived - started
        ]
        for label, values in (("without it", quiet), ("while it is processed", during or busy)):
            self.table.add(
                f"  APPEND -> arrival on other mailboxes {label}",
                f"median {ms(statistics.median(values))}, max {ms(max(values))} (n={len(values)})",
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--mailboxes", type=int, default=MAILBOXES)
    parser.add_argument("--tls", action="store_true", help="implicit TLS, not the plain port")
    parser.add_argument("--skip", default="", help="phases to skip: idle,load,outage,big")
    parser.add_argument("--loaded", type=int, help="mail to only this many of the mailboxes")
    parser.add_argument("--idle-s", type=float, default=IDLE_CPU_S)
    parser.add_argument("--outage-s", type=float, default=OUTAGE_S)
    parser.add_argument("--log-level", default="info", help="mailroom's log.level")
    parser.add_argument("--connects", type=int, default=LIMITS["connects"], help="limits.connects")
    parser.add_argument(
        "--profile",
        type=Path,
        help="write CPU-time profiles of the phases here (and py-spy's, when installed)",
    )
    parser.add_argument("--workdir", type=Path, help="keep mailroom's configs and logs here")
    options = parser.parse_args()
    skip = set(filter(None, options.skip.split(",")))
    print(
        f"many_mailboxes: {options.mailboxes} mailboxes over {'TLS' if options.tls else 'plain'}"
        f" IMAP, {os.cpu_count()} CPUs, load average {load_average()}"
    )
    inotify = Path("/proc/sys/fs/inotify/max_user_instances")
    if inotify.exists() and int(inotify.read_text()) < options.mailboxes:
        print(
            f"  note: fs.inotify.max_user_instances is {inotify.read_text().strip()}: the IDLE "
            "sessions beyond it are told of new mail by Dovecot's 1 s polling, not inotify"
        )
    with (
        tempfile.TemporaryDirectory(prefix="mailroom-bench-") as tmp,
        Dovecot(extra_config=DOVECOT_LIMITS) as dovecot,
    ):
        accounts = [dovecot.add_user(f"box{n:04d}") for n in range(options.mailboxes)]
        receiver = Receiver(free_port())
        bench = Bench(dovecot, accounts, receiver, options.workdir or Path(tmp), options)
        mailroom = bench.mailroom()
        try:
            bench.start(mailroom, "mailroom")
            if "idle" not in skip:
                bench.at_rest(mailroom)
            if not {"load", "outage"} <= skip:
                port = dovecot.tls_port if options.tls else dovecot.port
                appenders = Appenders(dovecot, accounts, port=port)
                try:
                    if "load" not in skip:
                        bench.load(mailroom, appenders)
                    if "outage" not in skip:
                        bench.outage(mailroom, appenders)
                finally:
                    appenders.close()
            mailroom.stop()
            print(f"  mailroom's log lines by level: {mailroom.log_levels()}")
            if "big" not in skip:
                mailroom = bench.mailroom()
                bench.start(mailroom, "a fresh process")
                bench.big(mailroom)
        finally:
            mailroom.stop()
            receiver.close()
    print(f"\nload average at the end: {load_average()}\n")
    bench.table.print()


if __name__ == "__main__":
    main()
