"""Typed getters over one YAML mapping that know their dotted path (``mailboxes[1].port``).

Errors name the path and say what to do. They show a value only when it is short and one
word (``expected true or false, got 'maybe'``): never a secret, and never a secret that a
stray quote made part of another value. URLs are shown as ``scheme://host:port`` only.
"""

from __future__ import annotations

import difflib
import email.utils
import errno
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn, overload
from urllib.parse import urlsplit

from mailroom.config.document import walk
from mailroom.config.model import config_keys
from mailroom.errors import ConfigError
from mailroom.redact import WORD, key_name, origin
from mailroom.trust import tls
from mailroom.trust.values import Secret

REQUIRED: Any = object()  # the default of a required key
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
HOST_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")

# RFC 2177 §3: clients should re-issue IDLE at least every 29 minutes.
IDLE_TIMEOUT_MAX_S = 1740
SECRET_FILE_MAX_BYTES = 64 * 1024  # a secret file holds one secret, not /dev/zero

# Every key any block of the config has, derived from the model (model.FIELD_KEYS) once, at
# import: each kind's config class is in model.py, as IMAP's and Graph's are. A key outside
# this set that is close to a required key that is missing is reported as the typo it is
# ("unknown key pasword; did you mean password?"), not as "password: is required".
KEYS = config_keys()
# The keys read with ``Section.secret``: those with a ``<key>_file`` form.
SECRET_KEYS = frozenset(key for key in KEYS if f"{key}_file" in KEYS)
# What an offline read (``mailroom route``) puts where a secret is given: values that pass every
# check of their kind (a Standard Webhooks secret; base64 of 32 bytes for the rest).
_STAND_IN = "A" * 43 + "="
_STAND_INS = {"signing_secret": "whsec_" + _STAND_IN}
_UNREAD_OFFLINE = {*SECRET_KEYS, *(f"{key}_file" for key in SECRET_KEYS), "ca_file"}


def shown(value: Any) -> str:
    """``value`` for an error message: quoted when it is a short single word or a number,
    else only what it is (a line that swallowed the next one through a stray quote may
    hold a secret)."""
    if isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        if WORD.fullmatch(value):
            return repr(value)
        return f"a text of {len(value)} characters"
    return kind(value)


def suggestion(name: str, known: Iterable[str]) -> str:
    """``; did you mean password?`` for a close match of ``name`` among ``known``, or ``""``."""
    close = _closest(name, known)
    return f"; did you mean {close}?" if close else ""


FILE_MAX_BYTES = 4 * 1024 * 1024  # a config file, gitlab.yml, secrets.yml, an encrypted file


def read_regular(path: Path, limit: int = FILE_MAX_BYTES) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes, else
    ``OSError`` with a ``strerror`` that says why: a FIFO would block the start until someone
    writes to it, ``/dev/zero`` would never end (issue 18). Opened without blocking, then
    checked, so a FIFO cannot hold it up."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (a directory, a FIFO or a device)")
    with os.fdopen(fd, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data


def read_text(path: Path, limit: int = FILE_MAX_BYTES) -> str:
    """``read_regular`` as UTF-8 text (``UnicodeDecodeError`` otherwise)."""
    return read_regular(path, limit).decode("utf-8")


def read_file(base_dir: Path, name: str, *, secret: bool) -> str:
    """What the file ``name`` (relative to ``base_dir``) of a ``*_file`` key holds: for a
    secret its text without the trailing newline (UTF-8, not empty, at most 64 KiB), else ""
    once it is a readable regular file. ``ValueError`` says what is wrong without naming the
    file: a secret written by mistake as ``password_file: hunter2`` must not be printed."""
    path = base_dir / name
    where = "" if Path(name).is_absolute() else f" (relative to {base_dir})"
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"the file it names is a directory or a device{where}")
        with path.open("rb") as file:
            data = file.read(SECRET_FILE_MAX_BYTES + 1 if secret else 1)
    except FileNotFoundError:
        raise ValueError(f"the file it names does not exist{where}") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"cannot read the file it names: {reason}{where}") from None
    if not secret:
        return ""
    if len(data) > SECRET_FILE_MAX_BYTES:
        limit = SECRET_FILE_MAX_BYTES // 1024
        raise ValueError(f"the file it names is larger than {limit} KiB; it should hold one secret")
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError("the file it names is not UTF-8 text") from None
    if not text:
        raise ValueError(f"the file it names is empty{where}")
    return text


