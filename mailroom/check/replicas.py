"""``mailroom check`` of Redis: the replicas' (it answers, and who holds which lease), and the
Sidekiq queues of ``delivery_method: sidekiq`` (they answer; how many jobs wait)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from mailroom import arbitration
from mailroom.check.report import Finding, Report, Status, Target
from mailroom.config import Config, webhook_labels

if TYPE_CHECKING:
    from mailroom.arbitration.store import RedisQueue

__all__ = ["run", "sidekiq"]


async def sidekiq(report: Report, config: Config) -> None:
    """Each Sidekiq queue answers (``LLEN``, which changes nothing)."""
    queues = arbitration.JobQueues()
    try:
        for hook, label in webhook_labels(m.webhook for m in config.mailboxes).items():
            settings = hook.sidekiq
            if settings is None:
                continue
            queue = queues(settings.redis)

            async def waiting(queue: RedisQueue = queue, key: str = settings.key) -> Finding:
                count = await queue.length(key)
                return Status.OK, f"Redis answers; {count} job(s) waiting in {key}"

            await Target(report, f"webhook[{label}]").run("sidekiq", waiting)
    finally:
        await queues.close()


async def run(report: Report, config: Config) -> None:
    """Connect as a replica would (it takes no lease), and show the leases."""
    settings = config.arbitration
    if not settings.enabled:
        return
    store = arbitration.redis_store(settings)
    target = Target(report, f"arbitration[{settings.describe()}]")
    ids = [m.id for m in config.mailboxes if m.leased]  # a listener runs on every replica

    async def connect() -> Finding:
        await store.ping()
        live = await store.heartbeat(0)  # counts without joining
        return Status.OK, f"Redis answers; {live} replica(s) live (namespace {settings.namespace})"

    async def leases() -> Finding:
        holders = await store.holders(ids)
        held = {m: lease for m, lease in holders.items() if lease is not None}
        foreign = await arbitration.conflicts(config, store)  # another deployment's leases
        for problem in foreign:
            report.add(target.name, "lease", Status.FAIL, problem)
        for mailbox, lease in held.items():
            report.add(
                target.name, "lease", Status.OK, f"{mailbox}: {lease.replica} (fence {lease.fence})"
            )
        per_replica = Counter(lease.replica for lease in held.values())
        spread = ", ".join(f"{r}: {n}" for r, n in sorted(per_replica.items())) or "none"
        free = len(ids) - len(held)
        status: Status = Status.OK if free == 0 else Status.WARN
        return status, f"{len(held)} of {len(ids)} mailboxes watched ({spread}); {free} free"

    try:
        await target.run("connect", connect)
        await target.run("leases", leases)
    finally:
        await store.close()
