"""Owns the TaskGroup, the signals and the bounded, ordered shutdown.

Tasks: ``imap:<mailbox>`` per IMAP mailbox, ``graph:<mailbox>`` per Microsoft Graph mailbox
and ``dispatch`` (the drain). A mailbox that fails
(bad password, server down) retries on its own and never stops the others.

Shutdown on SIGTERM/SIGINT (a second SIGINT forces exit):

1. the stop event is set; watchers stop sweeping and idling but keep their connections;
2. the dispatcher stops accepting and gives in-flight deliveries ``shutdown_timeout`` seconds,
   then cancels the rest and says how many were abandoned (they stay unread on the server);
3. watchers apply the settlements that came in, LOGOUT and end (bounded as well).

SIGHUP reloads the config file. An invalid file is logged and refused; the running config stays.
Otherwise mailboxes whose connection settings changed restart, new ones start, removed ones stop
(each like a shutdown of its own: its deliveries finish and settle, then LOGOUT), and the others
keep their connections. Changes to ``webhook``, routing, ``reject_notices``, ``log`` and
``shutdown_timeout`` apply to new deliveries at once; ``health.listen`` only after a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import signal
from collections.abc import Callable

from mailroom import logs
from mailroom.config import Config, ImapMailboxConfig, MailboxConfig
from mailroom.dispatch import Dispatcher
from mailroom.errors import ConfigError
from mailroom.health import Health, HealthServer
from mailroom.sources.graph import GraphPoller
from mailroom.sources.imap import ImapWatcher

__all__ = ["run"]

log = logging.getLogger("mailroom")

# After the dispatcher drained: time for watchers to apply settlements and LOGOUT.
SOURCE_CLOSE_TIMEOUT_S = 10.0
# Mailbox settings only the dispatcher reads: changing them restarts no connection.
DISPATCH_ONLY = frozenset({"webhook", "routing"})


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


async def _wait_first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class _Mailbox:
    """One source task with stop and drain events of its own, so that a reload can stop it
    alone."""

    def __init__(self, config: MailboxConfig, dispatcher: Dispatcher, health: Health) -> None:
        self.stopping = asyncio.Event()
        self.drained = asyncio.Event()
        self.source: ImapWatcher | GraphPoller
        if isinstance(config, ImapMailboxConfig):
            self.name = f"imap:{config.id}"
            self.source = ImapWatcher(
                config,
                dispatcher.submit,
                stopping=self.stopping,
                drained=self.drained,
                monitor=health,
            )
        else:
            self.name = f"graph:{config.id}"
            self.source = GraphPoller(
                config,
                dispatcher.submit,
                stopping=self.stopping,
                drained=self.drained,
                monitor=health,
            )
        self.task: asyncio.Task[None] | None = None

    async def close(self) -> None:
        """After its deliveries were drained: apply settlements, LOGOUT and end (bounded)."""
        self.stopping.set()
        self.drained.set()
        assert self.task is not None
        _, late = await asyncio.wait({self.task}, timeout=SOURCE_CLOSE_TIMEOUT_S)
        if late:
            log.warning(
                "%s did not close within %.0fs; cancelling", self.name, SOURCE_CLOSE_TIMEOUT_S
            )
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=1.0)  # its last events come before a restart


class _Running:
    """The mailboxes of one ``run``: started, reloaded, shut down."""

    def __init__(
        self, config: Config, dispatcher: Dispatcher, health: Health, group: asyncio.TaskGroup
    ) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.health = health
        self.group = group
        self.mailboxes: dict[str, _Mailbox] = {}

    def start(self, config: MailboxConfig) -> None:
        self.health.starting(config.id)
        mailbox = self.mailboxes[config.id] = _Mailbox(config, self.dispatcher, self.health)
        mailbox.task = self.group.create_task(mailbox.source.run(), name=mailbox.name)

    async def stop(self, mailbox_id: str) -> None:
        """Stop one mailbox like a shutdown: its deliveries finish and settle, then LOGOUT."""
        mailbox = self.mailboxes.pop(mailbox_id)
        self.health.stopping(mailbox_id)
        mailbox.stopping.set()
        await self.dispatcher.drain_mailbox(mailbox_id, self.config.shutdown_timeout_s)
        await mailbox.close()

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
        old, self.config = self.config, new
        before = {m.id: m for m in old.mailboxes}
        after = {m.id: m for m in new.mailboxes}
        removed = [i for i in before if i not in after]
        changed = [
            i for i in before if i in after and _connection(before[i]) != _connection(after[i])
        ]
        added = [i for i in after if i not in before]
        await asyncio.gather(*(self.stop(i) for i in (*removed, *changed)))
        self.dispatcher.reconfigure(new)
        self.health.configure(new)
        for mailbox_id in removed:
            self.health.forget(mailbox_id)
        for mailbox_id in (*changed, *added):
            self.start(after[mailbox_id])
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
        for mailbox in self.mailboxes.values():
            mailbox.stopping.set()
        timeout_s = self.config.shutdown_timeout_s
        log.info("stopping: draining deliveries (up to %.0fs)", timeout_s)
        drain = self.group.create_task(self.dispatcher.drain(timeout_s), name="dispatch")
        abandoned = await drain
        await asyncio.gather(*(mailbox.close() for mailbox in self.mailboxes.values()))
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


async def run(
    config: Config,
    stop: asyncio.Event | None = None,
    *,
    load: Callable[[], Config] | None = None,
    reload: asyncio.Event | None = None,
) -> int:
    """Run until ``stop`` is set (or a signal arrives); returns the exit code.

    Setting ``reload`` (SIGHUP does) calls ``load`` for the new config and applies it.
    """
    stop = stop or asyncio.Event()
    reload = reload or asyncio.Event()
    installed = _install_signals(stop, reload)
    health = Health(config)
    server = HealthServer(health, config.health) if config.health is not None else None
    finished = asyncio.Event()
    try:
        if server is not None:
            await _listen(server)  # before any mailbox: a port in use fails at once
        async with Dispatcher(config, health) as dispatcher, asyncio.TaskGroup() as group:
            if server is not None:
                group.create_task(server.serve(finished), name="health")
            running = _Running(config, dispatcher, health, group)
            for mailbox in config.mailboxes:
                running.start(mailbox)
            log.info("mailroom started: %d mailbox(es)", len(config.mailboxes))
            while True:  # one turn per SIGHUP, until stopped
                await _wait_first(stop, reload)
                if stop.is_set():
                    break
                reload.clear()
                await running.reload(load)
            abandoned = await running.shutdown()
            finished.set()
    finally:
        finished.set()
        if server is not None:
            await server.close()
        loop = asyncio.get_running_loop()
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("stopped (%d deliveries abandoned)", abandoned)
    return 0
