"""What bench/many_mailboxes.py uses to watch processes from outside.

- ``/proc/<pid>``: VmRSS and VmHWM (and resetting the latter), utime + stime;
- ``/metrics``: the few series the bench reads, and the event-loop lag histogram;
- ``Mailroom``: ``python -m mailroom -c FILE`` as a process of its own (bench/replicas.py's
  replicas too);
- ``multiappend``, ``Appenders``: MULTIAPPEND (LITERAL+) over connections opened beforehand,
  with the webhook-ids to expect (from APPENDUID's UIDVALIDITY and UIDs); ``big_message``;
- ``profiled``: a CPU-time profile (bench/cpu_profile.py) and ``py-spy record`` (wall time) of
  a process while a block runs, with the CPU profile's summary printed;
- ``Table``: the results, measured against target.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import itertools
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.cpu_profile import summary
from mailroom import identity
from tests.servers.dovecot import Account, Dovecot

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
LAG_METRIC = "mailroom_event_loop_lag_seconds_bucket"

# -- /proc -------------------------------------------------------------------------------------


def status_kib(pid: int, name: str) -> int:
    """A ``kB`` line of /proc/<pid>/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {name} for pid {pid}")


def rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def hwm_mib(pid: int) -> float:
    return status_kib(pid, "VmHWM") / 1024


def reset_hwm(pid: int) -> None:
    """Set VmHWM back to the current RSS (proc(5), clear_refs: "5")."""
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")


def cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_s(tag: bytes, extra_pid: int | None = None) -> float:
    """CPU seconds of every live process whose command line contains ``tag`` (a Dovecot
    instance names all its processes so), and of ``extra_pid``."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            with open(f"/proc/{entry.name}/cmdline", "rb") as file:
                title = file.read()
            if tag in title or entry.name == str(extra_pid):
                total += cpu_s(int(entry.name))
    return total


def wait_quiet(pid: int, timeout_s: float, *, window_s: float = 1.0, share: float = 0.1) -> None:
    """Until the process uses under ``share`` of a core over ``window_s`` (bounded)."""
    deadline = time.monotonic() + timeout_s
    before = cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(window_s)
        after = cpu_s(pid)
        if after - before < share * window_s:
            return
        before = after


@contextlib.contextmanager
def sampling_rss(pid: int, every_s: float = 0.1) -> Iterator[list[float]]:
    """VmRSS samples (MiB), taken in a thread while the block runs."""
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            with contextlib.suppress(OSError, RuntimeError):
                samples.append(rss_mib(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join(5)


@contextlib.contextmanager
def profiled(mailroom: Mailroom, path: Path | None, *, fresh: bool = True) -> Iterator[None]:
    """While the block runs: the CPU-time profile of ``mailroom`` (bench/cpu_profile.py: it
    runs under it when started with ``profile=``) written to ``path``, its summary printed,
    and ``py-spy record`` (wall time: collapsed stacks per thread, 100 Hz) beside it in
    ``<phase>.py-spy.txt`` when py-spy is installed (``.venv/bin/pip install py-spy``). Nothing
    when ``path`` is None. ``fresh=False``: the profile counts from the process's start."""
    if path is None:
        yield
        return
    spy = Path(sys.executable).parent / "py-spy"
    proc = None
    if spy.exists():
        args = [str(spy), "record", "--pid", str(mailroom.pid), "--rate", "100"]
        args += ["--format", "raw", "--nonblocking", "--threads"]
        args += ["--output", str(path.with_suffix(".py-spy.txt"))]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if fresh:
        os.kill(mailroom.pid, signal.SIGUSR1)
    try:
        yield
    finally:
        written = mailroom.profile_written()
        os.kill(mailroom.pid, signal.SIGUSR2)
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        found = written.wait()
        if found is not None:
            found.rename(path)
            print(f"  CPU profile of this phase ({path}):")
            print("\n".join(summary(path)))


