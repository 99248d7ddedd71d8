"""Replicas sharing mailboxes through Redis (docs/scaling.md, "Replicas"): ``store`` holds what they
share and is the only module importing redis; ``leases`` runs this replica's share.

``store`` (and with it redis, 8 MiB) is imported only when it is first needed: by ``store()``
where replicas are configured, by ``JobQueues`` for a Sidekiq delivery; elsewhere its names are
for type checking (issue 23)."""

from __future__ import annotations

import os
import secrets
import socket
from typing import TYPE_CHECKING

from mailroom.arbitration.leases import Coordinator, conflicts
from mailroom.config import ArbitrationConfig

if TYPE_CHECKING:
    from mailroom.arbitration.store import RedisQueue, RedisStore

__all__ = ["Coordinator", "JobQueues", "conflicts", "redis_store", "replica_id"]


def replica_id() -> str:
    """This process among the replicas: host, pid and a random part (a restarted process is a
    new replica)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def redis_store(config: ArbitrationConfig) -> RedisStore:
    """The Redis side for this process."""
    from mailroom.arbitration.store import RedisStore  # noqa: PLC0415  # here: redis, 8 MiB

    return RedisStore(config, replica=replica_id())


class JobQueues:
    """The Sidekiq Redis of each config, built once (two mailboxes on one Redis share it)."""

    def __init__(self) -> None:
        self._queues: dict[ArbitrationConfig, RedisQueue] = {}

    def __call__(self, config: ArbitrationConfig) -> RedisQueue:
        queue = self._queues.get(config)
        if queue is None:
            from mailroom.arbitration.store import RedisQueue  # noqa: PLC0415  # redis, 8 MiB

            queue = self._queues[config] = RedisQueue(config)
        return queue

    async def close(self) -> None:
        for queue in self._queues.values():
            await queue.close()
        self._queues.clear()
