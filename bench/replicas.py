"""Replicas on Redis, measured: 1,000 IMAP mailboxes over 1, 2 and 4 replicas (loopback only).

For each replica count, on one private Dovecot and one private Redis:

1. start the replicas (``python -m mailroom`` processes, the same config, their own health
   ports) and time until every mailbox is watched: each of the 1,000 users has exactly one IDLE
   session in Dovecot (its process titles) and the replicas' ``mailroom_leases_held`` sum to
   1,000; then the balance (leases per replica);
2. Redis commands per second at rest (``INFO stats``, over ``REST_S`` seconds);
3. with 2 or more replicas: SIGKILL the replica holding the most leases, and time until all its
   mailboxes are IDLE again on the others (its leases lapse after ``lease_ttl``).

Run with ``make bench`` (or ``.venv/bin/python bench/replicas.py [--mailboxes N]``). Every wait
is bounded; the mailboxes are empty (no webhook is called).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.observe import Mailroom, scrape  # noqa: E402
from tests.helpers import config_dict, mailbox_dict  # noqa: E402
from tests.servers.dovecot import Account, Dovecot, free_port  # noqa: E402
from tests.servers.redis import RedisServer  # noqa: E402

LEASE_TTL_S = 15.0  # the default
REST_S = 10.0
WAIT_S = 180.0
# Dovecot runs one imap process per session: room for every mailbox, and logins in parallel.
DOVECOT_LIMITS = """
default_process_limit = 3000
default_client_limit = 12000
default_vsz_limit = 512M
service imap {
  process_limit = 3000
}
service imap-login {
  process_limit = 64
  client_limit = 1000
  service_count = 0
}
"""


def replica(config: dict[str, Any], workdir: Path, name: str) -> Mailroom:
    """One ``python -m mailroom`` of the set, started, with its own health port."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = Mailroom({**config, "health": {"listen": f"127.0.0.1:{port}"}}, workdir, port, name)
    process.start()
    return process


def leases(process: Mailroom) -> int:
    """Its ``mailroom_leases_held``; 0 while it does not answer (starting, or killed)."""
    try:
        return int(scrape(process.health_port).value("mailroom_leases_held"))
    except OSError:
        return 0


def idle_users(dovecot: Dovecot) -> Counter[str]:
    return Counter(user for user, command in dovecot.sessions() if command == "IDLE")


def wait_for(check: Any, what: str, timeout_s: float = WAIT_S) -> float:
    """Poll ``check`` every 50 ms until true; the seconds it took (bounded)."""
    started = time.monotonic()
    for _ in range(int(timeout_s / 0.05) + 1):
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def redis_commands(redis: RedisServer) -> int:
    out = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "INFO", "stats"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    match = re.search(r"total_commands_processed:(\d+)", out)
    assert match, out
    return int(match.group(1))


def run(count: int, dovecot: Dovecot, accounts: list[Account], workdir: Path) -> dict[str, Any]:
    with RedisServer() as redis:
        boxes = [mailbox_dict(dovecot, a, port=dovecot.port, ssl=False, ca_file=None)
                 for a in accounts]  # fmt: skip
        config = config_dict(boxes, "http://127.0.0.1:9/")
        config["arbitration"] = {"method": "redis", "url": redis.url, "lease_ttl": LEASE_TTL_S}
        config["log"] = {"format": "json", "level": "warning"}
        expected = Counter({a.user: 1 for a in accounts})
        started = time.monotonic()
        replicas = [replica(config, workdir, f"r{count}-{i}") for i in range(count)]
        try:
            watched = wait_for(
                lambda: (
                    idle_users(dovecot) == expected
                    and sum(leases(r) for r in replicas) == len(accounts)
                ),
                "every mailbox watched once",
            )
            result: dict[str, Any] = {
                "replicas": count,
                "watched_s": watched,
                "balance": sorted(leases(r) for r in replicas),
            }
            settle = wait_for(
                lambda: max(leases(r) for r in replicas) <= -(-len(accounts) // count),
                "the share",
            )
            result["balanced_s"] = watched + settle
            result["balance"] = sorted(leases(r) for r in replicas)
            before = redis_commands(redis)
            time.sleep(REST_S)
            result["redis_per_s"] = (redis_commands(redis) - before - 1) / REST_S
            if count > 1:
                victim = max(replicas, key=leases)
                lost = leases(victim)
                killed = time.monotonic()
                victim.stop(signal.SIGKILL)
                replicas.remove(victim)
                result["failover_s"] = (
                    time.monotonic()
                    - killed
                    + wait_for(
                        lambda: idle_users(dovecot) == expected, "the victim's mailboxes again"
                    )
                )
                result["failover_mailboxes"] = lost
            result["total_s"] = time.monotonic() - started
            return result
        finally:
            for process in replicas:
                process.stop()
            wait_for(lambda: not idle_users(dovecot), "all sessions closed", 60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mailboxes", type=int, default=1000)
    parser.add_argument("--replicas", default="1,2,4")
    args = parser.parse_args()
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"mailroom-bench-replicas-{os.getpid()}"
    with Dovecot(extra_config=DOVECOT_LIMITS) as dovecot:
        dovecot.start()
        accounts = [dovecot.add_user() for _ in range(args.mailboxes)]
        print(f"{args.mailboxes} IMAP mailboxes, lease_ttl {LEASE_TTL_S:g} s, one machine")
        print(
            f"{'replicas':>8}  {'all watched':>11}  {'balanced':>8}  {'leases each':<20}  "
            f"{'failover':>8}  {'Redis cmd/s at rest':>19}"
        )
        for count in (int(n) for n in args.replicas.split(",")):
            r = run(count, dovecot, accounts, workdir)
            failover = f"{r['failover_s']:.1f} s" if "failover_s" in r else "-"
            print(
                f"{count:>8}  {r['watched_s']:>9.1f} s  {r['balanced_s']:>6.1f} s  "
                f"{','.join(map(str, r['balance'])):<20}  {failover:>8}  {r['redis_per_s']:>19.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
