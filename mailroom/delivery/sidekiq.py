"""GitLab's deprecated ``delivery_method: sidekiq``: the Sidekiq job MailRoom pushes.

MailRoom's ``lib/mail_room/delivery/sidekiq.rb`` pushes each message with ``LPUSH
queue:<queue>`` (under its namespace, if any) of this JSON, and nothing else::

    {"class": <worker>, "args": [<the message as UTF-8 text>], "queue": <queue>,
     "jid": <24 hex digits>, "retry": false, "enqueued_at": <float seconds>}

The message becomes text as MailRoom makes it: the bytes as they are when they are UTF-8;
otherwise converted to UTF-8 from the charset a detector finds (MailRoom: CharlockHolmes, ICU's
detector; here charset-normalizer, the detector Python's requests uses). Where MailRoom finds
none it cannot build the JSON and the message is lost; here it is read as ISO-8859-1, where every
byte is a character: the ASCII of headers and MIME structure stays exact, only 8-bit characters
may read wrong. Sidekiq's own client also keeps a set of queues; MailRoom does not, nor does
this. ``Webhooks`` pushes it with the retries, slots and circuit a webhook has: Redis trouble is
a transient failure, and the message is settled only after the LPUSH succeeded.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Protocol

from mailroom.config import SidekiqConfig

__all__ = ["JobQueue", "job", "utf8_text"]


class JobQueue(Protocol):
    """A Redis that takes jobs (``arbitration.store.RedisQueue``); ``push`` raises
    ``ArbitrationError`` when Redis did not take the job."""

    async def push(self, key: str, job: str) -> None: ...


def utf8_text(raw: bytes) -> str:
    """``raw`` as text, as MailRoom's ``utf8_encode_message`` makes it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # here: 2.6 MiB at start that a config without delivery_method: sidekiq never needs
    from charset_normalizer import from_bytes  # noqa: PLC0415

    best = from_bytes(raw).best()
    if best is not None:
        return str(best)
    return raw.decode("iso-8859-1")


def job(config: SidekiqConfig, raw: bytes, *, now: float | None = None) -> str:
    """The job for ``raw``, as JSON text with MailRoom's keys in MailRoom's order."""
    item = {
        "class": config.worker,
        "args": [utf8_text(raw)],
        "queue": config.queue,
        "jid": secrets.token_hex(12),  # SecureRandom.hex(12)
        "retry": False,
        "enqueued_at": time.time() if now is None else now,
    }
    # Ruby's JSON.generate: compact, UTF-8 as it is, "/" not escaped.
    return json.dumps(item, ensure_ascii=False, separators=(",", ":"))
