"""webhook.payload_body: the bytes json.dumps(build_payload(...)) would give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailroom.delivery.webhook import build_payload, payload_body
from mailroom.envelope import Envelope, Outcome
from mailroom.mail import message, routing

EML = Path(__file__).parent / "eml"


async def _settle(outcome: Outcome, why: str) -> None:
    return None


@pytest.mark.parametrize("name", sorted(p.name for p in EML.glob("*.eml")))
@pytest.mark.parametrize("key", ["k-1", None])
def test_payload_body_is_the_json_of_build_payload(name: str, key: str | None) -> None:
    raw = (EML / name).read_bytes()
    envelope = Envelope(
        mailbox="box", ref="uid 1", idempotency_key="box-1", raw=raw, size=len(raw), _settle=_settle
    )
    parsed = message.parse(raw)
    decision = routing.Deliver(key, "To")
    payload = build_payload(envelope, parsed, decision)
    body = payload_body(envelope, parsed, decision)
    assert body == json.dumps(payload).encode()
    assert json.loads(body) == payload
    assert list(payload)[-1] == "raw"
