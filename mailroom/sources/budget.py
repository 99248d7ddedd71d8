"""The process-wide in-flight budget (``limits.in_flight_messages``, ``limits.in_flight_bytes``).

Every message a source fetches stays in memory until it is settled: across a thousand mailboxes
and a webhook outage that would be unbounded. A source therefore reserves room here *before* it
fetches (IMAP knows each size from ``RFC822.SIZE``; Graph charges the bytes once the MIME is
read) and gives it back, message by message, when a message is settled or released.

Reservations are granted first come, first served, so one mailbox with a large backlog cannot
starve the others; a reservation larger than the whole budget is granted once nothing else is in
flight, so no message is ever too large to be fetched at all. The per-mailbox limits of the
sources stay as a fairness cap below this.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

__all__ = ["Budget", "Reservation"]


@dataclass(slots=True, eq=False)
class Reservation:
    """Room for ``count`` messages of ``size`` bytes in all; ``granted`` resolves when it is
    given. The holder then keeps what it used (``Budget.use``) or gives it all back
    (``Budget.cancel``); either closes it."""

    count: int
    size: int
    granted: asyncio.Future[None] = field(repr=False)
    closed: bool = False

    def done(self) -> bool:
        return self.granted.done()


class Budget:
    """Counts what is in flight across all sources; grants reservations in order."""

    def __init__(self, *, messages: int, size: int) -> None:
        self.max_messages = messages
        self.max_bytes = size
        self.messages = 0  # in flight now (granted and not released)
        self.bytes = 0
        self._queue: deque[Reservation] = deque()

    @property
    def waiting(self) -> int:
        """Reservations not granted yet."""
        return len(self._queue)

    def room(self) -> tuple[int, int]:
        """(messages, bytes) a reservation made now would get at once; none while others
        wait (they come first). Size a request by it: one that asks for more than there is
        would wait, and hold up everyone behind it."""
        if self._queue:
            return 0, 0
        return max(0, self.max_messages - self.messages), max(0, self.max_bytes - self.bytes)

    def resize(self, *, messages: int, size: int) -> None:
        """New limits (a reload); what is in flight stays, new grants follow the new limits."""
        self.max_messages, self.max_bytes = messages, size
        self._grant()

    @contextlib.asynccontextmanager
    async def hold(self, count: int = 1, size: int = 0) -> AsyncIterator[None]:
        """Wait for room and hold it for the ``async with`` block (a semaphore with a size)."""
        reservation = self.reserve(count, size)
        try:
            await asyncio.shield(reservation.granted)
            yield
        finally:
            self.cancel(reservation)

    def reserve(self, count: int, size: int) -> Reservation:
        """Ask for room; granted at once when it fits and nobody waits ahead."""
        reservation = Reservation(count, size, asyncio.get_running_loop().create_future())
        self._queue.append(reservation)
        self._grant()
        return reservation

    def use(self, reservation: Reservation, count: int, size: int) -> None:
        """The holder of a granted reservation fetched ``count`` messages of ``size`` bytes:
        those stay in flight (until ``release``), the rest of the reservation is given back."""
        if not reservation.done() or reservation.closed:
            raise RuntimeError("Budget.use: the reservation is not granted, or is closed")
        reservation.closed = True
        self.charge(count - reservation.count, size - reservation.size)
        self._grant()

    def cancel(self, reservation: Reservation) -> None:
        """Withdraw a reservation: a granted one is given back whole, a waiting one leaves the
        queue. Does nothing to a closed one, so it is safe in a ``finally``."""
        if reservation.closed:
            return
        reservation.closed = True
        if reservation.granted.done() and not reservation.granted.cancelled():
            self.release(reservation.count, reservation.size)
            return
        reservation.granted.cancel()  # _grant drops it from the queue
        self._grant()

    def charge(self, count: int, size: int) -> None:
        """Count what is already in memory without asking (Graph learns a size by reading).
        Negative values give back, as ``release`` does."""
        self.messages = max(0, self.messages + count)
        self.bytes = max(0, self.bytes + size)

    def release(self, count: int, size: int) -> None:
        """Give back room for ``count`` messages of ``size`` bytes in all."""
        self.charge(-count, -size)
        self._grant()

    def _fits(self, reservation: Reservation) -> bool:
        if self.messages == 0:
            return True  # nothing in flight: even a reservation larger than the budget
        return (
            self.messages + reservation.count <= self.max_messages
            and self.bytes + reservation.size <= self.max_bytes
        )

    def _grant(self) -> None:
        while self._queue:
            head = self._queue[0]
            if head.granted.done():  # cancelled while waiting
                self._queue.popleft()
                continue
            if not self._fits(head):
                return
            self._queue.popleft()
            self.charge(head.count, head.size)
            head.granted.set_result(None)
