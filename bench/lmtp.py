"""The LMTP listener's benchmarks, on loopback, side by side with the IMAP IDLE path.

mailroom runs as a process of its own (``python -m mailroom``), the webhook receiver as another
(bench/receiver.py, answering 200 at once and noting when each webhook-id arrived), the LMTP
clients in this process (asyncio, pipelining MAIL, RCPT and DATA as Postfix does). Prints:

1. single messages, one after another on one session: from the end of DATA (the final dot
   written) to the 250 (median, p99), to the message's arrival at the receiver, and the
   webhook's own time (mailroom_webhook_request_duration_seconds over the same messages);
   target: the 250's median under 10 ms over the webhook's own time;
2. throughput with 8 sessions at once (each its messages one after another): messages per
   second (target: 500 or more on these 2 cores) and mailroom's CPU seconds per 1,000 messages;
3. mailroom's RSS with 1,000 sessions opened and left idle, against before them, and the
   single-message latency meanwhile;
4. the IMAP IDLE path on the same machine (bench/imap_latency.py: Dovecot's IDLE floor and
   mailroom's APPEND OK → webhook arrival), unless ``--no-imap``.

Run with ``.venv/bin/python bench/lmtp.py``. Arrival times are ``time.monotonic()`` in the
receiver's process, comparable with this process's on Linux (CLOCK_MONOTONIC is system-wide).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import imap_latency  # noqa: E402
from bench.observe import Mailroom, Table, cpu_s, load_average, rss_mib, scrape  # noqa: E402
from bench.receiver import Receiver  # noqa: E402
from tests.helpers import config_dict, message  # noqa: E402
from tests.lmtp import address, dotted, greets, lmtp_box  # noqa: E402
from tests.servers.dovecot import Dovecot, free_port  # noqa: E402

SAMPLES = 300
WARMUP = 30
SESSIONS = 8
PER_SESSION = 500
IDLE = 1000
MESSAGE_BYTES = 2048
STEP_TIMEOUT_S = 30.0
HISTOGRAM = "mailroom_webhook_request_duration_seconds"


class Session:
    """One LMTP session: LHLO once, then transactions with MAIL, RCPT and DATA pipelined."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Session:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        session = cls(reader, writer)
        await session.reply()  # the greeting
        writer.write(b"LHLO bench.example.org\r\n")
        await session.reply()
        return session

    async def reply(self) -> str:
        async with asyncio.timeout(STEP_TIMEOUT_S):
            while True:
                line = (await self.reader.readline()).decode()
                if not line:
                    raise RuntimeError("the listener closed the session")
                if line[3:4] != "-":
                    return line.rstrip("\r\n")

    async def send(self, recipient: str, data: bytes) -> tuple[float, float, str]:
        """One message: (end of DATA, 250 read, webhook-id), times in time.monotonic(); the
        end of DATA is when the final dot is written."""
        self.writer.write(
            f"MAIL FROM:<bench@example.org> SIZE={len(data)}\r\nRCPT TO:<{recipient}>\r\n"
            "DATA\r\n".encode()
        )
        for expected in ("250", "250", "354"):
            line = await self.reply()
            if not line.startswith(expected):
                raise RuntimeError(f"expected {expected}, got {line!r}")
        body, end = data[:-3], data[-3:]  # the message, then its final dot
        self.writer.write(body)
        await self.writer.drain()
        ended = time.monotonic()
        self.writer.write(end)
        line = await self.reply()
        answered = time.monotonic()
        if not line.startswith("250 2.0.0 msg_"):
            raise RuntimeError(f"not delivered: {line!r}")
        return ended, answered, line.split()[2]

    def close(self) -> None:
        self.writer.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def describe(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"median {statistics.median(ms):.2f} ms, p99 {percentile(ms, 0.99):.2f} ms "
        f"(min {min(ms):.2f}, max {max(ms):.2f}, n={len(ms)})"
    )


def webhook_time(before: dict[str, float], after: dict[str, float]) -> float:
    """Mean webhook request time between two scrapes."""
    count = after[f"{HISTOGRAM}_count"] - before[f"{HISTOGRAM}_count"]
    return (after[f"{HISTOGRAM}_sum"] - before[f"{HISTOGRAM}_sum"]) / max(1.0, count)


async def single(
    port: int, receiver: Receiver, count: int, first: int
) -> tuple[list[float], list[float]]:
    """``count`` messages one after another: (DATA end → 250, DATA end → arrival)."""
    session = await Session.open(port)
    ends, replies, ids = [], [], []
    try:
        for n in range(first, first + count):
            ended, answered, webhook_id = await session.send(
                address(f"s{n}"), dotted(message(n, size=MESSAGE_BYTES))
            )
            ends.append(ended)
            replies.append(answered - ended)
            ids.append(webhook_id)
    finally:
        session.close()
    arrivals = await asyncio.to_thread(receiver.times, ids)
    return replies, [a - e for a, e in zip(arrivals, ends, strict=True) if a is not None]


