"""Replicas sharing mailboxes through Redis (docs/scaling.md, "Replicas"): ``store`` holds what they
share and is the only module importing redis; ``leases`` runs this replica's share."""

from __future__ import annotations

import os
import secrets
import socket

from mailroom.arbitration.leases import Coordinator
from mailroom.arbitration.store import JobQueues, Lease, RedisQueue, RedisStore
from mailroom.config import ArbitrationConfig

__all__ = [
    "Coordinator",
    "JobQueues",
    "Lease",
    "RedisQueue",
    "RedisStore",
    "replica_id",
    "store",
]


def replica_id() -> str:
    """This process among the replicas: host, pid and a random part (a restarted process is a
    new replica)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def store(config: ArbitrationConfig) -> RedisStore:
    """The Redis side for this process."""
    return RedisStore(config, replica=replica_id())
