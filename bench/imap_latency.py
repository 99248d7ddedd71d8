"""IMAP benchmarks on one private Dovecot (loopback only), or the push latency alone on Cyrus
or Courier (``--server cyrus --only latency``). Prints these numbers:

1. the server's own IDLE floor: APPEND OK → ``* n EXISTS`` on a bare IDLE client;
2. mailroom's APPEND OK → webhook arrival (median, p99) for 50 messages, one at a time,
   with ``python -m mailroom`` and the receiver as separate processes;
3. the time to deliver a 1,000-message backlog of 2 KB messages (mailroom in this process,
   the receiver in another), from ``supervisor.run`` to the last webhook arrival: median, min
   and max of ``BACKLOG_RUNS`` runs (single runs on a shared VM vary by ±15 %);
4. the cost of one round trip to a Dovecot that has been idle for a while (a NOOP after a
   pause) against one to a busy Dovecot (NOOPs back to back): every step of the push path
   (mailroom's IMAP round trip, its POST) meets a process that slept through the 500 ms;
5. the Python heap peak (tracemalloc) while delivering a 10,000-message backlog, against the
   size of the mail itself: the backlog must not be held in memory at once.

Run with ``make bench``; ``--server`` and ``--only floor,latency`` pick a server and a part.
Arrival times are ``time.monotonic()`` in the receiver process,
comparable with this process's on Linux (CLOCK_MONOTONIC is system-wide).
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.delay_proxy import DelayProxy  # noqa: E402
from mailroom.config import parse_config  # noqa: E402
from mailroom.kinds import KINDS  # noqa: E402
from mailroom.runtime import supervisor  # noqa: E402
from tests.helpers import config_dict, mailbox_dict, message  # noqa: E402
from tests.servers.courier import Courier  # noqa: E402
from tests.servers.cyrus import Cyrus  # noqa: E402
from tests.servers.dovecot import Dovecot  # noqa: E402
from tests.servers.imap import Account, ImapServer, free_port  # noqa: E402

SERVERS: dict[str, type[ImapServer]] = {"dovecot": Dovecot, "cyrus": Cyrus, "courier": Courier}
PARTS = ("floor", "latency", "round-trips", "backlog", "memory")

SAMPLES = 50
BACKLOG = 1000
BACKLOG_RUNS = 5
NOOP_SAMPLES = 30
BIG_BACKLOG = 10_000
STEP_TIMEOUT_S = 10.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def describe(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"{name}: median {statistics.median(ms):.2f} ms, p99 {percentile(ms, 0.99):.2f} ms, "
        f"min {min(ms):.2f} ms, max {max(ms):.2f} ms (n={len(ms)})"
    )


def idle_floor(dovecot: ImapServer, account: Account) -> list[float]:
    """A bare client: LOGIN, SELECT, IDLE; another connection APPENDs; time to EXISTS."""
    sock = socket.create_connection((dovecot.host, dovecot.port), timeout=STEP_TIMEOUT_S)
    reader = sock.makefile("rb")

    def until(prefix: bytes) -> bytes:
        for _ in range(1000):
            line = reader.readline()
            if not line:
                raise RuntimeError("connection closed")
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"no line starting with {prefix!r}")

    until(b"* OK")
    sock.sendall(f'a LOGIN "{account.user}" "{account.password}"\r\n'.encode())
    until(b"a OK")
    sock.sendall(b"b SELECT INBOX\r\n")
    until(b"b OK")
    sock.sendall(b"c IDLE\r\n")
    until(b"+")
    samples = []
    with dovecot.imap(account) as appender:
        for n in range(SAMPLES):
            typ, _ = appender.append("INBOX", None, None, message(n))
            appended = time.monotonic()
            assert typ == "OK"
            for _ in range(100):
                line = reader.readline()
                if line.endswith(b"EXISTS\r\n"):
                    break
            samples.append(time.monotonic() - appended)
    sock.sendall(b"DONE\r\n")
    sock.close()
    return samples


def round_trips(dovecot: ImapServer, account: Account) -> tuple[list[float], list[float]]:
    """NOOP round trips on a logged-in connection: back to back, and each after 100 ms idle."""
    with dovecot.imap(account) as conn:

        def noop() -> float:
            started = time.perf_counter()
            typ, _ = conn.noop()
            assert typ == "OK"
            return time.perf_counter() - started

        busy = [noop() for _ in range(NOOP_SAMPLES)]
        idle = []
        for _ in range(NOOP_SAMPLES):
            time.sleep(0.1)
            idle.append(noop())
    return busy, idle


def receiver(port: int, count: int | None = None) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "tests.servers.webhook", "--port", str(port)]
    if count is not None:
        args += ["--count", str(count)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:  # bounded: wait for the port
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("receiver did not start")


def read_line(stream: IO[str]) -> str:
    line = stream.readline()
    if not line:
        raise RuntimeError("receiver ended early")
    return line


def settle_and_idle(conn: imaplib.IMAP4) -> None:
    """Wait (bounded) until every message is \\Seen, then 50 ms for the watcher to IDLE."""
    for _ in range(200):
        typ, data = conn.uid("SEARCH", "UNSEEN")
        if typ == "OK" and not (data[0] or b"").split():
            break
        time.sleep(0.005)
    time.sleep(0.05)


def mailroom_latency(dovecot: ImapServer, workdir: Path, rtt_ms: float = 0) -> list[float]:
    account = dovecot.add_user()
    port = free_port()
    hook = receiver(port)
    assert hook.stdout is not None
    link = DelayProxy(dovecot.host, dovecot.port, rtt_ms) if rtt_ms else None
    imap_port = link.port if link is not None else dovecot.port
    config = config_dict(
        [mailbox_dict(dovecot, account, port=imap_port, ssl=False, ca_file=None)],
        f"http://127.0.0.1:{port}/",
    )
    config["log"] = {"level": "warning"}
    path = workdir / "bench.yml"
    path.write_text(yaml.safe_dump(config))
    mailroom = subprocess.Popen([sys.executable, "-m", "mailroom", "-c", str(path)], cwd=ROOT)
    samples = []
    try:
        # One warm-up message: it also proves the watcher is connected and idling.
        dovecot.append(account, message(-1))
        read_line(hook.stdout)
        with dovecot.imap(account) as appender:
            appender.select("INBOX")
            for n in range(SAMPLES):
                # Measure the IDLE path: wait until the previous message is settled and the
                # watcher is back in IDLE, so the APPEND is announced by an IDLE push (an
                # APPEND that lands during the settle round trip is seen sooner).
                settle_and_idle(appender)
                typ, _ = appender.append("INBOX", None, None, message(n))
                appended = time.monotonic()
                assert typ == "OK"
                arrived = float(read_line(hook.stdout).split()[0])
                samples.append(arrived - appended)
    finally:
        mailroom.terminate()
        mailroom.wait(STEP_TIMEOUT_S)
        hook.kill()
        hook.wait(STEP_TIMEOUT_S)
        if link is not None:
            link.close()
    return samples


@dataclass(frozen=True)
class BacklogRun:
    mail_mib: float  # the size of the backlog
    total_s: float  # supervisor.run → last arrival
    spread_s: float  # first → last arrival
    heap_peak_mib: float | None  # with trace_memory


async def deliver_backlog(dovecot: ImapServer, count: int, *, trace_memory: bool) -> BacklogRun:
    """Append ``count`` 2 KB messages, run mailroom in this process until a receiver in
    another process has them all."""
    account = dovecot.add_user()
    raws = [message(n, size=2048) for n in range(count)]
    mail_mib = sum(map(len, raws)) / 2**20
    await dovecot.aappend_many(account, raws)
    del raws
    port = free_port()
    hook = receiver(port, count=count)
    assert hook.stdout is not None
    config = parse_config(
        config_dict(
            [mailbox_dict(dovecot, account, port=dovecot.port, ssl=False, ca_file=None)],
            f"http://127.0.0.1:{port}/",
        ),
        env={},
    )
    stop = asyncio.Event()
    if trace_memory:
        tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    started = time.monotonic()
    task = asyncio.create_task(supervisor.run(config, stop, kinds=KINDS))
    try:
        line = await asyncio.wait_for(asyncio.to_thread(read_line, hook.stdout), 120)
    finally:
        peak = tracemalloc.get_traced_memory()[1] - baseline if trace_memory else None
        tracemalloc.stop()
        stop.set()
        await task
        hook.kill()
        hook.wait(STEP_TIMEOUT_S)
    result = json.loads(line)
    return BacklogRun(
        mail_mib=mail_mib,
        total_s=result["last"] - started,
        spread_s=result["last"] - result["first"],
        heap_peak_mib=None if peak is None else peak / 2**20,
    )


async def backlog(dovecot: ImapServer) -> tuple[float, float]:
    run = await deliver_backlog(dovecot, BACKLOG, trace_memory=False)
    return run.total_s, run.spread_s


def spread(values: list[float]) -> str:
    median = statistics.median(values)
    return f"median {median:.3f} s, min {min(values):.3f} s, max {max(values):.3f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--server", choices=sorted(SERVERS), default="dovecot")
    parser.add_argument("--only", default=",".join(PARTS), help=f"of {','.join(PARTS)}")
    parser.add_argument(
        "--rtt-ms", type=float, default=0, help="latency: mailroom's IMAP link as slow as a WAN"
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    name = args.server.capitalize()
    with SERVERS[args.server]() as dovecot:
        if "floor" in parts:
            floor = idle_floor(dovecot, dovecot.add_user())
            print(describe(f"{name} IDLE floor (APPEND OK -> * EXISTS, bare client)", floor))
        if "latency" in parts:
            latency = mailroom_latency(dovecot, workdir, args.rtt_ms)
            link = f", {args.rtt_ms:g} ms round trip to IMAP" if args.rtt_ms else ""
            print(describe(f"mailroom APPEND OK -> webhook arrival ({name}{link})", latency))
            if "floor" in parts:
                print(
                    f"  median over the floor: "
                    f"{(statistics.median(latency) - statistics.median(floor)) * 1000:+.1f} ms"
                )
        if "round-trips" in parts:
            busy, idle = round_trips(dovecot, dovecot.add_user())
            print(describe("NOOP round trip, back to back", busy))
            print(describe("NOOP round trip, after 100 ms idle", idle))
        if "backlog" in parts:
            runs = [asyncio.run(backlog(dovecot)) for _ in range(BACKLOG_RUNS)]
            print(
                f"{BACKLOG}-message backlog of 2 KB, {BACKLOG_RUNS} runs: start to last arrival "
                f"{spread([total for total, _ in runs])}; first to last arrival "
                f"{spread([first_to_last for _, first_to_last in runs])}"
            )
        if "memory" in parts:
            big = asyncio.run(deliver_backlog(dovecot, BIG_BACKLOG, trace_memory=True))
            print(
                f"{BIG_BACKLOG}-message backlog ({big.mail_mib:.1f} MiB of mail): Python heap "
                f"peak {big.heap_peak_mib:.1f} MiB while delivering, "
                f"{BIG_BACKLOG / big.total_s:.0f} messages/s (under tracemalloc)"
            )


if __name__ == "__main__":
    main()
