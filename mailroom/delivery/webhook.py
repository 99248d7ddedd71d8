"""The webhook contract (docs/webhook.md): payload, headers, signature, and
what answers mean.

Pure: no I/O. The dispatcher sends what this builds and acts on what ``classify`` says.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import warnings
from dataclasses import dataclass
from typing import Any

from mailroom import USER_AGENT
from mailroom.config import JwtConfig, WebhookConfig
from mailroom.delivery.notices import MAX_REASON_CHARS
from mailroom.envelope import Envelope, Outcome
from mailroom.errors import PermanentDeliveryError, TransientDeliveryError
from mailroom.mail import message, routing
from mailroom.redact import printable

__all__ = [
    "Rejected",
    "build_payload",
    "classify",
    "jwt_token",
    "payload_body",
    "request_headers",
    "sign",
]

MAX_ANSWER_BYTES = 64 * 1024
# 408/425/429 and 5xx are worth retrying (RFC 9110 §15); 401/403/404 mean a misconfiguration that
# a fix will cure, so the message waits for it instead of being dead-lettered.
TRANSIENT = frozenset({408, 425, 429})
MISCONFIGURED = frozenset({401, 403, 404})
# 409 Conflict: the receiver already has this webhook-id (a repeat after a crash or a
# failover); the message is settled as delivered.
CONFLICT = 409
SIGN_COPY_BYTES = 64 * 1024  # a larger body is signed without copying it


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: str


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks ``webhook-signature``: ``v1,<base64 HMAC-SHA256(id.timestamp.body)>``."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{webhook_id}.{timestamp}.".encode()
    if len(body) < SIGN_COPY_BYTES:
        digest = hmac.digest(key, signed + body, hashlib.sha256)  # one call: the fastest
    else:  # no copy of a large body
        mac = hmac.new(key, signed, hashlib.sha256)
        mac.update(body)
        digest = mac.digest()
    return "v1," + base64.b64encode(digest).decode()


def jwt_token(config: JwtConfig, now: int) -> str:
    """HS256 JWT with ``iss``, ``iat`` and (by default) a random ``nonce``, as GitLab's MailRoom
    sends (RFC 7519); GitLab refuses tokens whose ``iat`` is older than 5 minutes."""
    import jwt  # noqa: PLC0415  # here: 2 MiB at start where no webhook.jwt is set

    claims: dict[str, str | int] = {"iss": config.issuer, "iat": now}
    if config.nonce:
        claims["nonce"] = secrets.token_hex(12)  # MailRoom: SecureRandom.hex(12)
    with warnings.catch_warnings():
        # A key under 32 bytes (RFC 7518 §3.2) is the receiver's choice; the config's load
        # warnings say so once, where PyJWT would warn on every request.
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(claims, config.key(), algorithm=config.algorithm)


def _address(address: message.Address | None) -> dict[str, str] | None:
    return None if address is None else {"name": address.name, "address": address.address}


def build_payload(
    envelope: Envelope, parsed: message.ParsedMessage, decision: routing.Deliver
) -> dict[str, Any]:
    """The JSON body of the webhook contract (docs/webhook.md)."""
    payload = _payload_fields(envelope, parsed, decision)
    payload["raw"] = base64.b64encode(envelope.raw).decode("ascii")
    return payload


def payload_body(
    envelope: Envelope, parsed: message.ParsedMessage, decision: routing.Deliver
) -> bytes:
    """``json.dumps(build_payload(...)).encode()``, byte for byte, without running the JSON
    encoder over the base64 of the raw message (the largest member, which needs no escaping):
    "raw" is the last member, appended as bytes."""
    head = json.dumps(_payload_fields(envelope, parsed, decision))
    return b"".join(
        (head[:-1].encode("ascii"), b', "raw": "', base64.b64encode(envelope.raw), b'"}')
    )


def _payload_fields(
    envelope: Envelope, parsed: message.ParsedMessage, decision: routing.Deliver
) -> dict[str, Any]:
    """Every member of the payload but "raw", in the contract's order."""
    return {
        "id": envelope.idempotency_key,
        "mailbox": envelope.mailbox,
        "key": decision.key,
        "matched_header": decision.matched_header,
        "message_id": parsed.message_id,
        "in_reply_to": parsed.in_reply_to,
        "references": list(parsed.references),
        "from": _address(parsed.from_),
        "reply_to": [_address(a) for a in parsed.reply_to],
        "to": [_address(a) for a in parsed.to],
        "cc": [_address(a) for a in parsed.cc],
        "subject": parsed.subject,
        "date": parsed.date,
        "text": parsed.text,
        "html": parsed.html,
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size": a.size}
            for a in parsed.attachments
        ],
        "authentication_results": list(parsed.authentication_results),
        "size": envelope.size,
        "truncated": list(parsed.truncated),  # limits this message went over (message.py)
    }


