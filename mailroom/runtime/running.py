"""The mailboxes of one ``supervisor.run``: each source started, stopped, dropped, reloaded.

``Running.start`` builds a source per mailbox (its kind's, ``SourceKinds.source``, on the shared
``Resources``) and runs it as its own task, supervised by the ``Source`` lifecycle. ``stop``
stops one like a shutdown of its own (its deliveries finish and settle, then LOGOUT), within a
deadline when a lease lapses; ``abort`` drops one at once (its lease is gone). ``reload`` applies
a new config in two phases (build everything first; then stop, start and swap), and
``shutdown`` drains the dispatcher and closes every source, bounded. With replicas, the
``Coordinator``'s leases call ``start``, ``stop`` and ``abort``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable

from mailroom import logs
from mailroom.arbitration import Coordinator
from mailroom.config import Config, LogConfig, MailboxConfig
from mailroom.delivery.dispatch import Dispatcher, Prepared
from mailroom.errors import ConfigError
from mailroom.observe.health import Health
from mailroom.runtime.resources import Resources, SourceKinds, Wiring
from mailroom.sources.lifecycle import wait_any

__all__ = ["Running", "configure_logs"]

log = logging.getLogger("mailroom")

# After the dispatcher drained: time for sources to apply settlements and LOGOUT.
SOURCE_CLOSE_TIMEOUT_S = 10.0
# Mailbox settings only the dispatcher reads: changing them restarts no connection.
DISPATCH_ONLY = frozenset({"webhook", "routing"})
# Mailboxes started together begin within this spread (per mailbox, up to the cap), so their
# first sweeps and polls do not all land in the same instant.
STAGGER_PER_MAILBOX_S = 0.002
STAGGER_MAX_S = 2.0


def configure_logs(log: LogConfig) -> None:
    """``logs.configure`` for ``log``; a log file that cannot be opened is a ``ConfigError``
    naming the setting it came from."""
    files = [(file.path, file.mailboxes) for file in log.files]
    try:
        logs.configure(log.format, log.level, files=files)
    except OSError as exc:
        failed = next(f for f in log.files if f.path == exc.filename) if exc.filename else None
        origin = failed.origin if failed is not None else "log.file"
        raise ConfigError(
            origin,
            f"cannot open {exc.filename} to log to: {exc.strerror}; create its directory, or "
            "make it writable for the user mailroom runs as",
        ) from exc


def _connection(config: MailboxConfig) -> tuple[object, ...]:
    """What a source's connection depends on (``Secret`` compares by value)."""
    fields = dataclasses.fields(config)
    return (type(config), *(getattr(config, f.name) for f in fields if f.name not in DISPATCH_ONLY))


class _Mailbox:
    """One source task with stop and drain events of its own, so that a reload can stop it
    alone. The source's own ``run`` is its one restart loop."""

    def __init__(self, config: MailboxConfig, kinds: SourceKinds, wiring: Wiring) -> None:
        self.stopping = wiring.stopping
        self.drained = wiring.drained
        self.source = kinds.source(config, wiring)
        self.name = f"{config.kind}:{config.id}"
        self.task: asyncio.Task[None] | None = None

    async def run(self, delay_s: float) -> None:
        if delay_s > 0:
            await wait_any((self.stopping,), timeout_s=delay_s)
        try:
            await self.source.run()
        except Exception:  # Source.run never raises; were it to, the others carry on
            log.exception("%s: the source ended with an error; not restarted", self.source.id)

    async def close(self, timeout_s: float = SOURCE_CLOSE_TIMEOUT_S) -> None:
        """After its deliveries were drained: apply settlements, LOGOUT and end (bounded)."""
        self.stopping.set()
        self.drained.set()
        if self.task is None:  # never started: nothing to wait for
            return
        _, late = await asyncio.wait({self.task}, timeout=timeout_s)
        if late:
            log.warning("%s did not close within %.1fs; cancelling", self.name, timeout_s)
            self.abort()
            await asyncio.wait({self.task}, timeout=1.0)  # its last events come before a restart

    def abort(self) -> None:
        """Drop the source at once: no settlement, no LOGOUT (its lease is lapsing)."""
        self.stopping.set()
        self.drained.set()
        if self.task is not None:
            self.task.cancel()