async def throughput(port: int) -> float:
    """``SESSIONS`` sessions at once, ``PER_SESSION`` messages each: the seconds it took."""
    sessions = [await Session.open(port) for _ in range(SESSIONS)]
    data = [dotted(message(100_000 + n, size=MESSAGE_BYTES)) for n in range(PER_SESSION)]

    async def run(index: int, session: Session) -> None:
        for n in range(PER_SESSION):
            await session.send(address(f"t{index}-{n}"), data[n])

    started = time.monotonic()
    await asyncio.gather(*(run(i, s) for i, s in enumerate(sessions)))
    elapsed = time.monotonic() - started
    for session in sessions:
        session.close()
    return elapsed


async def benchmark(table: Table, workdir: Path) -> None:
    port, health_port, hook_port = free_port(), free_port(), free_port()
    receiver = Receiver(hook_port)
    config = config_dict([lmtp_box(f"127.0.0.1:{port}", max_connections=IDLE + 100)], receiver.url)
    config["health"] = {"listen": f"127.0.0.1:{health_port}"}
    config["log"] = {"level": "warning"}
    mailroom = Mailroom(config, workdir, health_port, "lmtp")
    mailroom.start()
    try:
        for _ in range(int(STEP_TIMEOUT_S / 0.05)):
            if await greets(port):
                break
            await asyncio.sleep(0.05)
        await single(port, receiver, WARMUP, 0)

        before = scrape(health_port).values
        replies, arrivals = await single(port, receiver, SAMPLES, WARMUP)
        hook_s = webhook_time(before, scrape(health_port).values)
        over = statistics.median(replies) - hook_s
        table.add("LMTP: DATA end -> 250, one message at a time", describe(replies))
        table.add("LMTP: DATA end -> webhook arrival", describe(arrivals))
        table.add(
            "LMTP: the 250's median over the webhook's own time",
            f"{over * 1000:.2f} ms (webhook requests took {hook_s * 1000:.2f} ms on average)",
            "< 10 ms",
            over < 0.010,
        )

        cpu_before = cpu_s(mailroom.pid)
        elapsed = await throughput(port)
        total = SESSIONS * PER_SESSION
        rate = total / elapsed
        cpu = cpu_s(mailroom.pid) - cpu_before
        table.add(
            f"LMTP: {SESSIONS} sessions at once, {total} messages of 2 KB",
            f"{rate:.0f} messages/s ({elapsed:.2f} s)",
            ">= 500 messages/s",
            rate >= 500,
        )
        table.add("LMTP: mailroom's CPU per 1,000 messages", f"{cpu / total * 1000:.2f} CPU-s")

        rss_before = rss_mib(mailroom.pid)
        idle = [await Session.open(port) for _ in range(IDLE)]
        await asyncio.sleep(1.0)  # let the allocations settle before reading RSS
        rss_after = rss_mib(mailroom.pid)
        during, _ = await single(port, receiver, 50, 200_000)
        for session in idle:
            session.close()
        per_kib = (rss_after - rss_before) * 1024 / IDLE
        table.add(
            f"LMTP: RSS with {IDLE} idle sessions",
            f"{rss_after:.1f} MiB (before: {rss_before:.1f} MiB; {per_kib:.1f} KiB a session)",
        )
        table.add(f"LMTP: DATA end -> 250 with {IDLE} idle sessions open", describe(during))
    finally:
        mailroom.stop()
        receiver.close()


def imap_side(table: Table, workdir: Path) -> None:
    with Dovecot() as dovecot:
        dovecot.start()
        floor = imap_latency.idle_floor(dovecot, dovecot.add_user())
        table.add("IMAP: Dovecot's IDLE floor (APPEND OK -> * EXISTS)", describe(floor))
        latency = imap_latency.mailroom_latency(dovecot, workdir)
        table.add("IMAP IDLE: APPEND OK -> webhook arrival", describe(latency))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--no-imap", action="store_true", help="skip the IMAP IDLE comparison")
    args = parser.parse_args()
    print(f"load average before: {load_average()}; {os.cpu_count()} CPUs")
    table = Table()
    with tempfile.TemporaryDirectory(prefix="mailroom-bench-lmtp-") as workdir:
        asyncio.run(benchmark(table, Path(workdir)))
        if not args.no_imap:
            imap_side(table, Path(workdir))
    print()
    table.print()


if __name__ == "__main__":
    main()