def request_headers(
    config: WebhookConfig, *, webhook_id: str, body: bytes, content_type: str
) -> dict[str, str]:
    """What every request to ``config`` carries: the Standard Webhooks id, timestamp and
    signature, the JWT header and the authorization, as configured."""
    now = int(time.time())
    headers = {
        "Content-Type": content_type,
        "User-Agent": USER_AGENT,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(now),
    }
    if config.signing_secret is not None:
        headers["webhook-signature"] = sign(config.signing_secret.reveal(), webhook_id, now, body)
    if config.jwt is not None:
        headers[config.jwt.header] = jwt_token(config.jwt, now)
    if config.token is not None:
        headers["Authorization"] = _token_authorization(config.token.reveal(), config)
    elif config.basic is not None:
        # RFC 7617 with UTF-8 (aiohttp's BasicAuth is deprecated and latin-1 only).
        pair = f"{config.basic.user}:{config.basic.password.reveal()}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    return headers


def _token_authorization(token: str, config: WebhookConfig) -> str:
    if config.token_scheme == "token":
        # MailRoom's postback: Faraday's token_auth writes `Token token="<Ruby inspect>"`,
        # which Rails' authenticate_with_http_token reads.
        quoted = token.replace("\\", "\\\\").replace('"', '\\"')
        return f'Token token="{quoted}"'
    return f"Bearer {token}"


def classify(
    status: int, answer: bytes, retry_after: float | None, config: WebhookConfig | None = None
) -> Outcome | Rejected:
    """What an answer means (docs/webhook.md). A refusal's
    ``{"message": ...}`` (GitLab's 400 ``{"success": false, "message": ...}``) is quoted in the
    error; a 401 names the JWT secret file when there is one. 409: the receiver already has
    it."""
    if 200 <= status < 300 or status == CONFLICT:
        return Outcome.DELIVERED
    document = _document(answer) if 400 <= status < 500 else None
    if status == 422 and document is not None and isinstance(document.get("reject"), str):
        # The application's text, bounded and on one line: it is logged and goes in a notice.
        return Rejected(printable(document["reject"], MAX_REASON_CHARS, blank=True))
    if status in TRANSIENT or 500 <= status < 600:
        raise TransientDeliveryError(f"HTTP {status}", retry_after_s=retry_after)
    if status in MISCONFIGURED:
        raise TransientDeliveryError(
            f"HTTP {status}: {_credentials_hint(status, config)} (retrying until fixed)",
            retry_after_s=retry_after,
            misconfigured=True,
        )
    if 300 <= status < 400:
        raise TransientDeliveryError(
            f"HTTP {status}: redirects are not followed; set webhook.url to the final URL",
            misconfigured=True,
        )
    message = document.get("message") if document else None
    if isinstance(message, str) and message.strip():
        raise PermanentDeliveryError(f"HTTP {status}: {printable(message, 300, blank=True)}")
    raise PermanentDeliveryError(f"HTTP {status}")


def _credentials_hint(status: int, config: WebhookConfig | None) -> str:
    jwt = config.jwt if config is not None else None
    if status == 401 and jwt is not None and jwt.secret_file is not None:
        return (
            f"the receiver refused the {jwt.header} JWT: {jwt.secret_file} must be the secret "
            "file the receiver reads (GitLab: secret_file of this mailbox type), and both "
            "clocks right (GitLab refuses tokens older than 5 minutes)"
        )
    return "check webhook.url and its credentials"


def _document(answer: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(answer)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None
