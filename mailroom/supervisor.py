"""Owns the TaskGroup, the signals, reloads and the bounded, ordered shutdown.

Tasks: ``imap:<mailbox>`` per IMAP mailbox, ``graph:<mailbox>`` per Microsoft Graph mailbox,
``health`` and ``dispatch`` (the drain). Each source is supervised on its own (the shared
``Source`` lifecycle): a mailbox that fails (bad password, server down, a bug) is logged and
retried with backoff and never stops the others. What sources share (the in-flight budget, the
connect limit, token providers, Graph sessions, TLS contexts) is in ``Resources``.

Shutdown on SIGTERM/SIGINT (a second SIGINT forces exit):

1. the stop event is set; sources stop sweeping and idling but keep their connections;
2. the dispatcher stops accepting and gives in-flight deliveries ``shutdown_timeout`` seconds,
   then cancels the rest and says how many were abandoned (they stay unread on the server);
3. sources apply the settlements that came in, LOGOUT and end (bounded as well).

SIGHUP reloads the config file in two phases. First everything the new config needs is built
(the config itself, TLS contexts, token providers, sessions, webhooks); if anything fails, the
error is logged and the running config stays untouched. Then the difference is applied:
mailboxes whose connection settings changed restart, new ones start, removed ones stop (each
like a shutdown of its own: its deliveries finish and settle, then LOGOUT), and the others keep
their connections. Changes to ``webhook``, routing, ``reject_notices``, ``limits``, ``log``
and ``shutdown_timeout`` apply at once; ``health.listen`` only after a restart. A SIGTERM
during a reload is honoured at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mailroom import arbitration as replicas
from mailroom import logs
from mailroom.arbitration import Coordinator
from mailroom.backoff import backoff_delay
from mailroom.config import Config, ImapMailboxConfig, MailboxConfig
from mailroom.dispatch import Dispatcher
from mailroom.errors import ConfigError
from mailroom.health import Health, HealthServer
from mailroom.resources import Resources
from mailroom.sources.graph import GraphPoller
from mailroom.sources.imap import ImapWatcher
from mailroom.sources.lifecycle import Source, wait_any

__all__ = ["run"]

log = logging.getLogger("mailroom")

# After the dispatcher drained: time for sources to apply settlements and LOGOUT.
SOURCE_CLOSE_TIMEOUT_S = 10.0
# Mailbox settings only the dispatcher reads: changing them restarts no connection.
DISPATCH_ONLY = frozenset({"webhook", "routing"})
# Mailboxes started together begin within this spread (per mailbox, up to the cap), so their
# first sweeps and polls do not all land in the same instant.
STAGGER_PER_MAILBOX_S = 0.002
STAGGER_MAX_S = 2.0


def _install_signals(stop: asyncio.Event, reload: asyncio.Event) -> list[signal.Signals]:
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            if not stop.is_set():
                log.info("SIGHUP received: reloading the config")
                reload.set()
            return
        if stop.is_set() and sig == signal.SIGINT:
            log.error("second SIGINT: exiting now; unsettled messages will be delivered again")
            os._exit(130)
        log.info("%s received: stopping", sig.name)
        stop.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except RuntimeError:  # not the main thread (asyncio says so): the caller stops us
            continue
        installed.append(sig)
    return installed


def _connection(config: MailboxConfig) -> tuple[object, ...]:
    """What a source's connection depends on (``Secret`` compares by value)."""
    fields = dataclasses.fields(config)
    return (type(config), *(getattr(config, f.name) for f in fields if f.name not in DISPATCH_ONLY))


def _source(
    config: MailboxConfig,
    *,
    dispatcher: Dispatcher,
    health: Health,
    resources: Resources,
    stopping: asyncio.Event,
    drained: asyncio.Event,
) -> Source[int] | Source[str]:
    if isinstance(config, ImapMailboxConfig):
        tokens = (
            resources.token_provider(config.oauth, label=config.id)
            if config.oauth is not None
            else None
        )
        return ImapWatcher(
            config,
            dispatcher.submit,
            stopping=stopping,
            drained=drained,
            monitor=health,
            budget=resources.budget,
            connects=resources.connects,
            token=tokens.token if tokens is not None else None,
            invalidate=tokens.invalidate if tokens is not None else None,
        )
    options = config.inbox_options
    return GraphPoller(
        config,
        dispatcher.submit,
        stopping=stopping,
        drained=drained,
        tokens=resources.token_provider(options.oauth, label=config.id),
        http=resources.graph_session(options),
        monitor=health,
        budget=resources.budget,
    )


