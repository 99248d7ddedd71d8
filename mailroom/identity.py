"""The identity of a message: its webhook-id, and the Redis keys derived from it.

A webhook-id names one message of one mailbox on its server, whoever watches it::

    webhook-id = "msg_" + hex(SHA-256("mailroom-message\\0" + mailbox + "\\0" + message))[:32]

- ``mailbox`` (``mailbox_key``) names the watched folder on its server, not the configured id
  (two deployments sharing a Redis may both call theirs ``incoming``): for IMAP the host
  (lower case), port, user and folder (``INBOX`` in any case is ``INBOX``, RFC 3501 §5.1); for
  Microsoft Graph the endpoint, tenant, user (lower case) and folder; for an LMTP listener its
  address template (a message queued at the MTA keeps its id when ``listen`` moves).
- ``message`` names the message within it, by what does not change when it is moved to a
  ``failed_folder`` and back (RFC 6851 §3.3, RFC 3501 §6.4.7: COPY and MOVE keep the
  message): for IMAP the SHA-256 of its exact bytes (``content``), or of its header block when
  it is over ``max_message_bytes`` and only that was fetched (``header``); for Graph its
  immutable id (``graph_message``); for an LMTP delivery the SHA-256 of the message as the MTA
  sent it and the recipient (``lmtp_delivery``): one delivery per recipient.

So nothing is written on the server to keep an id (servers cap keywords: Cyrus 100 a folder,
Dovecot's maildir 26, Exchange none), and the id of a dead letter is found again from the
message itself. Two byte-identical messages in one folder are one message: same webhook-id,
so a receiver that drops repeats takes one (and, with replicas, the second is settled by the
first's marker while it lasts). Identical bytes arrive only as copies of one delivery: every
MTA on the way adds a Received line of its own.
"""

from __future__ import annotations

import hashlib

__all__ = ["content", "graph_message", "header", "lmtp_delivery", "mailbox_key", "webhook_id"]


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def mailbox_key(kind: str, *parts: str) -> str:
    """What names a watched folder on its server (``kind``: ``imap`` or ``graph``), as 64 hex
    digits: in webhook-ids, and in leases to tell one mailbox from another of the same id."""
    return _digest("mailroom-mailbox", kind, *parts)


def content(raw: bytes) -> str:
    """A message known by its exact bytes."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def header(block: bytes) -> str:
    """A message over ``max_message_bytes``, of which only the header block was fetched."""
    return "header-sha256:" + hashlib.sha256(block).hexdigest()


def graph_message(message_id: str) -> str:
    """A Microsoft Graph message, by its immutable id (``Prefer: IdType="ImmutableId"``)."""
    return "graph:" + message_id


def lmtp_delivery(digest: str, recipient: str) -> str:
    """One recipient's delivery of a message an MTA handed over by LMTP: the SHA-256 of the
    message as the MTA sent it (the same on each retry from its queue) and the recipient."""
    return f"lmtp:sha256:{digest}\0{recipient}"


def webhook_id(mailbox: str, message: str) -> str:
    """The webhook-id of ``message`` (``content``, ``header``, ``graph_message``) in the
    folder ``mailbox`` (``mailbox_key``)."""
    return "msg_" + _digest("mailroom-message", mailbox, message)[:32]
