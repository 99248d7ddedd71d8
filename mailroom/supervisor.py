"""Owns the TaskGroup, the signals and the bounded, ordered shutdown.

Tasks: ``imap:<mailbox>`` per IMAP mailbox, ``graph:<mailbox>`` per Microsoft Graph mailbox
and ``dispatch`` (the drain). A mailbox that fails
(bad password, server down) retries on its own and never stops the others.

Shutdown on SIGTERM/SIGINT (a second SIGINT forces exit):

1. the stop event is set; watchers stop sweeping and idling but keep their connections;
2. the dispatcher stops accepting and gives in-flight deliveries ``shutdown_timeout`` seconds,
   then cancels the rest and says how many were abandoned (they stay unread on the server);
3. watchers apply the settlements that came in, LOGOUT and end (bounded as well).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from mailroom.config import Config, ImapMailboxConfig
from mailroom.dispatch import Dispatcher
from mailroom.sources.graph import GraphPoller
from mailroom.sources.imap import ImapWatcher

__all__ = ["run"]

log = logging.getLogger("mailroom")

# After the dispatcher drained: time for watchers to apply settlements and LOGOUT.
SOURCE_CLOSE_TIMEOUT_S = 10.0


def _install_signals(stop: asyncio.Event) -> list[signal.Signals]:
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set() and sig == signal.SIGINT:
            log.error("second SIGINT: exiting now; unsettled messages will be delivered again")
            os._exit(130)
        log.info("%s received: stopping", sig.name)
        stop.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread: the caller stops us
            continue
        installed.append(sig)
    return installed


async def run(config: Config, stop: asyncio.Event | None = None) -> int:
    """Run until ``stop`` is set (or a signal arrives); returns the exit code."""
    stop = stop or asyncio.Event()
    installed = _install_signals(stop)
    drained = asyncio.Event()
    try:
        async with Dispatcher(config) as dispatcher:
            watchers: list[ImapWatcher | GraphPoller] = [
                ImapWatcher(mailbox, dispatcher.submit, stopping=stop, drained=drained)
                if isinstance(mailbox, ImapMailboxConfig)
                else GraphPoller(mailbox, dispatcher.submit, stopping=stop, drained=drained)
                for mailbox in config.mailboxes
            ]
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(
                        w.run(), name=f"{'imap' if isinstance(w, ImapWatcher) else 'graph'}:{w.id}"
                    )
                    for w in watchers
                ]
                log.info("mailroom started: %d mailbox(es)", len(watchers))
                await stop.wait()
                log.info("stopping: draining deliveries (up to %.0fs)", config.shutdown_timeout_s)
                drain = group.create_task(
                    dispatcher.drain(config.shutdown_timeout_s), name="dispatch"
                )
                abandoned = await drain
                drained.set()
                _, late = await asyncio.wait(tasks, timeout=SOURCE_CLOSE_TIMEOUT_S)
                for task in late:
                    log.warning(
                        "%s did not close within %.0fs; cancelling",
                        task.get_name(),
                        SOURCE_CLOSE_TIMEOUT_S,
                    )
                    task.cancel()
    finally:
        loop = asyncio.get_running_loop()
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("stopped (%d deliveries abandoned)", abandoned)
    return 0
