"""A tiny webhook receiver for the mailroom demo: prints each message, answers 204.

    python examples/receiver.py --port 8025 [--secret whsec_...] [--refuse closed-]

With --secret, each request is checked as the Standard Webhooks spec says, and answered with
401 when it fails: the signature (`webhook-signature: v1,<base64 HMAC-SHA256 of
"{webhook-id}.{webhook-timestamp}.{body}">`) must match, and `webhook-timestamp` must be within
5 minutes of now, so that a request recorded once cannot be replayed later. With --refuse, a
message whose key starts with that prefix is refused as an application would: 422 with
`{"reject": "<reason>"}`, and mailroom sends the sender a reject notice with that reason.
A real receiver also drops repeats by `webhook-id` (delivery is at least once).
Only the standard library and aiohttp are used.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import signal
import time
from typing import Any

from aiohttp import web

TEXT_LINES = 3
TOLERANCE_S = 5 * 60  # Standard Webhooks: refuse timestamps further than this from now


def refusal(secret: str, headers: dict[str, str], body: bytes, now: float) -> str | None:
    """Why the request is not mailroom's (a bad signature, a stale or future timestamp), or
    None when it is."""
    try:
        timestamp = int(headers.get("webhook-timestamp", ""))
    except ValueError:
        return "no webhook-timestamp"
    if abs(now - timestamp) > TOLERANCE_S:
        return f"webhook-timestamp {timestamp} is more than {TOLERANCE_S} s from now"
    if not verify(secret, headers, body):
        return "bad signature"
    return None


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """True when one of the `v1,` signatures matches (Standard Webhooks)."""
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        return False
    msg_id, timestamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for candidate in headers.get("webhook-signature", "").split():
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return True
    return False


def _address(value: Any) -> str:
    if not isinstance(value, dict):
        return "-"
    name, address = value.get("name"), value.get("address") or ""
    return f"{name} <{address}>" if name else address


def summary(msg_id: str, payload: dict[str, Any]) -> str:
    """A few human-readable lines about one webhook payload."""
    lines = [
        f"── webhook {msg_id or '-'}  mailbox={payload.get('mailbox')}  key={payload.get('key')}",
        f"   from:    {_address(payload.get('from'))}",
        f"   subject: {payload.get('subject') or ''}",
    ]
    text = (payload.get("text") or "").strip().splitlines()
    lines += [f"   | {line}" for line in text[:TEXT_LINES]]
    if len(text) > TEXT_LINES:
        lines.append(f"   | … ({len(text) - TEXT_LINES} more lines)")
    attachments = payload.get("attachments") or []
    if attachments:
        lines.append(f"   attachments: {len(attachments)}")
    return "\n".join(lines)


def make_app(
    secret: str | None, *, once: bool = False, refuse: str | None = None
) -> web.Application:
    """The receiver app: POST anywhere."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        msg_id = headers.get("webhook-id", "")
        if secret is not None and (problem := refusal(secret, headers, body, time.time())):
            print(f"── webhook {msg_id or '-'}: {problem}, answered 401", flush=True)
            return web.Response(status=401)
        try:
            payload = json.loads(body)
        except ValueError:
            print(f"── webhook {msg_id or '-'}: not JSON ({len(body)} bytes)", flush=True)
            return web.Response(status=400)
        payload = payload if isinstance(payload, dict) else {}
        if payload.get("type") == "mailroom.check":  # mailroom check --send-test
            print(f"── webhook {msg_id}: mailroom check's test event, signed", flush=True)
            return web.Response(status=204)
        print(summary(msg_id, payload), flush=True)
        key = payload.get("key")
        if refuse and isinstance(key, str) and key.startswith(refuse):
            reason = f"Ticket {key} is closed. Write to us again without replying to it."
            print(f"   answered 422 {json.dumps({'reject': reason})}", flush=True)
            return web.json_response({"reject": reason}, status=422)
        if once:
            asyncio.get_running_loop().call_soon(_stop)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    return app


def _stop() -> None:
    signal.raise_signal(signal.SIGINT)  # web.run_app shuts down cleanly on SIGINT


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="Print mailroom webhooks.")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 in a container")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--secret", default=None, help="Standard Webhooks secret (whsec_...)")
    parser.add_argument("--once", action="store_true", help="exit after the first message")
    parser.add_argument(
        "--refuse",
        metavar="PREFIX",
        help="answer 422 with a reject reason to messages whose key starts with PREFIX",
    )
    args = parser.parse_args()
    print(f"receiver listening on http://{args.host}:{args.port}/", flush=True)
    app = make_app(args.secret, once=args.once, refuse=args.refuse)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