# -- /metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lag:
    """Samples of ``mailroom_event_loop_lag_seconds`` per bucket (not cumulative)."""

    bounds: tuple[float, ...]  # upper bounds, ascending, the last one +Inf
    counts: tuple[int, ...]

    @property
    def n(self) -> int:
        return sum(self.counts)

    def without_one_like(self, probe: Lag) -> Lag:
        """Less one sample in the bucket of ``probe``'s largest (or the nearest one that has
        a sample): a scrape blocks the loop, and its own sample lands in the next window."""
        if not probe.n or not self.n:
            return self
        like = max(i for i, count in enumerate(probe.counts) if count)
        have = [i for i, count in enumerate(self.counts) if count]
        drop = min(have, key=lambda i: (abs(i - like), -i))
        return Lag(self.bounds, tuple(c - (i == drop) for i, c in enumerate(self.counts)))

    def longest(self) -> float:
        """The upper bound of the highest bucket with a sample."""
        return max((b for b, c in zip(self.bounds, self.counts, strict=True) if c), default=0.0)

    def quantile(self, q: float) -> float:
        """Linear inside a bucket, as PromQL's histogram_quantile."""
        rank, seen, low = q * self.n, 0, 0.0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            if count and seen + count >= rank:
                if bound == float("inf"):
                    return low
                return low + (bound - low) * (rank - seen) / count
            seen += count
            low = bound
        return low


@dataclass(frozen=True)
class Scrape:
    """The few series of one /metrics scrape that the bench reads."""

    text_bytes: int
    lag_cumulative: tuple[tuple[float, int], ...]  # (le, cumulative count)
    values: dict[str, float]  # name → sum over all its label sets

    def lag_since(self, before: Scrape) -> Lag:
        old = dict(before.lag_cumulative)
        cumulative = [(le, count - old.get(le, 0)) for le, count in self.lag_cumulative]
        counts = [cumulative[0][1]] + [b - a for (_, a), (_, b) in itertools.pairwise(cumulative)]
        return Lag(tuple(le for le, _ in cumulative), tuple(counts))

    def value(self, name: str) -> float:
        return self.values.get(name, 0.0)


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as answer:
        text = answer.read().decode()
    lag: list[tuple[float, int]] = []
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        if name == LAG_METRIC:
            le = re.search(r'le="([^"]+)"', series)
            assert le is not None
            lag.append((float(le.group(1)), round(float(value))))
        else:
            values[name] = values.get(name, 0.0) + float(value)
    return Scrape(len(text), tuple(sorted(lag)), values)


# -- mailroom ----------------------------------------------------------------------------------