class Section:
    """One mapping of the YAML tree: typed getters that know their dotted path.

    ``offline``: for work that touches no network (``mailroom route``): a secret that is given
    is neither read nor expanded (a stand-in takes its place), and CA files are not loaded.
    """

    def __init__(
        self,
        data: Any,
        path: str,
        env: Mapping[str, str],
        base_dir: Path,
        *,
        offline: bool = False,
    ) -> None:
        if not isinstance(data, dict):
            self._fail(
                path,
                f"expected a mapping of keys, got {kind(data)}; "
                + (
                    "write key: value lines, indented under it"
                    if path
                    else "a config is key: value lines, mailboxes: and webhook: among them "
                    "(`mailroom sample-config` writes one)"
                ),
            )
        self.data: dict[Any, Any] = data
        self.path = path
        self.env = env
        self.base_dir = base_dir
        self.offline = offline
        self.used: set[str] = set()

    def child(self, data: Any, path: str) -> Section:
        """A section for ``data`` at ``path`` (absolute), read the way this one is."""
        return Section(data, path, self.env, self.base_dir, offline=self.offline)

    @staticmethod
    def _fail(path: str, message: str) -> NoReturn:
        raise ConfigError(path, message)

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, message: str) -> NoReturn:
        self._fail(self.where(key), message)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def required(self, key: str, message: str = "is required") -> NoReturn:
        """``key`` is missing: say so, unless an unknown key here is a typo of it."""
        strangers = [k for k in self.data if isinstance(k, str) and k not in KEYS]
        for name in (key, f"{key}_file"):
            close = difflib.get_close_matches(name, strangers, n=1)
            if close:
                self._fail(self.path, f"unknown key {key_name(close[0])}; did you mean {name}?")
        self.fail(key, message)

    def raw(self, key: str, default: Any = REQUIRED) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            if default is REQUIRED:
                self.required(key)
            return default
        if isinstance(value, str):
            value = self.expand(key, value)
        return value

    def expand(self, key: str, value: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.env:
                self.fail(
                    key, f"environment variable {name} is not set; export it or edit the file"
                )
            return self.env[name]

        return _ENV_RE.sub(substitute, value)

    def text(self, key: str, default: Any = REQUIRED) -> Any:
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
        self.fail(key, f"expected true or false, got {shown(value)}")

    def number(self, key: str, default: Any, *, lo: float, hi: float, integer: bool = False) -> Any:
        value = self.raw(key, default)
        if value is None:
            return None
        try:
            if isinstance(value, bool):
                raise ValueError
            number: float = float(value)
            if integer:
                if not number.is_integer():  # 1.5 connects: refused, not truncated
                    raise ValueError
                number = int(number) if isinstance(value, float) else int(value)
        except (TypeError, ValueError, OverflowError):  # int(.inf) overflows
            kind = "a whole number" if integer else "a number"
            self.fail(key, f"expected {kind}, got {shown(value)}")
        if not lo <= number <= hi:
            self.fail(
                key,
                f"{_plain(number)} is out of range; use a value from {_plain(lo)} to {_plain(hi)}",
            )
        return number

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> Any:
        value = self.text(key, default)
        if value not in choices:
            self.fail(
                key,
                f"{shown(value)} is not one of: {', '.join(choices)}{suggestion(value, choices)}",
            )
        return value

    def path_value(self, key: str) -> str | None:
        value = self.text(key, None)
        if value is None:
            return None
        try:
            read_file(self.base_dir, value, secret=False)
        except ValueError as exc:
            self.fail(key, str(exc))
        return str((self.base_dir / value).resolve())

    def url(
        self,
        key: str,
        default: Any = REQUIRED,
        *,
        schemes: tuple[str, ...] = ("https",),
        query: bool = False,
        userinfo: str = "remove it",
    ) -> Any:
        """A URL with one of ``schemes`` and a host. Never with ``user:password@``, nor
        (unless ``query``) with a query or fragment: they would carry a secret into logs and
        error messages. Errors show only ``scheme://host:port``."""
        value = self.text(key, default)
        if value is None:
            return None
        example = default if isinstance(default, str) else f"{schemes[-1]}://host/path"
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  (raises on a port that is not a number up to 65535)
        except ValueError:
            if value.count("[") != value.count("]"):
                self.fail(key, f"is not a URL (a [ without its ]); write it like {example}")
            parts = None
        if parts is None or parts.port == 0:
            self.fail(key, f"{origin(value)}: the port is not a number from 1 to 65535")
        if parts.scheme not in schemes or not parts.hostname:
            what = " or ".join(schemes)
            seen = f" ({origin(value)})" if parts.hostname else ""
            self.fail(key, f"is not an {what} URL{seen}; write it like {example}")
        if "@" in parts.netloc:
            self.fail(key, f"{origin(value)}: must not carry user:password@; {userinfo}")
        if not query and (parts.query or parts.fragment or value.endswith(("?", "#"))):
            self.fail(key, f"{origin(value)}: must not carry a ?query or #fragment; remove it")
        return value

    def proxy(self, key: str = "proxy") -> str | None:
        """An HTTP proxy (``http://[user:password@]host:port``), ``direct`` for none, or None
        (absent: the environment decides, ``mailroom.proxies``). Shown as scheme://host:port
        only: its credentials are a secret."""
        value: str | None = self.text(key, None)
        if value is None or value == "direct":
            return value
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            self.fail(
                key, "is not a proxy URL; write it like http://proxy.example.com:3128, or direct"
            )
        if port == 0 or parts.path not in ("", "/") or parts.query or parts.fragment:
            self.fail(key, f"{origin(value)}: a proxy URL is scheme://[user:password@]host:port")
        return value

    def ca_file(self, key: str = "ca_file") -> str | None:
        """A CA bundle, loaded now into the TLS context every client will use: a file that is
        not PEM is a config error here, not a failing connection later."""
        if self.offline:  # named, not loaded
            value = self.text(key, None)
            return None if value is None else str((self.base_dir / value).resolve())
        path = self.path_value(key)
        if path is not None:
            try:
                tls.client_context(ca_file=path)
            except tls.TlsConfigError as exc:
                if exc.ca_file:  # tls names the file: not here (read_file)
                    self.fail(
                        key,
                        "the file it names holds no PEM certificates (-----BEGIN "
                        "CERTIFICATE-----); it cannot be used as a CA bundle",
                    )
                self.fail(key, str(exc))  # a file SSL_CERT_FILE or REQUESTS_CA_BUNDLE names
        return path

    @overload
    def secret(self, key: str, *, required: Literal[True]) -> Secret: ...
    @overload
    def secret(self, key: str, *, required: bool) -> Secret | None: ...
    def secret(self, key: str, *, required: bool) -> Secret | None:
        """``key``, or the text of the file ``<key>_file`` names; None when neither is given
        (a ConfigError when ``required``)."""
        file_key = f"{key}_file"
        inline, from_file = self.has(key), self.has(file_key)
        if inline and from_file:
            self.fail(key, f"give either {key} or {file_key}, not both")
        if self.offline and (inline or from_file):
            self.used.update((key, file_key))
            return Secret(_STAND_INS.get(key, _STAND_IN))
        if from_file:
            name = self.text(file_key)  # a ConfigError of its own when it is not a string
            try:
                return Secret(read_file(self.base_dir, name, secret=True))
            except ValueError as exc:
                self.fail(file_key, str(exc))
        if inline:
            self.used.add(key)
            value = self.data[key]
            if not isinstance(value, str):
                # YAML reads an unquoted 0755 as 493 and 1_000 as 1000: never guess a secret.
                self.fail(key, f"expected a string, got {kind(value)}; put the value in quotes")
            return Secret(self.expand(key, value))
        self.used.update((key, file_key))
        if required:
            self.required(key, f"is required (or {file_key} naming a file that holds it)")
        return None

    def section(self, key: str) -> Section | None:
        value = self.raw(key, None)
        if value is None:
            return None
        return self.child(value, self.where(key))

    def done(self) -> None:
        """Every key was read: any other is unknown (with the close match it may be a typo of)."""
        unknown = [key_name(k) for k in self.data if k not in self.used]
        if not unknown:
            return
        if len(unknown) == 1 and (hint := suggestion(unknown[0], self.used)):
            self._fail(self.path, f"unknown key {unknown[0]}{hint}")
        names = ", ".join(
            f"{name} (did you mean {close}?)" if (close := _closest(name, self.used)) else name
            for name in unknown
        )
        plural = "s" if len(unknown) > 1 else ""
        known = ", ".join(sorted(self.used))
        self._fail(self.path, f"unknown key{plural} {names}; known keys here: {known}")


def _closest(name: str, known: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return close[0] if close else None


def _plain(number: float) -> str:
    """A number as people write it: 1048576, not 1.04858e+06; 0.5 stays 0.5."""
    if float(number).is_integer():
        return str(int(number))
    return f"{number:g}"


def kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "true/false", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )


def parse_address(section: Section, key: str, value: str) -> str:
    """The addr-spec of ``value`` (``Name <a@b>`` or ``a@b``), or a ConfigError."""
    address = email.utils.parseaddr(value)[1]
    if "@" not in address or not address.partition("@")[0] or " " in address:
        section.fail(
            key, f"{shown(value)} is not an email address; write it like noreply@example.com"
        )
    return address


def missing(
    data: Any, env: Mapping[str, str], base_dir: Path, *, offline: bool = False
) -> list[ConfigError]:
    """Every ``${VAR}`` that is not set and every ``*_file`` that cannot be read, anywhere in
    the document: a new config usually lacks several, and each should not take a run of its
    own to find. (``credentials.key_file`` is left to the credentials module: the environment
    may give the key instead.) ``offline``: secrets and CA files are not needed (``Section``)."""
    found: dict[str, ConfigError] = {}  # one per variable and per file, in document order
    for path, value in walk(data):
        if not isinstance(value, str):
            continue
        if offline and path.rpartition(".")[2] in _UNREAD_OFFLINE:
            continue
        unset = [name for name in _ENV_RE.findall(value) if name not in env]
        for name in unset:
            problem = f"environment variable {name} is not set; export it or edit the file"
            found.setdefault(f"${name}", ConfigError(path, problem))
        key = path.rpartition(".")[2]
        if key not in KEYS or not key.endswith("_file") or key == "key_file" or unset:
            continue
        if any(c in value for c in "\r\n\0") or not value.strip():
            continue  # the getters say what is wrong with it
        name = _ENV_RE.sub(lambda m: env[m.group(1)], value)
        seen = str((base_dir / name).resolve())
        if seen not in found:
            try:
                read_file(base_dir, name, secret=key != "ca_file")
            except ValueError as exc:
                found[seen] = ConfigError(path, str(exc))
    return list(found.values())