class _Mailbox:
    """One source task with stop and drain events of its own, so that a reload can stop it
    alone."""

    def __init__(self, source_for: Callable[..., Source[Any]]) -> None:
        self.stopping = asyncio.Event()
        self.drained = asyncio.Event()
        self.source = source_for(stopping=self.stopping, drained=self.drained)
        self.name = f"{self.source.kind}:{self.source.id}"
        self.task: asyncio.Task[None] | None = None

    async def run(self, delay_s: float) -> None:
        if delay_s > 0:
            await wait_any((self.stopping,), timeout_s=delay_s)
        for attempt in range(1, 2**31):
            try:
                await self.source.run()
                return
            except Exception:  # Source.run never raises: a bug there still stops no one else
                delay = backoff_delay(attempt, initial_s=1.0, max_s=300.0)
                log.exception(
                    "%s: the source failed; restarting it in %.1fs", self.source.id, delay
                )
                await wait_any((self.drained,), timeout_s=delay)

    async def close(self, timeout_s: float = SOURCE_CLOSE_TIMEOUT_S) -> None:
        """After its deliveries were drained: apply settlements, LOGOUT and end (bounded)."""
        self.stopping.set()
        self.drained.set()
        assert self.task is not None
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


class _Running:
    """The mailboxes of one ``run``: started, reloaded, shut down."""

    def __init__(
        self,
        config: Config,
        dispatcher: Dispatcher,
        health: Health,
        resources: Resources,
        group: asyncio.TaskGroup,
    ) -> None:
        self.config = config
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
            mailbox = _Mailbox(
                functools.partial(
                    _source,
                    config,
                    dispatcher=self.dispatcher,
                    health=self.health,
                    resources=self.resources,
                )
            )
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
        try:
            if timeout_s is None:
                await self.dispatcher.drain_mailbox(mailbox_id, drain_s)
                await mailbox.close()
            else:
                # Deliveries get most of the time; settlements and LOGOUT the rest.
                await self.dispatcher.drain_mailbox(mailbox_id, min(drain_s, timeout_s * 0.8))
                left = timeout_s - (time.monotonic() - started)
                await mailbox.close(max(0.05, left))
        finally:
            self.retiring.remove(mailbox)

    def abort(self, mailbox_id: str) -> None:
        """Drop one mailbox's source at once (its lease lapses or is gone)."""
        mailbox = self.mailboxes.pop(mailbox_id, None)
        for each in [m for m in self.retiring if m.source.id == mailbox_id]:
            each.abort()
        if mailbox is not None:
            self.health.stopping(mailbox_id)
            mailbox.abort()

    async def reload(self, load: Callable[[], Config] | None) -> None:
        """Load the config again and apply the difference; refuse an invalid one."""
        if load is None:
            log.warning("reload: mailroom was not started from a config file; nothing to reload")
            return
        try:
            new = await asyncio.to_thread(load)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: config error: %s", exc)
            return
        except Exception:
            log.exception("reload refused, the running config stays: cannot load the config")
            return
        try:  # phase one: build everything the new config needs, change nothing yet
            self.resources.prepare(new)
            prepared = self.dispatcher.prepare(new)
        except Exception as exc:
            log.error("reload refused, the running config stays: %s: %s", type(exc).__name__, exc)
            await self.resources.retain(self.config)
            return
        old, self.config = self.config, new  # phase two: apply
        before = {m.id: m for m in old.mailboxes}
        after = {m.id: m for m in new.mailboxes}
        removed = [i for i in before if i not in after]
        changed = [
            i for i in before if i in after and _connection(before[i]) != _connection(after[i])
        ]
        added = [i for i in after if i not in before]
        if (
            self.coordinator is not None
        ):  # leases start and stop mailboxes; only a running one is restarted
            changed = [i for i in changed if i in self.mailboxes]
            stopping, starting = changed, changed
        else:
            stopping, starting = [*removed, *changed], [*changed, *added]
        await asyncio.gather(*(self.stop(i) for i in stopping))
        self.dispatcher.apply(prepared)
        self.health.configure(new)
        self.resources.apply_limits(new)
        if self.coordinator is None:
            for mailbox_id in removed:
                self.health.forget(mailbox_id)
        self.start([after[i] for i in starting])
        if self.coordinator is not None:
            self.coordinator.configure(new)
            if new.arbitration != old.arbitration:
                log.warning("reload: a changed arbitration block takes effect after a restart")
        await self.resources.retain(new)
        if new.log != old.log:
            logs.configure(new.log.format, new.log.level)
        listen = [(h.host, h.port) if h else None for h in (old.health, new.health)]
        if listen[0] != listen[1]:
            log.warning("reload: a changed health.listen takes effect after a restart")
        for warning in new.warnings:
            logging.getLogger("mailroom.config").warning("config: %s", warning)
        log.info(
            "config reloaded: %d mailbox(es) started, %d restarted, %d stopped, %d unchanged",
            len(added),
            len(changed),
            len(removed),
            len(after) - len(added) - len(changed),
        )

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


