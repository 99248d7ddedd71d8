"""Owns the TaskGroup, the signals, reloads and the bounded, ordered shutdown.

Tasks: ``<kind>:<mailbox>`` per mailbox (``imap:``, ``graph:``, ``lmtp:``; ``Running``), ``health``,
``arbitration`` (replicas), ``watch`` (``reload.watch``) and
``dispatch`` (the drain). Each source is supervised on its own (the shared ``Source``
lifecycle): a mailbox that fails (bad password, server down, a bug) is logged and retried with
backoff and never stops the others. What sources share (the in-flight budget, the connect
limit, token providers, Graph sessions, TLS contexts) is in ``Resources``; with replicas, the
``Coordinator``'s leases decide which mailboxes run here.

Shutdown on SIGTERM/SIGINT (a second SIGINT forces exit):

1. the stop event is set; sources stop sweeping and idling but keep their connections; a
   listener answers 421 to new sessions and to sessions between transactions, and its open
   transactions hand their messages over;
2. the dispatcher stops accepting and gives in-flight deliveries what is left of
   ``shutdown_timeout``, then cancels the rest and says how many were abandoned (they stay
   unread on the server, or queued at the MTA, which got 451 for them);
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
import logging
import os
import resource
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mailroom import arbitration as replicas
from mailroom import logs
from mailroom.arbitration import Coordinator
from mailroom.config import Config
from mailroom.delivery.dispatch import Dispatcher
from mailroom.errors import ArbitrationError, ConfigError
from mailroom.observe.health import Health
from mailroom.runtime.health_server import HealthServer
from mailroom.runtime.resources import Resources, SourceKinds
from mailroom.runtime.running import Running
from mailroom.sources.lifecycle import wait_any

if TYPE_CHECKING:
    from mailroom.arbitration.store import RedisStore

__all__ = ["run"]

log = logging.getLogger("mailroom")

OPEN_FILES_WANTED = 65_536  # with no hard limit: as many as this
OPEN_FILES_ADVISED = 4096  # fewer: a warning


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


async def _listen(server: HealthServer) -> None:
    """Start the health server; an address it cannot bind is a config error (exit 2)."""
    try:
        await server.start()
    except OSError as exc:
        host, port = server.config.host, server.config.port
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ConfigError.cannot_listen("health.listen", address, host, exc) from exc


def raise_open_files() -> int:
    """Raise the soft limit of open files to the hard one and say what there is (issue 18:
    systemd's default soft limit of 1,024 ran out under 1,100 connections to the health port,
    and then no webhook POST could open a socket). The limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("open files: cannot raise the soft limit %d to %d (%s)", soft, wanted, exc)
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    log.info("open files: up to %d (hard limit %s)", soft, shown)
    if soft < OPEN_FILES_ADVISED:
        log.warning(
            "open files: %d is few; each mailbox, webhook connection and health client takes "
            "one: raise the hard limit (systemd LimitNOFILE=, docker --ulimit nofile=) to %d "
            "or more",
            soft,
            OPEN_FILES_ADVISED,
        )
    return int(soft)


async def _refuse_shared_namespace(config: Config, store: RedisStore) -> None:
    """A lease of one of our mailbox ids held for another mailbox: another deployment uses the
    same namespace, and would lose mail to us (or we to it). A config error (exit 2); Redis
    out of reach is no error here (the leases wait for it)."""
    try:
        problems = await replicas.conflicts(config, store)
    except ArbitrationError:
        return
    if problems:
        raise ConfigError("arbitration.namespace", "; ".join(problems))


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


