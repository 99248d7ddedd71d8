"""Pure: what happens to one message, before any I/O: the dispatcher's steps in one place.

The dispatcher acts on it, ``mailroom route`` shows it for a ``.eml`` file, ``mailroom check``
counts it over a mailbox's unseen mail, and ``mailroom run --dry-run`` logs it: all four take
the same decision. Too large → dead letter with a notice; then ``routing.decide``:
auto-generated → ignored, unparsable → dead letter, no key → rejected with a notice, a key →
posted. Routing needs only the header block.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from mailroom.mail import message, routing

__all__ = ["TOO_LARGE", "Action", "Verdict", "decide"]

TOO_LARGE = "too large"  # the reason of a message over max_message_bytes


class Action(enum.Enum):
    """What happens to the message (before the webhook answers, for a delivery)."""

    DELIVER = "deliver"
    REJECT = "reject"
    IGNORE = "ignore"
    DEAD_LETTER = "dead-letter"


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision on one message: ``why`` is the reject reason, the ignore rule, or why it
    is dead-lettered; ``decision`` is routing's own (None when it was not asked)."""

    action: Action
    why: str
    parsed: message.ParsedMessage
    decision: routing.Decision | None

    @property
    def delivery(self) -> routing.Deliver:
        """Routing's decision to deliver (the verdict's ``action`` is ``DELIVER``)."""
        if not isinstance(self.decision, routing.Deliver):
            raise ValueError(f"a {self.action.value} verdict has no delivery")
        return self.decision

    @property
    def notice(self) -> bool:
        """Whether a reject notice may go (the policy still decides to whom)."""
        return self.action is Action.REJECT or self.why == TOO_LARGE


def decide(
    parsed: message.ParsedMessage, rules: routing.RoutingRules, *, too_large: bool
) -> Verdict:
    """The decision the dispatcher takes for ``parsed`` under a mailbox's ``rules``;
    ``too_large``: the server said it is over ``max_message_bytes`` (only its header block was
    read)."""
    if too_large:
        return Verdict(Action.DEAD_LETTER, TOO_LARGE, parsed, None)
    decision = routing.decide(parsed, rules)
    if isinstance(decision, routing.Ignore):
        return Verdict(Action.IGNORE, decision.rule, parsed, decision)
    if isinstance(decision, routing.Reject):
        if decision.reason == routing.UNPARSABLE_MESSAGE:  # no sender to tell
            return Verdict(Action.DEAD_LETTER, decision.reason, parsed, decision)
        return Verdict(Action.REJECT, decision.reason, parsed, decision)
    return Verdict(Action.DELIVER, "", parsed, decision)
