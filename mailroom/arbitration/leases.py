"""This replica's share of the mailboxes: Redis leases start and stop its sources.

A replica watches a mailbox only while it holds that mailbox's lease (a listener, which is not
``leased``, runs on every replica instead: the MTA picks one). Every ``tick`` (at most a
second) the loop:

1. announces the replica (a heartbeat that lives ``lease_ttl``) and counts the live replicas
   (a new replica takes no lease before its second tick, so that replicas started together
   count each other first instead of one taking everything and handing half over);
2. renews its leases every third of ``lease_ttl``. A renewal counts from the moment it was
   *sent*, so ``valid_until`` never runs past what Redis granted;
3. balances: it holds at most ``ceil(mailboxes / live replicas)`` leases. Extras are handed
   over (the source stops like a reload stops it: deliveries finish and settle, LOGOUT, then
   the lease is released, so another replica takes it within a tick); free leases are taken
   up to the share, each replica trying the mailboxes in its own order (rendezvous hashing),
   so they rarely race for the same one.

When renewals fail (Redis down, a partition), each source is stopped gracefully once less than
a third of ``lease_ttl`` is left, and dropped without ceremony just before the lease lapses:
another replica can only take the lease after it lapsed, so two replicas never watch one
mailbox at once. These deadlines are kept by a loop of their own, on the clock alone: a Redis
that hangs (each call may take ``2 * COMMAND_TIMEOUT_S``) cannot delay them. Nothing is acquired
while Redis is unreachable; the replica is not ready, and resumes by itself when Redis answers
again.

A lease of the same mailbox id held for *another* mailbox (its key names another host, port,
user or folder: a second deployment using the same ``arbitration.namespace``) is never taken
over: the mailbox is not ready and says why, and at start mailroom refuses to run
(``conflicts``, exit 2).

After ``done`` (shutting down) nothing is taken or handed over, but the leases held are still
renewed, and their deadlines kept, until ``release_all``: a shutdown's drain may take longer
than a lease lives (``shutdown_timeout`` 20 s, ``lease_ttl`` 15 s), and a lease that lapsed
meanwhile would let another replica fetch and post the messages still in flight here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mailroom.config import Config, MailboxConfig
from mailroom.errors import ArbitrationError
from mailroom.observe.monitor import LeaseChange, Monitor

if TYPE_CHECKING:  # the store (and redis) is imported only where replicas are configured
    from mailroom.arbitration.store import Lease, RedisStore

__all__ = ["Coordinator", "conflicts"]

log = logging.getLogger("mailroom.arbitration")

TICK_MAX_S = 1.0


def _foreign(config: MailboxConfig, lease: Lease | None) -> bool:
    """``lease`` (of ``config``'s id) is held for another mailbox."""
    return lease is not None and lease.held_for_another(config.identity)


def _conflict(config: MailboxConfig, lease: Lease, namespace: str) -> str:
    return (
        f"mailboxes[{config.id}]: its lease in the Redis namespace {namespace!r} is held by "
        f"replica {lease.replica} for another mailbox (another host, port, user or folder "
        "under the same id): two deployments share the namespace; give each its own "
        "arbitration.namespace (docs/scaling.md), or give a changed mailbox a new id"
    )


async def conflicts(config: Config, store: RedisStore) -> list[str]:
    """What ``config``'s mailboxes would collide with in Redis: leases of the same ids held
    for other mailboxes (``ArbitrationError`` when Redis cannot be asked)."""
    holders = await store.holders([m.id for m in config.mailboxes])
    namespace = config.arbitration.namespace
    return [
        _conflict(m, lease, namespace)
        for m in config.mailboxes
        if (lease := holders[m.id]) is not None and _foreign(m, lease)
    ]


@dataclass(slots=True)
class _Held:
    lease: Lease
    valid_until: float  # time.monotonic() when the lease lapses, as far as we know
    stopping: asyncio.Task[None] | None = field(default=None, repr=False)


class Coordinator:
    """Takes and gives up leases for one replica; ``start``/``stop``/``abort`` act on the
    sources (``running.Running``)."""

    def __init__(
        self,
        config: Config,
        store: RedisStore,
        *,
        start: Callable[[list[MailboxConfig]], None],
        stop: Callable[[str, float], Awaitable[None]],
        abort: Callable[[str], None],
        monitor: Monitor | None = None,
    ) -> None:
        self.store = store
        self.replica = store.replica
        self._start = start
        self._stop = stop
        self._abort = abort
        self._monitor = monitor or Monitor()
        self.held: dict[str, _Held] = {}
        self.live = 1
        self.healthy: bool | None = None  # as last logged
        self._lock = asyncio.Lock()  # one renewal or release at a time
        self._left = asyncio.Event()  # release_all: run ends
        self._paused = False  # a reload swaps sources: no lease is taken meanwhile
        self._taking = asyncio.Lock()  # held while leases are taken and their sources started
        self._mailboxes: dict[str, MailboxConfig] = {}
        self._everywhere: set[str] = set()  # not leased: started by the supervisor, ready here
        self._order: dict[str, int] = {}
        self._namespace = config.arbitration.namespace
        self.conflicts: dict[str, str] = {}  # mailbox id → why its lease is another's
        self.ttl_s = config.arbitration.lease_ttl_s
        self.drain_s = config.shutdown_timeout_s
        self.configure(config)

    def holds(self, mailbox: str) -> bool:
        """Whether this replica holds ``mailbox``'s lease and is not giving it up."""
        held = self.held.get(mailbox)
        return held is not None and held.stopping is None

    @property
    def tick_s(self) -> float:
        return min(TICK_MAX_S, self.ttl_s / 5)

    def configure(self, config: Config) -> None:
        """The mailboxes to share (at start and after a reload): those ``leased``; a
        listener runs on every replica (the MTA picks one), without a lease."""
        before = self._mailboxes
        self._mailboxes = {m.id: m for m in config.mailboxes if m.leased}
        self._everywhere = {m.id for m in config.mailboxes if not m.leased}
        for mailbox, held in list(self.held.items()):
            old, new = before.get(mailbox), self._mailboxes.get(mailbox)
            if held.stopping is None and old and new and old.identity != new.identity:
                # Its lease names the old server: given back, taken again under the new one.
                self._hand_over(mailbox, "its host, port, user or folder changed")
        for mailbox in [m for m in self.conflicts if m not in self._mailboxes]:
            self._set_conflict(mailbox, None)
        self.drain_s = config.shutdown_timeout_s
        self._order = {
            m: int.from_bytes(hashlib.sha256(f"{self.replica}\0{m}".encode()).digest()[:8], "big")
            for m in self._mailboxes
        }

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, done: asyncio.Event) -> None:
        """Take and keep this replica's share until ``done``, then keep what is held until
        ``release_all``; never raises."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._keep_deadlines(), name="arbitration:deadlines")
            await self._keep(done)

    async def _keep(self, done: asyncio.Event) -> None:
        next_renew = 0.0
        announced = False  # replicas started together see each other before taking leases
        while not self._left.is_set():
            now = time.monotonic()
            try:
                if not done.is_set():
                    self.live = max(1, await self.store.heartbeat(self.ttl_s))
                if now >= next_renew:
                    await self._renew()
                    next_renew = now + self.ttl_s / 3
                if announced and not done.is_set():
                    await self._balance(done)
                announced = True
                self._set_healthy(True)
            except ArbitrationError as exc:
                next_renew = 0.0  # try to renew at every tick until it works
                self._set_healthy(False, exc)
            self._monitor.leases(len(self.held), self.live)
            self._monitor.expect(set(self.held) | self._everywhere)
            await self._tick()

    async def _keep_deadlines(self) -> None:
        while not self._left.is_set():
            self._enforce_deadlines()
            await self._tick()

    async def _tick(self) -> None:
        try:
            async with asyncio.timeout(self.tick_s):
                await self._left.wait()
        except TimeoutError:
            pass

    def _set_healthy(self, healthy: bool, exc: ArbitrationError | None = None) -> None:
        reason = str(exc) if exc is not None else None
        self._monitor.arbitration(healthy, reason)
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            log.info("arbitration: Redis at %s answers; replica %s", self.store.where, self.replica)
        else:
            level = logging.ERROR if exc is not None and exc.misconfigured else logging.WARNING
            log.log(
                level,
                "arbitration: %s; no new leases; %d held are kept while they last",
                reason,
                len(self.held),
            )

    async def _renew(self) -> None:
        # Under the lock: a release sent while this renewal is on its way would be undone by
        # it (the script takes a vanished key again).
        async with self._lock:
            held = list(self.held.items())  # a lease being handed over is ours until then
            if not held:
                return
            sent = time.monotonic()
            renewed = await self.store.renew([h.lease for _, h in held], self.ttl_s)
        for (mailbox, h), ok in zip(held, renewed, strict=True):
            if self.held.get(mailbox) is not h:
                continue  # handed over or dropped meanwhile
            if ok:
                h.valid_until = sent + self.ttl_s
                continue
            # Not ours any more: it lapsed and another replica took it. Stop at once.
            log.error(
                "%s: the lease is no longer ours (fence %d); stopping the source now",
                mailbox,
                h.lease.fence,
            )
            self._drop(mailbox, h)

    def _share(self) -> int:
        return math.ceil(len(self._mailboxes) / self.live)

    async def _balance(self, done: asyncio.Event) -> None:
        for mailbox in [m for m in self.held if m not in self._mailboxes]:
            self._hand_over(mailbox, "no longer configured")
        active = sorted(
            (m for m, h in self.held.items() if h.stopping is None), key=self._order.__getitem__
        )
        share = self._share()
        for mailbox in active[: max(0, len(active) - share)]:
            self._hand_over(mailbox, f"the share is {share} of {len(self._mailboxes)}")
        wanted = share - min(len(active), share)
        candidates = sorted(
            (m for m in self._mailboxes if m not in self.held),
            key=self._order.__getitem__,
            reverse=True,
        )
        holders = await self.store.holders(candidates)
        for mailbox in candidates:  # at every tick: a reload may have made one ours
            config, lease = self._mailboxes.get(mailbox), holders[mailbox]
            if config is None:  # removed by a reload meanwhile
                continue
            why = None
            if lease is not None and _foreign(config, lease):
                why = _conflict(config, lease, self._namespace)
            self._set_conflict(mailbox, why)
        if wanted <= 0 or done.is_set() or self._paused:
            return
        async with self._taking:
            # A reload may have changed the mailboxes while Redis was asked.
            free = [m for m in candidates if holders[m] is None and m in self._mailboxes]
            started = []
            try:
                for mailbox in (m for m in free if m not in self.held):
                    if wanted <= 0 or done.is_set() or self._paused:
                        break
                    sent = time.monotonic()
                    key = self._mailboxes[mailbox].identity
                    lease = await self.store.acquire(mailbox, self.ttl_s, key)
                    if lease is None:
                        continue  # another replica was quicker
                    self.held[mailbox] = _Held(lease, sent + self.ttl_s)
                    self._monitor.lease_change(LeaseChange.ACQUIRED)
                    log.info("%s: lease taken (fence %d); watching it", mailbox, lease.fence)
                    started.append(self._mailboxes[mailbox])
                    wanted -= 1
            finally:  # Redis failing halfway: the leases taken so far are watched all the same
                if started:
                    self._start(started)

    def _set_conflict(self, mailbox: str, reason: str | None) -> None:
        """Note (or clear) that ``mailbox``'s lease is held for another mailbox."""
        if self.conflicts.get(mailbox) == reason:
            return
        if reason is None:
            del self.conflicts[mailbox]
            log.info("%s: its lease is no longer held for another mailbox", mailbox)
        else:
            self.conflicts[mailbox] = reason
            log.error("%s", reason)
        self._monitor.conflict(mailbox, reason)

    @contextlib.asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """No lease is taken inside (a reload swaps sources and configs); leases being taken
        when it is entered, and their sources started, come first."""
        self._paused = True
        try:
            async with self._taking:
                yield
        finally:
            self._paused = False

    def _hand_over(self, mailbox: str, why: str) -> None:
        held = self.held[mailbox]
        log.info("%s: handing the lease over (%s)", mailbox, why)
        # Renewed meanwhile: the drain may take shutdown_timeout (the deadlines still apply).
        held.stopping = asyncio.create_task(
            self._stop_and_release(mailbox, held, self.drain_s), name=f"handover:{mailbox}"
        )

    @property
    def _safety_s(self) -> float:
        """How long before a lease lapses its source must be gone."""
        return min(1.0, self.ttl_s / 10)

    async def _stop_and_release(self, mailbox: str, held: _Held, timeout_s: float) -> None:
        try:
            await self._stop(mailbox, max(0.1, timeout_s))
        finally:
            if self.held.get(mailbox) is held:
                del self.held[mailbox]
        if time.monotonic() < held.valid_until:
            try:
                async with self._lock:
                    await self.store.release([held.lease])
                self._monitor.lease_change(LeaseChange.RELEASED)
            except ArbitrationError as exc:
                log.warning("%s: lease not released (%s); it lapses by itself", mailbox, exc)

    def _enforce_deadlines(self) -> None:
        """Stop sources whose leases could not be renewed before they lapse."""
        now = time.monotonic()
        for mailbox, held in list(self.held.items()):
            left = held.valid_until - now
            if left <= self._safety_s:
                log.error("%s: the lease lapses now; the source is dropped", mailbox)
                self._drop(mailbox, held)
            elif left < self.ttl_s / 3 and held.stopping is None:
                log.warning(
                    "%s: the lease could not be renewed; stopping the source within %.1fs, "
                    "before the lease lapses",
                    mailbox,
                    left - self._safety_s,
                )
                held.stopping = asyncio.create_task(
                    self._stop_and_release(mailbox, held, left - self._safety_s),
                    name=f"lapse:{mailbox}",
                )

    def _drop(self, mailbox: str, held: _Held) -> None:
        """Stop ``mailbox``'s source at once, without ceremony: its lease is lost or lapsing."""
        self._abort(mailbox)
        if held.stopping is not None:
            held.stopping.cancel()
        del self.held[mailbox]
        self._monitor.lease_change(LeaseChange.LOST)

    async def release_all(self) -> None:
        """After a clean stop: give every lease back and leave, so others take over at once;
        ``run`` ends."""
        self._left.set()
        for held in list(self.held.values()):
            if held.stopping is not None:
                held.stopping.cancel()
        async with self._lock:
            leases = [h.lease for h in self.held.values()]
            self.held.clear()
            try:
                await self.store.release(leases)
                await self.store.heartbeat(0)
            except ArbitrationError as exc:
                log.warning("arbitration: leases not released (%s); they lapse by themselves", exc)
                return
        if leases:
            log.info("arbitration: %d lease(s) released", len(leases))
