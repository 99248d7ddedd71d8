"""A circuit breaker per webhook: an outage is one event, not one per message.

While the webhook answers, deliveries go straight through (CLOSED). After ``FAILURES_TO_OPEN``
transient failures in a row (timeouts, refused connections, 5xx, 429, 401/403/404) the circuit
OPENs: deliveries stop sending and wait here, and one of them at a time is let through as a
probe, after a capped, jittered backoff (never sooner than a ``Retry-After``). The first answer
that is not a transient failure CLOSEs it and lets every waiting delivery go (the webhook's
concurrency still bounds them). Each change is logged once; the attempts in between are not.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time

from mailroom.backoff import Backoff
from mailroom.observe.monitor import Monitor

__all__ = ["Circuit", "CircuitState"]

log = logging.getLogger("mailroom.delivery.dispatch")

FAILURES_TO_OPEN = 5


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"


class Circuit:
    """The breaker of one webhook (``label`` names it in logs and metrics)."""

    def __init__(
        self,
        label: str,
        backoff: Backoff,
        *,
        monitor: Monitor | None = None,
        failures_to_open: int = FAILURES_TO_OPEN,
    ) -> None:
        self.label = label
        self.backoff = backoff  # the probes' pace; a Retry-After is honoured within its clamp
        self.failures_to_open = failures_to_open
        self._monitor = monitor or Monitor()
        self.state = CircuitState.CLOSED
        self.failures = 0  # transient failures in a row
        self._probes = 0  # failed probes since the circuit opened
        self._probe_at = 0.0  # time.monotonic() from which the next probe may go
        self._probing = False
        self._opened_at = 0.0
        self._changed = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self.state is CircuitState.OPEN

    async def admit(self, timeout_s: float | None = None) -> bool:
        """Wait until a request may go. True: send it (and report ``answered``, ``failed`` or
        ``abandoned``); False: ``timeout_s`` passed while the circuit stayed open."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self.state is CircuitState.CLOSED:
                return True
            now = time.monotonic()
            if not self._probing and now >= self._probe_at:
                self._probing = True  # this request is the probe
                return True
            wait_s = None if self._probing else self._probe_at - now
            if deadline is not None:
                if now >= deadline:
                    return False
                wait_s = deadline - now if wait_s is None else min(wait_s, deadline - now)
            changed = self._changed
            try:
                async with asyncio.timeout(wait_s):
                    await changed.wait()
            except TimeoutError:
                continue

    def answered(self) -> None:
        """The webhook answered with something other than a transient failure."""
        self.failures = 0
        self._probing = False
        if self.state is CircuitState.OPEN:
            log.warning(
                "webhook %s: answering again after %.0fs; resuming deliveries",
                self.label,
                time.monotonic() - self._opened_at,
            )
            self.state = CircuitState.CLOSED
            self._monitor.circuit(self.label, is_open=False)
            self._notify()

    def failed(self, reason: str, retry_after_s: float | None = None) -> None:
        """A transient failure (no answer, 5xx, 429, ...)."""
        self.failures += 1
        now = time.monotonic()
        if self.state is CircuitState.CLOSED:
            if self.failures < self.failures_to_open:
                return
            self.state = CircuitState.OPEN
            self._opened_at = now
            self._probes = 0
            delay = self._delay(retry_after_s)
            log.error(
                "webhook %s: %d failures in a row (last: %s); deliveries wait, one probe "
                "request at a time (the next in %.1fs)",
                self.label,
                self.failures,
                reason,
                delay,
            )
            self._monitor.circuit(self.label, is_open=True)
        elif self._probing:
            self._probes += 1
            delay = self._delay(retry_after_s)
            log.debug("webhook %s: probe failed (%s); next in %.1fs", self.label, reason, delay)
        else:
            return  # a request sent before the circuit opened
        self._probing = False
        self._probe_at = now + delay
        self._notify()

    def abandoned(self) -> None:
        """An admitted request ended without an answer of any kind (cancelled)."""
        if self._probing:
            self._probing = False
            self._notify()

    def _delay(self, retry_after_s: float | None) -> float:
        return self.backoff.delay(self._probes + 1, retry_after_s)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