async def _listen(server: HealthServer) -> None:
    """Start the health server; an address it cannot bind is a config error (exit 2)."""
    try:
        await server.start()
    except OSError as exc:
        host, port = server.config.host, server.config.port
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        advice = "stop what uses it, or " if exc.errno == errno.EADDRINUSE else ""
        raise ConfigError(
            "health.listen", f"cannot listen on {address}: {reason}; {advice}choose another"
        ) from exc


def _signature(paths: Sequence[Path]) -> tuple[object, ...]:
    """What changes when a file is edited or replaced (following symlinks: Kubernetes swaps a
    ConfigMap's files behind one)."""
    found: list[object] = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            found.append(None)
            continue
        found.append((stat.st_ino, stat.st_dev, stat.st_size, stat.st_mtime_ns))
    return tuple(found)


async def _watch(
    paths: Sequence[Path], interval_s: float, reload: asyncio.Event, done: asyncio.Event
) -> None:
    """``reload: {watch: true}``: set ``reload`` whenever one of ``paths`` changes."""
    last = _signature(paths)
    while not done.is_set():
        await wait_any((done,), timeout_s=interval_s)
        now = await asyncio.to_thread(_signature, paths)
        if now != last and not done.is_set():
            last = now
            log.info("the config file changed: reloading (reload.watch)")
            reload.set()


async def run(
    config: Config,
    stop: asyncio.Event | None = None,
    *,
    load: Callable[[], Config] | None = None,
    reload: asyncio.Event | None = None,
    dry_run: bool = False,
    watch: Sequence[Path] = (),
) -> int:
    """Run until ``stop`` is set (or a signal arrives); returns the exit code.

    Setting ``reload`` (SIGHUP does, and with ``reload.watch`` a change to one of ``watch``'s
    files) calls ``load`` for the new config and applies it. With
    ``dry_run`` nothing is posted, sent or settled (``Dispatcher``), and replicas' Redis is
    not used: a dry run takes no lease from the replicas doing the real work.
    """
    stop = stop or asyncio.Event()
    reload = reload or asyncio.Event()
    installed = _install_signals(stop, reload)
    resources = Resources(config)
    health = Health(config, budget=resources.budget)
    server = HealthServer(health, config.health) if config.health is not None else None
    shared = config.arbitration.enabled and not dry_run
    store = replicas.store(config.arbitration) if shared else None
    finished = asyncio.Event()
    abandoned = 0
    try:
        resources.prepare(config)
        if server is not None:
            await _listen(server)  # before any mailbox: a port in use fails at once
        async with (
            Dispatcher(config, health, shared=store, dry_run=dry_run) as dispatcher,
            asyncio.TaskGroup() as group,
        ):
            if server is not None:
                group.create_task(server.serve(finished), name="health")
            if config.reload.watch and watch and load is not None:
                interval_s = config.reload.interval_s
                group.create_task(_watch(watch, interval_s, reload, finished), name="watch")
            running = _Running(config, dispatcher, health, resources, group)
            if store is None:
                running.start(list(config.mailboxes))
                log.info(
                    "mailroom started: %d mailbox(es)%s",
                    len(config.mailboxes),
                    "; DRY RUN: nothing is posted, sent or settled" if dry_run else "",
                )
            else:
                coordinator = running.coordinator = Coordinator(
                    config,
                    store,
                    start=running.start,
                    stop=running.stop,
                    abort=running.abort,
                    monitor=health,
                )
                group.create_task(coordinator.run(finished), name="arbitration")
                log.info(
                    "mailroom started: %d mailbox(es) shared with other replicas through %s",
                    len(config.mailboxes),
                    store.where,
                )
            while True:  # one turn per SIGHUP, until stopped
                await wait_any((stop, reload))
                if stop.is_set():
                    break
                reload.clear()
                reloading = asyncio.create_task(running.reload(load), name="reload")
                await wait_any((stop,), futures=(reloading,))
                if not reloading.done():  # SIGTERM during a reload: stop now
                    reloading.cancel()
                    log.info("reload interrupted by the stop")
                await asyncio.wait({reloading})
            finished.set()  # no new leases from here on
            abandoned = await running.shutdown()
            if running.coordinator is not None:
                await running.coordinator.release_all()
    finally:
        finished.set()
        if server is not None:
            await server.close()
        await resources.close()
        if store is not None:
            await store.close()
        loop = asyncio.get_running_loop()
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("stopped (%d deliveries abandoned)", abandoned)
    return 0
