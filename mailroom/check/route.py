"""What mailroom would do with one message, without the network: ``mailroom route`` shows it
for a ``.eml`` file, ``mailroom check`` counts it over a mailbox's unseen messages.

Pure. The decision is the dispatcher's own (``mailroom.decision``). Routing needs only the
header block, so ``check`` fetches no bodies.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from mailroom.config import Config, MailboxConfig
from mailroom.delivery.dispatch import notice_text
from mailroom.delivery.webhook import build_payload
from mailroom.envelope import Envelope, Outcome
from mailroom.mail import decision, message, routing
from mailroom.mail.decision import Action, Verdict
from mailroom.redact import origin

__all__ = ["Action", "Tally", "Verdict", "decide", "describe"]

RAW_SHOWN = 76  # base64 characters of "raw" that ``describe`` prints


def decide(raw: bytes, mailbox: MailboxConfig, *, size: int | None = None) -> Verdict:
    """The decision the dispatcher takes for ``raw`` (``size``: the server's RFC822.SIZE,
    when ``raw`` is only the header block)."""
    too_large = (size if size is not None else len(raw)) > mailbox.max_message_bytes
    return decision.decide(message.parse(raw), mailbox.routing, too_large=too_large)


class Tally:
    """Verdicts counted by action and reason, for ``check``."""

    def __init__(self, verdicts: Iterable[Verdict] = ()) -> None:
        self.actions: Counter[Action] = Counter()
        self.reasons: dict[Action, Counter[str]] = {action: Counter() for action in Action}
        for verdict in verdicts:
            self.add(verdict)

    def add(self, verdict: Verdict) -> None:
        self.actions[verdict.action] += 1
        if verdict.why:
            self.reasons[verdict.action][verdict.why] += 1

    def text(self, action: Action) -> str:
        """``8 rejected (7 unknown incoming email, 1 too large)``."""
        count = self.actions[action]
        word = {
            Action.DELIVER: "posted to the webhook",
            Action.REJECT: "rejected",
            Action.IGNORE: "ignored as auto-generated",
            Action.DEAD_LETTER: "dead-lettered",
        }[action]
        reasons = ", ".join(f"{n} {why}" for why, n in self.reasons[action].most_common())
        return f"{count} {word}" + (f" ({reasons})" if reasons else "")


def describe(raw: bytes, mailbox: MailboxConfig, config: Config) -> list[str]:
    """``mailroom route``: the lines saying what would happen to ``raw`` in ``mailbox``."""
    verdict = decide(raw, mailbox)
    rules = mailbox.routing
    lines = [f"mailbox:  {mailbox.id} (address {rules.address.template})"]
    parsed = verdict.parsed
    if isinstance(delivered := verdict.decision, routing.Deliver):  # Action.DELIVER
        hook = mailbox.webhook
        if delivered.matched_header is None:  # routing: forward_all, and no address matched
            lines += [
                f"matched:  nothing fits {rules.address.template}; routing: forward_all posts "
                "it all the same (the application matches it)",
                "key:      none",
            ]
        else:
            lines += [f"matched:  {delivered.matched_header}", f"key:      {delivered.key}"]
        lines.append(
            f"decision: deliver: POST to {origin(hook.url)} (webhook.url), format {hook.format}"
        )
        lines += _payload(parsed, mailbox, delivered)
        return lines
    if verdict.action is Action.IGNORE:
        lines.append(
            f"decision: ignore: auto-generated, rule {verdict.why} "
            f"(ignore_auto_generated.{verdict.why}); no webhook, no notice"
        )
    elif verdict.action is Action.DEAD_LETTER:
        why = verdict.why
        if why == routing.UNPARSABLE_MESSAGE and verdict.parsed.defects:
            why += f" ({', '.join(verdict.parsed.defects)})"
        lines.append(f"decision: dead-letter: {why}; {mailbox.dead_letter}")
    else:
        searched = ", ".join(routing.CANDIDATE_HEADERS)
        lines += [
            f"matched:  nothing: no address in {searched} fits {rules.address.template}"
            if rules.address.has_key
            else f"matched:  nothing: no reply id reply-<key>@{rules.reply_domain} in "
            "References or In-Reply-To (a dedicated address takes replies only)",
            f"decision: reject: {verdict.why}",
        ]
    if verdict.action is not Action.IGNORE and verdict.why != routing.UNPARSABLE_MESSAGE:
        lines.append(f"notice:   {notice_text(parsed, mailbox, config)}")
    return lines


def _payload(
    parsed: message.ParsedMessage, mailbox: MailboxConfig, decision: routing.Deliver
) -> list[str]:
    raw = parsed.raw
    if mailbox.webhook.format == "raw":
        return [f"payload:  the message itself, {len(raw)} bytes (format: raw)"]

    async def unused(outcome: Outcome, why: str) -> None:  # pragma: no cover - never settled
        raise AssertionError(outcome)

    # The real webhook-id names the mailbox's server and the message as the server holds it
    # (mailroom.identity); this one only stands in.
    stand_in = f"msg_{hashlib.sha256(raw).hexdigest()[:32]}"
    envelope = Envelope(
        mailbox=mailbox.id,
        ref="file",
        idempotency_key=stand_in,
        raw=raw,
        size=len(raw),
        _settle=unused,
    )
    payload: dict[str, Any] = build_payload(envelope, parsed, decision)
    encoded = payload["raw"]
    if len(encoded) > RAW_SHOWN:
        payload["raw"] = f"{encoded[:RAW_SHOWN]}… ({len(encoded)} characters of base64)"
    body = json.dumps(payload, indent=2, ensure_ascii=False)
    return ["payload:  (the id stands in for the one the mailbox gives)", *body.splitlines()]
