"""Log formats (one JSON object per line, or text) and the loggers' levels.

Every mailroom log line starts with the mailbox id. Structured fields go in ``extra=`` under
the names in ``FIELDS`` and come out as JSON keys. Secrets never reach a log line: config
values are ``Secret`` objects whose repr is masked, and aioimaplib's DEBUG output (whole
messages, LOGIN arguments) is never enabled (``sources.imap_session`` pins its logger).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["FIELDS", "MailboxLog", "configure", "reopen"]

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


class _Mailboxes(logging.Filter):
    """Lines of these mailboxes, and lines of none (the process's own)."""

    def __init__(self, mailboxes: frozenset[str]) -> None:
        super().__init__()
        self.mailboxes = mailboxes

    def filter(self, record: logging.LogRecord) -> bool:
        mailbox = record.__dict__.get("mailbox")
        return mailbox is None or mailbox in self.mailboxes


def configure(
    fmt: str = "json",
    level: str = "info",
    stream: TextIO | None = None,
    files: Sequence[tuple[str, frozenset[str] | None]] = (),
) -> None:
    """Install the chosen format on the root logger (idempotent), and a JSON log file for each
    of ``files`` (its path, and the mailboxes whose lines go there; None: all of them).

    A file is opened for appending and reopened when it was replaced (``WatchedFileHandler``
    looks before each line: logrotate's rename-and-create) or on ``reopen`` (SIGHUP); with
    ``copytruncate`` the append mode writes at the new end. ``OSError`` when one cannot be
    opened (nothing is changed then)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handlers: list[logging.Handler] = [handler]
    try:
        for path, mailboxes in files:
            watched = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
            watched.setFormatter(JsonFormatter())
            if mailboxes is not None:
                watched.addFilter(_Mailboxes(mailboxes))
            handlers.append(watched)
    except OSError:
        for opened in handlers[1:]:
            opened.close()
        raise
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        if isinstance(old, logging.FileHandler):
            old.close()
    for new in handlers:
        root.addHandler(new)
    root.setLevel(logging.WARNING)
    logging.getLogger("mailroom").setLevel(level.upper())


def reopen() -> None:
    """Reopen the log files that were moved or removed (SIGHUP after a rotation)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.WatchedFileHandler):
            handler.reopenIfNeeded()