def _start(
    running: Running, store: RedisStore | None, finished: asyncio.Event, *, dry_run: bool
) -> None:
    """Start every mailbox; with replicas, the coordinator that starts those whose lease this
    replica takes."""
    config = running.config
    if store is None:
        running.start(list(config.mailboxes))
        log.info(
            "mailroom started: %d mailbox(es)%s",
            len(config.mailboxes),
            "; DRY RUN: nothing is posted, sent or settled" if dry_run else "",
        )
        return
    # A listener is not leased: every replica listens, and the MTA picks one.
    running.start([m for m in config.mailboxes if not m.leased])
    coordinator = running.coordinator = Coordinator(
        config,
        store,
        start=running.start,
        stop=running.stop,
        abort=running.abort,
        monitor=running.health,
    )
    running.group.create_task(coordinator.run(finished), name="arbitration")
    log.info(
        "mailroom started: %d mailbox(es) shared with other replicas through %s",
        len(config.mailboxes),
        store.where,
    )


async def _reloads(
    running: Running,
    stop: asyncio.Event,
    reload: asyncio.Event,
    load: Callable[[], Config] | None,
) -> None:
    """One reload per ``reload`` (SIGHUP, ``reload.watch``), until ``stop``; a stop during a
    reload cuts it short."""
    while True:
        await wait_any((stop, reload))
        if stop.is_set():
            return
        reload.clear()
        logs.reopen()  # after a rotation (logrotate sends SIGHUP)
        reloading = asyncio.create_task(running.reload(load), name="reload")
        await wait_any((stop,), futures=(reloading,))
        if not reloading.done():  # SIGTERM during a reload: stop now
            reloading.cancel()
            log.info("reload interrupted by the stop")
        await asyncio.wait({reloading})


async def run(
    config: Config,
    stop: asyncio.Event | None = None,
    *,
    kinds: SourceKinds,
    load: Callable[[], Config] | None = None,
    reload: asyncio.Event | None = None,
    dry_run: bool = False,
    watch: Sequence[Path] = (),
) -> int:
    """Run until ``stop`` is set (or a signal arrives); returns the exit code.

    ``kinds`` builds each mailbox's source (``mailroom.kinds.KINDS``, which the command line
    hands down: this floor knows no kind of source). Setting ``reload`` (SIGHUP does, and with
    ``reload.watch`` a change to one of ``watch``'s files) calls ``load`` for the new config
    and applies it. With ``dry_run`` nothing is posted, sent or settled (``Dispatcher``), and
    replicas' Redis is not used: a dry run takes no lease from the replicas doing the real
    work.
    """
    stop = stop or asyncio.Event()
    reload = reload or asyncio.Event()
    installed = _install_signals(stop, reload)
    resources = Resources(config, kinds)
    health = Health(config, budget=resources.budget)
    server = None
    if config.health is not None:
        server = HealthServer(health, config.health, config.metrics)
    shared = config.arbitration.enabled and not dry_run
    store = replicas.redis_store(config.arbitration) if shared else None
    queues = replicas.JobQueues()  # delivery_method: sidekiq (GitLab's, deprecated)
    finished = asyncio.Event()
    abandoned = 0
    try:
        resources.prepare(config)
        if store is not None:
            await _refuse_shared_namespace(config, store)
        if server is not None:
            await _listen(server)  # before any mailbox: a port in use fails at once
        raise_open_files()  # before the mailboxes' and webhooks' connections
        async with (
            Dispatcher(
                config,
                health,
                shared=store,
                claims=store if config.arbitration.mail_room_claims else None,
                queues=queues,
                dry_run=dry_run,
            ) as dispatcher,
            asyncio.TaskGroup() as group,
        ):
            if server is not None:
                group.create_task(server.serve(finished), name="health")
            if config.reload.watch and watch and load is not None:
                interval_s = config.reload.interval_s
                group.create_task(_watch(watch, interval_s, reload, finished), name="watch")
            running = Running(config, dispatcher, health, resources, group)
            _start(running, store, finished, dry_run=dry_run)
            await _reloads(running, stop, reload, load)
            finished.set()  # no new leases from here on
            abandoned = await running.shutdown()
            if running.coordinator is not None:
                await running.coordinator.release_all()
    finally:
        finished.set()
        if server is not None:
            await server.close()
        await resources.close()
        await queues.close()
        if store is not None:
            await store.close()
        loop = asyncio.get_running_loop()
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("stopped (%d deliveries abandoned)", abandoned)
    return 0
