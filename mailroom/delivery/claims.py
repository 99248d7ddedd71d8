"""MailRoom's claims, for a migration from the MailRoom gem without a message posted twice.

MailRoom processes sharing a mailbox each claim a message before they fetch it: ``SET
<namespace>:delivered:<uid> 1 NX EX 600`` (lib/mail_room/arbitration/redis.rb); a process that
finds the key set leaves the message alone. With ``arbitration.mail_room_claims`` mailroom
claims the same key before it delivers a message, so that both can watch the same mailboxes
while one replaces the other (a rolling update, a MailRoom not stopped yet):

- the key was free: it is mailroom's now (its value says so: ``mailroom <mailbox> <webhook-id>``)
  and MailRoom leaves the message alone; the claim is extended while the delivery is retried,
  and left to expire after it (the message is settled by then);
- the key holds ``1``: a MailRoom process took the message; mailroom releases it untouched
  (MailRoom marks it \\Seen when it fetches it; were MailRoom to die first, the next sweep after
  its claim expires takes it);
- the key holds another value (mailroom's own, from another replica or an earlier attempt):
  nothing for MailRoom; the replicas' leases and markers decide as usual. MailRoom's key names
  only the UID, so an incoming and a Service Desk message with the same UID share it: only
  MailRoom's own ``1`` counts as taken;
- Redis cannot be asked: the message is released for the next sweep, as for markers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from mailroom.envelope import Envelope
from mailroom.errors import ArbitrationError

__all__ = ["Claim", "Claims", "MailRoomClaims"]

log = logging.getLogger("mailroom.delivery.dispatch")

MAIL_ROOM_VALUE = "1"  # what MailRoom writes
VALUE_PREFIX = "mailroom "
EXTEND_EVERY_S = 200.0  # a third of MailRoom's 600 s


class MailRoomClaims(Protocol):
    """Where MailRoom's claims are (``arbitration.RedisStore``)."""

    async def claim_mail_room(self, uid: str, value: str) -> str | None: ...

    async def extend_mail_room(self, uid: str, value: str) -> None: ...


class Claim(enum.Enum):
    """What claiming one message found."""

    OURS = "ours"  # mailroom's claim (or claims are off): deliver it
    TAKEN = "taken"  # a MailRoom process has it: release it
    UNKNOWN = "unknown"  # Redis could not be asked: release it for the next sweep


class Claims:
    """Claims each message for the dispatcher; without a store (claims off) every message is
    ``OURS``."""

    def __init__(self, store: MailRoomClaims | None) -> None:
        self.store = store

    @contextlib.asynccontextmanager
    async def held(self, envelope: Envelope, fields: dict[str, Any]) -> AsyncIterator[Claim]:
        """Claim ``envelope`` and keep the claim while the block runs."""
        if self.store is None or not envelope.native_id:
            yield Claim.OURS
            return
        value = f"{VALUE_PREFIX}{envelope.mailbox} {envelope.idempotency_key}"
        claim = await self._claim(self.store, envelope, value, fields)
        if claim is not Claim.OURS:
            yield claim
            return
        name = f"claim:{envelope.mailbox}:{envelope.ref}"
        keeper = asyncio.create_task(self._extend(self.store, envelope, value), name=name)
        try:
            yield claim
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    @staticmethod
    async def _claim(
        store: MailRoomClaims, envelope: Envelope, value: str, fields: dict[str, Any]
    ) -> Claim:
        try:
            found = await store.claim_mail_room(envelope.native_id, value)
        except ArbitrationError as exc:
            log.warning(
                "%s: %s: cannot claim it against MailRoom (%s); left for the next sweep",
                envelope.mailbox,
                envelope.ref,
                exc,
                extra=fields,
            )
            return Claim.UNKNOWN
        if found == MAIL_ROOM_VALUE:
            log.info(
                "%s: %s: a MailRoom process claimed it (mail_room_claims); left to MailRoom",
                envelope.mailbox,
                envelope.ref,
                extra=fields,
            )
            return Claim.TAKEN
        return Claim.OURS

    @staticmethod
    async def _extend(store: MailRoomClaims, envelope: Envelope, value: str) -> None:
        """Extend the claim while its delivery is retried; a failed extension is tried again
        at the next turn (the claim holds 600 s, three turns)."""
        while True:
            await asyncio.sleep(EXTEND_EVERY_S)
            with contextlib.suppress(ArbitrationError):
                await store.extend_mail_room(envelope.native_id, value)
