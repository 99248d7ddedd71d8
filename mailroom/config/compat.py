"""What a config file may hold beyond the schema, taken out before it is read: ``x-`` keys,
and the old names of keys that were renamed or retired.

``x-`` keys (at any level, as in compose files) are for YAML anchors: a block written once
under ``x-imap: &imap`` and merged into each mailbox with ``<<: *imap``. They are dropped, so
that "unknown keys are errors" still holds for every other key.

``DEPRECATED`` lists keys that still work but go away in the next major release (the policy:
docs/upgrading.md). Each is read under its new name, or dropped when it no longer has an
effect, and named in ``Config.warnings``: ``mailroom run`` logs them at start, ``mailroom
check`` shows them. Setting both the old and the new name is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mailroom.errors import ConfigError
from mailroom.redact import key_name

__all__ = ["DEPRECATED", "Deprecated", "normalise"]

EXTENSION_PREFIX = "x-"


@dataclass(frozen=True, slots=True, kw_only=True)
class Deprecated:
    """A key on its way out. ``path`` says where: dotted, ``[]`` for any item of a list
    (``mailboxes[].inbox_options.poll_interval``)."""

    path: str
    since: str  # the release that deprecated it
    replacement: str | None  # the key of the same block that takes its place; None: no effect
    note: str = ""  # what else to do, when renaming is not all

    @property
    def key(self) -> str:
        return self.path.rpartition(".")[2].rpartition("]")[2]


# The keys deprecated so far (docs/upgrading.md lists them for users); empty in 0.1.
DEPRECATED: tuple[Deprecated, ...] = ()


def normalise(
    data: Any, deprecated: Iterable[Deprecated] | None = None
) -> tuple[Any, tuple[str, ...]]:
    """``data`` without ``x-`` keys and with deprecated keys (``DEPRECATED`` unless given)
    under their new names (a copy; aliases that shared a block share its copy), and a warning
    per deprecated key."""
    table = {entry.path: entry for entry in (DEPRECATED if deprecated is None else deprecated)}
    warnings: list[str] = []
    copies: dict[int, Any] = {}
    # (original, its copy, pattern, path): filled from a stack, not by recursion, since a
    # document may nest as deeply as YAML allows, or contain itself.
    pending: list[tuple[Any, Any, str, str]] = []

    def copy_of(node: Any, pattern: str, path: str) -> Any:
        if not isinstance(node, dict | list):
            return node
        if id(node) not in copies:
            copies[id(node)] = [] if isinstance(node, list) else {}
            pending.append((node, copies[id(node)], pattern, path))
        return copies[id(node)]

    result = copy_of(data, "", "")
    while pending:
        node, copy, pattern, path = pending.pop()
        if isinstance(node, list):
            copy.extend(
                copy_of(item, f"{pattern}[]", f"{path}[{i}]") for i, item in enumerate(node)
            )
            continue
        for key, value in node.items():
            if isinstance(key, str) and key.startswith(EXTENSION_PREFIX):
                continue
            entry = table.get(_join(pattern, key)) if isinstance(key, str) else None
            name = key if entry is None else _renamed(node, entry, _join(path, key), warnings)
            if name is not None:
                copy[name] = copy_of(value, _join(pattern, name), _join(path, name))
    return result, tuple(warnings)


def _renamed(
    block: dict[Any, Any], entry: Deprecated, path: str, warnings: list[str]
) -> str | None:
    """The name a deprecated key is read under (None: dropped), and its warning."""
    note = f"; {entry.note}" if entry.note else ""
    if entry.replacement is None:
        warnings.append(
            f"{path}: deprecated since {entry.since}, and it has no effect any more: remove it "
            f"(docs/upgrading.md){note}"
        )
        return None
    if entry.replacement in block:
        raise ConfigError(
            path, f"is the old name of {entry.replacement}, which is set too; remove {entry.key}"
        )
    warnings.append(
        f"{path}: deprecated since {entry.since}: rename it to {entry.replacement} (the old name "
        f"goes in the next major release; docs/upgrading.md){note}"
    )
    return entry.replacement


def _join(path: str, key: Any) -> str:
    name = key_name(key)
    return f"{path}.{name}" if path else name
