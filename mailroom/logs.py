"""Log formats (one JSON object per line, or text) and the loggers' levels.

Every mailroom log line starts with the mailbox id. Structured fields go in ``extra=`` under
the names in ``FIELDS`` and come out as JSON keys. Secrets never reach a log line: config
values are ``Secret`` objects whose repr is masked, and aioimaplib's DEBUG output (whole
messages, LOGIN arguments) is never enabled (``sources.imap_session`` pins its logger).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["FIELDS", "MailboxLog", "configure"]

# Structured fields a log call may pass in ``extra``.
FIELDS = ("mailbox", "uid", "message_id", "webhook_id", "outcome", "status", "attempt", "delay_s")


class MailboxLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger for one mailbox: every line starts with its id and carries it as a field."""

    def __init__(self, logger: logging.Logger, mailbox: str) -> None:
        super().__init__(logger, {"mailbox": mailbox})
        self.prefix = mailbox.replace("%", "%%") + ": "  # the id is part of the format string

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(kwargs.get("extra") or {}), "mailbox": self.extra["mailbox"]}  # type: ignore[index]
        return self.prefix + str(msg), kwargs


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "msg": ..., <FIELDS>...}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Install the chosen format on the root logger (idempotent)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("mailroom").setLevel(level.upper())