class Mailroom:
    """``python -m mailroom -c FILE``, its config and log in ``workdir``."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        health_port: int,
        name: str,
        *,
        profile: bool = False,
    ) -> None:
        self.path = workdir / f"{name}.yml"
        self.path.write_text(yaml.safe_dump(config))
        self.log = workdir / f"{name}.log"
        self.health_port = health_port
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        # Under bench/cpu_profile.py, which writes a profile per SIGUSR2 to <profile>.<n>.
        self.profile = workdir / f"{name}.profile" if profile else None
        self._profiles = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.started = time.monotonic()
            under = ["-m", "bench.cpu_profile"] if self.profile is not None else []
            env = dict(os.environ)
            if self.profile is not None:
                env["MAILROOM_BENCH_PROFILE"] = str(self.profile)
            self.proc = subprocess.Popen(
                [sys.executable, *under, "-m", "mailroom", "-c", str(self.path)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"mailroom exited with {self.proc.returncode}; see {self.log}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def scrape(self) -> Scrape:
        return scrape(self.health_port)

    def profile_written(self) -> _Awaited:
        """The file the next SIGUSR2 makes bench/cpu_profile.py write (None: not profiled)."""
        if self.profile is None:
            return _Awaited(None)
        self._profiles += 1
        return _Awaited(Path(f"{self.profile}.{self._profiles}"))

    def log_levels(self) -> dict[str, int]:
        """Log lines by level (the JSON log format)."""
        counts: dict[str, int] = {}
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                level = str(json.loads(line).get("level", "?"))
            except (json.JSONDecodeError, AttributeError):
                level = "not JSON"
            counts[level] = counts.get(level, 0) + 1
        return counts


@dataclass(frozen=True)
class _Awaited:
    path: Path | None

    def wait(self, timeout_s: float = 30) -> Path | None:
        """The file once it exists (bounded), or None."""
        if self.path is None:
            return None
        deadline = time.monotonic() + timeout_s
        while not self.path.exists():
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        return self.path


# -- appending ---------------------------------------------------------------------------------


def multiappend(conn: imaplib.IMAP4, raws: list[bytes]) -> tuple[int, list[int]]:
    """One MULTIAPPEND (LITERAL+) to INBOX: (UIDVALIDITY, UIDs) from its APPENDUID."""
    tag = b"B" + secrets.token_hex(4).encode()
    parts = [tag + b" APPEND INBOX"]
    for raw in raws:
        parts.append(b" {%d+}\r\n" % len(raw) + raw)
    conn.send(b"".join(parts) + b"\r\n")
    for _ in range(10_000):  # bounded: a few untagged lines at most
        line = conn.readline()
        if not line:
            raise RuntimeError("connection closed during APPEND")
        if line.startswith(tag + b" "):
            match = re.search(rb"\[APPENDUID (\d+) ([0-9:,]+)\]", line)
            if not line.startswith(tag + b" OK") or match is None:
                raise RuntimeError(f"APPEND failed: {line!r}")
            uids: list[int] = []
            for part in match.group(2).decode().split(","):
                low, _, high = part.partition(":")
                uids.extend(range(int(low), int(high or low) + 1))
            return int(match.group(1)), uids
    raise RuntimeError("no tagged APPEND response")


def expected_id(dovecot: Dovecot, account: Account, raw: bytes, port: int) -> str:
    """The webhook-id mailroom gives ``raw`` in ``account``'s INBOX watched on ``port``
    (``mailroom.identity``: the mailbox's server identity and the message's bytes)."""
    mailbox = identity.mailbox_key("imap", dovecot.host.lower(), str(port), account.user, "INBOX")
    return identity.webhook_id(mailbox, identity.content(raw))


class Appenders:
    """One logged-in connection per account, opened before any clock starts (each login is a
    process fork in Dovecot: a thousand of them would measure Dovecot, not mailroom)."""

    def __init__(
        self, dovecot: Dovecot, accounts: list[Account], *, port: int, threads: int = 16
    ) -> None:
        self.pool = ThreadPoolExecutor(threads)
        self.dovecot = dovecot
        self.port = port  # the port mailroom watches the accounts on (it names the mailbox)

        def login(account: Account) -> imaplib.IMAP4:
            conn = imaplib.IMAP4(dovecot.host, dovecot.port, timeout=120)
            conn.login(account.user, account.password)
            return conn

        self.conns = dict(zip(accounts, self.pool.map(login, accounts), strict=True))

    def append(self, batches: dict[Account, list[bytes]]) -> list[str]:
        """One MULTIAPPEND per account, all at once; the webhook-ids to expect."""

        def one(account: Account) -> list[str]:
            multiappend(self.conns[account], batches[account])
            return [expected_id(self.dovecot, account, raw, self.port) for raw in batches[account]]

        return [key for keys in self.pool.map(one, batches) for key in keys]

    def close(self) -> None:
        def logout(conn: imaplib.IMAP4) -> None:
            with contextlib.suppress(imaplib.IMAP4.error, OSError):
                conn.logout()

        list(self.pool.map(logout, self.conns.values()))
        self.pool.shutdown()


def big_message(size: int) -> bytes:
    """A text part and a base64 attachment, about ``size`` bytes in all."""
    head = (
        "From: Big Sender <big@example.org>\r\nTo: incoming+big@example.com\r\n"
        f"Subject: a big one\r\nMessage-ID: <big.{time.time_ns()}@example.org>\r\n"
        "Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee the attachment.\r\n"
        "--b1\r\nContent-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="big.bin"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    tail = b"--b1--\r\n"
    data = base64.b64encode(random.randbytes((size - len(head) - len(tail)) // 78 * 57))
    return head + b"".join(data[i : i + 76] + b"\r\n" for i in range(0, len(data), 76)) + tail


# -- results -----------------------------------------------------------------------------------

HEADER = ("measurement", "measured", "target", "")


@dataclass
class Table:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, what: str, measured: str, target: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("ok" if ok else "MISSED")
        self.rows.append((what, measured, target, verdict))
        print(f"  {what}: {measured}" + (f" (target {target}: {verdict})" if target else ""))
        sys.stdout.flush()

    def print(self) -> None:
        widths = [max(len(row[i]) for row in [*self.rows, HEADER]) for i in range(4)]
        for row in [HEADER, tuple("-" * w for w in widths), *self.rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