class Running:
    """The mailboxes of one ``supervisor.run``: started, stopped, reloaded, shut down."""

    def __init__(
        self,
        config: Config,
        dispatcher: Dispatcher,
        health: Health,
        resources: Resources,
        group: asyncio.TaskGroup,
    ) -> None:
        self.config = config
        self.kinds = resources.kinds
        self.dispatcher = dispatcher
        self.health = health
        self.resources = resources
        self.group = group
        self.mailboxes: dict[str, _Mailbox] = {}
        self.retiring: list[_Mailbox] = []  # being stopped by a reload or a handover
        self.coordinator: Coordinator | None = None  # replicas: leases decide what runs here

    def start(self, configs: list[MailboxConfig]) -> None:
        spread = min(STAGGER_MAX_S, STAGGER_PER_MAILBOX_S * len(configs)) if len(configs) > 1 else 0
        for config in configs:
            self.health.starting(config.id)
            self.dispatcher.open(config.id)
            wiring = Wiring(
                submit=self.dispatcher.submit,
                stopping=asyncio.Event(),
                drained=asyncio.Event(),
                monitor=self.health,
                resources=self.resources,
            )
            mailbox = _Mailbox(config, self.kinds, wiring)
            self.mailboxes[config.id] = mailbox
            delay = random.uniform(0, spread)
            mailbox.task = self.group.create_task(mailbox.run(delay), name=mailbox.name)

    async def stop(self, mailbox_id: str, timeout_s: float | None = None) -> None:
        """Stop one mailbox like a shutdown: its deliveries finish and settle, then LOGOUT;
        within ``timeout_s`` in all when given (a lease that lapses)."""
        mailbox = self.mailboxes.pop(mailbox_id, None)
        if mailbox is None:
            return
        self.retiring.append(mailbox)
        self.health.stopping(mailbox_id)
        mailbox.stopping.set()
        started = time.monotonic()
        drain_s = self.config.shutdown_timeout_s
        if timeout_s is None:
            await self.dispatcher.drain_mailbox(mailbox_id, drain_s)
            await mailbox.close()
        else:
            # Deliveries get most of the time; settlements and LOGOUT the rest.
            await self.dispatcher.drain_mailbox(mailbox_id, min(drain_s, timeout_s * 0.8))
            left = timeout_s - (time.monotonic() - started)
            await mailbox.close(max(0.05, left))
        # Not in a ``finally``: a stop cancelled halfway (a SIGTERM during a reload) leaves
        # its source waiting for the drain, and ``shutdown`` must still close it.
        if mailbox in self.retiring:  # else ``abort`` dropped it meanwhile
            self.retiring.remove(mailbox)

    def abort(self, mailbox_id: str) -> None:
        """Drop one mailbox's source at once (its lease lapses or is gone)."""
        mailbox = self.mailboxes.pop(mailbox_id, None)
        for each in [m for m in self.retiring if m.source.id == mailbox_id]:
            each.abort()
            self.retiring.remove(each)
        if mailbox is not None:
            self.health.stopping(mailbox_id)
            mailbox.abort()

    async def reload(self, load: Callable[[], Config] | None) -> None:
        """Load the config again and apply the difference; refuse an invalid one."""
        prepared = await self._prepare(load)
        if prepared is None:
            return
        old, new = self.config, prepared.config
        self.config = new  # phase two: apply
        before = {m.id: m for m in old.mailboxes}
        after = {m.id: m for m in new.mailboxes}
        removed = [i for i in before if i not in after]
        changed = [
            i for i in before if i in after and _connection(before[i]) != _connection(after[i])
        ]
        added = [i for i in after if i not in before]
        if self.coordinator is not None:  # leases start mailboxes; only a running one restarts
            changed = [i for i in changed if i in self.mailboxes]
        starting = await self._swap(prepared, removed, changed, added)
        await self._reloaded(old)
        log.info(
            "config reloaded: %d mailbox(es) started, %d restarted, %d stopped, %d unchanged",
            len(added),
            len([i for i in starting if i in before]),
            len(removed),
            len(after) - len(added) - len(changed),
        )

    async def _prepare(self, load: Callable[[], Config] | None) -> Prepared | None:
        """Phase one: load the new config and build everything it needs, changing nothing
        yet; None (and the reason logged) when it is refused."""
        if load is None:
            log.warning("reload: mailroom was not started from a config file; nothing to reload")
            return None
        try:
            new = await asyncio.to_thread(load)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: config error: %s", exc)
            return None
        except Exception:
            log.exception("reload refused, the running config stays: cannot load the config")
            return None
        try:
            self.resources.prepare(new)
            return self.dispatcher.prepare(new)
        except Exception as exc:
            log.error("reload refused, the running config stays: %s: %s", type(exc).__name__, exc)
            await self.resources.retain(self.config)
            return None

    async def _swap(
        self, prepared: Prepared, removed: list[str], changed: list[str], added: list[str]
    ) -> list[str]:
        """Stop the removed and changed mailboxes, take the new config, start the changed and
        added ones; returns those started here."""
        new = prepared.config
        after = {m.id: m for m in new.mailboxes}
        starting = [*changed, *added]
        leases = self.coordinator
        # With replicas, no lease starts a source (on either config) while sources are swapped.
        async with leases.paused() if leases is not None else contextlib.nullcontext():
            # A removed mailbox stops here, with replicas too (``stop`` ignores one not running
            # here): the dispatcher's new config no longer knows it, so its source must not
            # hand out more mail until the lease's handover at the coordinator's next tick.
            await asyncio.gather(*(self.stop(i) for i in [*removed, *changed]))
            if leases is not None:
                # A lease lost or handed over during the stop belongs to another replica now.
                starting = [i for i in changed if leases.holds(i)]
                for mailbox_id in (i for i in changed if i not in starting):
                    log.info("%s: not restarted: its lease was given up meanwhile", mailbox_id)
            self.dispatcher.apply(prepared)
            self.health.configure(new)
            self.resources.apply_limits(new)
            for mailbox_id in removed:
                self.health.forget(mailbox_id)
            self.start([after[i] for i in starting])
            if leases is not None:
                leases.configure(new)
        return starting

    async def _reloaded(self, old: Config) -> None:
        """After the swap: close what only ``old`` used, apply the new log settings, and say
        what takes effect only after a restart."""
        new = self.config
        if self.coordinator is not None and new.arbitration != old.arbitration:
            log.warning("reload: a changed arbitration block takes effect after a restart")
        await self.resources.retain(new)
        if new.log != old.log:
            try:
                configure_logs(new.log)
            except ConfigError as exc:
                log.error("reload: the log settings stay as they were: %s", exc)
        listen = [(h.host, h.port) if h else None for h in (old.health, new.health)]
        if listen[0] != listen[1]:
            log.warning("reload: a changed health.listen takes effect after a restart")
        for warning in new.warnings:
            logging.getLogger("mailroom.config").warning("config: %s", warning)

    async def shutdown(self) -> int:
        """Stop the sources, drain the dispatcher (bounded), then close the sources."""
        self.health.stopping()
        everything = [*self.mailboxes.values(), *self.retiring]
        for mailbox in everything:
            mailbox.stopping.set()
        timeout_s = self.config.shutdown_timeout_s
        log.info("stopping: draining deliveries (up to %.0fs)", timeout_s)
        drain = self.group.create_task(self.dispatcher.drain(timeout_s), name="dispatch")
        abandoned = await drain
        await asyncio.gather(*(mailbox.close() for mailbox in everything))
        return abandoned
