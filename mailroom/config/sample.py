"""The minimal config a first setup starts from: ``mailroom sample-config`` prints it, and
docs/getting-started.md shows the same text (tests/test_examples.py keeps them equal and loads
it)."""

from __future__ import annotations

__all__ = ["SAMPLE", "SAMPLE_HINT"]

SAMPLE_HINT = "`mailroom sample-config > mailroom.yml` writes a minimal one to start from"

SAMPLE = """\
# mailroom: one IMAP mailbox, one webhook. Every option: examples/mailroom.yml in the clone.
mailboxes:
  - id: incoming
    address: "incoming+%{key}@example.com"  # %{key}: the part the webhook gets as "key"
    host: imap.example.com
    port: 993
    ssl: true
    user: incoming@example.com
    password: ${IMAP_PASSWORD}              # from the environment (or password_file: PATH)
    delete_after_delivery: false            # keep settled mail (marked \\Seen) while you try
webhook:
  url: https://app.example.com/incoming-email
  # signing_secret: ${WEBHOOK_SECRET}       # whsec_...: lets the app check each request
log: {format: text}
"""
