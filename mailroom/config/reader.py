"""Typed getters over one YAML mapping that know their dotted path (``mailboxes[1].port``)."""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from mailroom import tls
from mailroom.config.model import Secret
from mailroom.errors import ConfigError

_REQUIRED: Any = object()  # the default of a required key
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


_HOST_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")
# RFC 2177 §3: clients should re-issue IDLE at least every 29 minutes.


IDLE_TIMEOUT_MAX_S = 1740


class Section:
    """One mapping of the YAML tree: typed getters that know their dotted path."""

    def __init__(self, data: Any, path: str, env: Mapping[str, str], base_dir: Path) -> None:
        if not isinstance(data, dict):
            self._fail(path, f"expected a mapping of keys, got {kind(data)}")
        self.data: dict[str, Any] = data
        self.path = path
        self.env = env
        self.base_dir = base_dir
        self.used: set[str] = set()

    @staticmethod
    def _fail(path: str, message: str) -> NoReturn:
        raise ConfigError(path, message)

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> NoReturn:
        self._fail(self.where(key), message)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            if default is _REQUIRED:
                self.fail(key, "is required")
            return default
        if isinstance(value, str):
            value = self._expand(key, value)
        return value

    def _expand(self, key: str, value: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.env:
                self.fail(
                    key, f"environment variable {name} is not set; export it or edit the file"
                )
            return self.env[name]

        return _ENV_RE.sub(substitute, value)

    def text(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.raw(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.fail(key, f"expected a string, got {kind(value)}")
        text = str(value)
        if not text.strip():
            self.fail(key, "must not be empty")
        if any(c in text for c in "\r\n\0"):
            self.fail(key, "must be one line (no CR, LF or NUL)")
        return text

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        self.fail(key, f"expected true or false, got {value!r}")

    def number(self, key: str, default: Any, *, lo: float, hi: float, integer: bool = False) -> Any:
        value = self.raw(key, default)
        if value is None:
            return None
        try:
            if isinstance(value, bool):
                raise ValueError
            number: float = int(value) if integer else float(value)
        except (TypeError, ValueError):
            kind = "a whole number" if integer else "a number"
            self.fail(key, f"expected {kind}, got {value!r}")
        if not lo <= number <= hi:
            self.fail(key, f"{number:g} is out of range; use a value from {lo:g} to {hi:g}")
        return number

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> Any:
        value = self.text(key, default)
        if value not in choices:
            self.fail(key, f"{value!r} is not one of: {', '.join(choices)}")
        return value

    def path_value(self, key: str) -> str | None:
        value = self.text(key, None)
        if value is None:
            return None
        resolved = (self.base_dir / value).resolve()
        if not resolved.is_file():
            self.fail(key, f"file {value} does not exist or is not a file")
        return str(resolved)

    def ca_file(self, key: str = "ca_file") -> str | None:
        """A CA bundle, loaded now into the TLS context every client will use: a file that is
        not PEM is a config error here, not a failing connection later."""
        path = self.path_value(key)
        if path is not None:
            try:
                tls.client_context(ca_file=path)
            except tls.TlsConfigError as exc:
                self.fail(key, str(exc))
        return path

    def secret(self, key: str, *, required: bool) -> Secret | None:
        file_key = f"{key}_file"
        inline, from_file = self.has(key), self.has(file_key)
        if inline and from_file:
            self.fail(key, f"give either {key} or {file_key}, not both")
        if from_file:
            path = self.base_dir / self.text(file_key)
            try:
                text = path.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                self.fail(file_key, f"cannot read {path}: {reason}")
            if not text:
                self.fail(file_key, f"{path} is empty")
            return Secret(text)
        if inline:
            self.used.add(key)
            value = self.data[key]
            if not isinstance(value, str):
                # YAML reads an unquoted 0755 as 493 and 1_000 as 1000: never guess a secret.
                self.fail(key, f"expected a string, got {kind(value)}; put the value in quotes")
            return Secret(self._expand(key, value))
        self.used.update((key, file_key))
        if required:
            self.fail(key, f"is required (or {file_key} naming a file that holds it)")
        return None

    def section(self, key: str) -> Section | None:
        value = self.raw(key, None)
        if value is None:
            return None
        return Section(value, self.where(key), self.env, self.base_dir)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            self.fail(unknown[0], f"unknown key; known keys here: {known}")


def kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "true/false", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )


def _address(section: Section, key: str, value: str) -> str:
    """The addr-spec of ``value`` (``Name <a@b>`` or ``a@b``), or a ConfigError."""
    address = email.utils.parseaddr(value)[1]
    if "@" not in address or not address.partition("@")[0] or " " in address:
        section.fail(key, f"{value!r} is not an email address; write it like noreply@example.com")
    return address
