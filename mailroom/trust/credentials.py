"""Encrypted mailbox credentials: ``user`` and ``password`` per mailbox id, outside the config.

The file is one line of ASCII, so it can live in git, a ConfigMap or a Secret::

    mailroom-credentials:v1:<key id>:<base64(nonce | AES-256-GCM ciphertext and tag)>

- AES-256-GCM from ``cryptography`` (NIST SP 800-38D), with a fresh random 96-bit nonce on every
  write: a nonce must never repeat under one key (§8). The header before the last colon is the
  associated data, so a changed version or key id fails authentication as well.
- The key is 32 random bytes, base64, from ``MAILROOM_CREDENTIALS_KEY`` or a key file. The key
  id (SHA-256 over a label and the key, 16 hex digits) tells a wrong key apart from a changed
  file and reveals nothing usable about the key.
- The plaintext is YAML, kept as written (comments too):
  ``{<mailbox id>: {user: ..., password: ...}}``.

Errors are ``CredentialsError``; they name files, key sources and key ids, never a secret.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mailroom.errors import CredentialsError
from mailroom.redact import key_name

__all__ = [
    "KEY_ENV",
    "Key",
    "StoredLogin",
    "decrypt",
    "edit",
    "encrypt",
    "generate_key",
    "key_file_warning",
    "load_key",
    "parse_logins",
    "read",
    "read_text",
    "write_key_file",
    "write_text",
]

KEY_ENV = "MAILROOM_CREDENTIALS_KEY"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's 96-bit IV (SP 800-38D §8.2)
MAGIC = "mailroom-credentials"
VERSION = "v1"
_KEY_ID_LABEL = b"mailroom credentials key id\0"
_FIELDS = ("user", "password")
_GENERATE = "mailroom credentials generate-key"

TEMPLATE = """\
# mailroom credentials: user and password per mailbox id (the `id` of a mailbox in the config).
# A mailbox takes its user and password from here when the config gives none.
# This text is encrypted when the editor exits; the file on disk is never plain text.
#
# incoming:
#   user: incoming@example.com
#   password: "correct horse battery staple"
"""


@dataclass(frozen=True, slots=True)
class Key:
    """A credentials key and where it came from (for error messages)."""

    value: bytes = field(repr=False)
    source: str  # "MAILROOM_CREDENTIALS_KEY" or "key file /path"

    @property
    def id(self) -> str:
        """A public fingerprint: equal ids mean equal keys."""
        return hashlib.sha256(_KEY_ID_LABEL + self.value).hexdigest()[:16]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredLogin:
    """One mailbox's entry; a field left out is taken from the config."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)


def generate_key() -> str:
    """A new random key, base64."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def write_key_file(path: Path) -> None:
    """Write a new key to ``path`` with mode 0600; never overwrite an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CredentialsError(
            f"{path} exists; not overwritten (a new key cannot decrypt what the old one "
            "encrypted). Choose another path or remove it first."
        ) from None
    except OSError as exc:
        raise CredentialsError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(generate_key() + "\n")


def _decode_key(text: str, source: str) -> Key:
    try:
        value = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        value = b""
    if len(value) != KEY_BYTES:
        raise CredentialsError(
            f"the key from {source} is not base64 of {KEY_BYTES} bytes; make one with {_GENERATE}"
        )
    return Key(value, source)


def load_key(*, key_file: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Key:
    """The key from ``MAILROOM_CREDENTIALS_KEY`` when set, else from ``key_file``."""
    if env.get(KEY_ENV, "").strip():
        return _decode_key(env[KEY_ENV], KEY_ENV)
    if key_file is None:
        raise CredentialsError(
            f"no key: set {KEY_ENV}, or credentials.key_file to a key file "
            f"(make one with: {_GENERATE} --key-file FILE)"
        )
    try:
        text = Path(key_file).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not base64 text"
        raise CredentialsError(f"cannot read key file {key_file}: {reason}") from exc
    return _decode_key(text, f"key file {key_file}")


def key_file_warning(key_file: str | os.PathLike[str]) -> str | None:
    """Advice when a key file can be read by other users than its owner."""
    try:
        mode = os.stat(key_file).st_mode & 0o777
    except OSError:
        return None
    if mode & 0o077:
        return f"key file {key_file} has mode {mode:04o}; chmod 600 it"
    return None


def _header(key: Key) -> str:
    return f"{MAGIC}:{VERSION}:{key.id}"


def encrypt(plaintext: bytes, key: Key) -> bytes:
    """The file content for ``plaintext``, under a fresh nonce."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415  # here: 9 MiB, see decrypt

    header = _header(key)
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key.value).encrypt(nonce, plaintext, header.encode("ascii"))
    return f"{header}:{base64.b64encode(nonce + sealed).decode('ascii')}\n".encode("ascii")


def decrypt(data: bytes, key: Key, *, name: str) -> bytes:
    """The plaintext of file content ``data`` (``name`` says which file, for errors)."""
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    magic, version, key_id, body = ([*text.split(":", 3), "", "", ""])[:4]
    if magic != MAGIC:
        raise CredentialsError(
            f"{name} is not a mailroom credentials file; create it with "
            "mailroom credentials edit -c CONFIG"
        )
    if version != VERSION:
        raise CredentialsError(
            f"{name} has format {version!r}; this mailroom reads {VERSION}: upgrade mailroom"
        )
    if key_id != key.id:
        where = (
            f"{KEY_ENV} is set and wins over credentials.key_file: unset it to use the file"
            if key.source == KEY_ENV
            else f"--key-file, {KEY_ENV} or credentials.key_file"
        )
        raise CredentialsError(
            f"wrong key for {name}: it was encrypted with key id {key_id}, the key from "
            f"{key.source} has key id {key.id}; give the key it was encrypted with ({where})"
        )
    try:
        raw = base64.b64decode(body, validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) < NONCE_BYTES + 16:
        raise CredentialsError(f"{name} is damaged (truncated or not base64); restore it")
    # here, not at start: cryptography, 9 MiB that a config without a credentials file never needs
    from cryptography.exceptions import InvalidTag  # noqa: PLC0415
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    try:
        return AESGCM(key.value).decrypt(
            raw[:NONCE_BYTES], raw[NONCE_BYTES:], f"{MAGIC}:{version}:{key_id}".encode("ascii")
        )
    except InvalidTag:
        raise CredentialsError(
            f"{name} was changed or damaged after it was encrypted (authentication failed); "
            "restore it from a backup or write it anew with mailroom credentials edit"
        ) from None


def parse_logins(text: str) -> dict[str, StoredLogin]:
    """Validate the plaintext YAML; errors name the entry, never a value."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CredentialsError(f"the credentials are not valid YAML{where}") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError):
        # PyYAML's constructors raise what they meet, with the value in the message:
        # `password: !!int hunter2` is ValueError("invalid literal for int() ...: 'hunter2'").
        raise CredentialsError(
            "the credentials hold a value YAML cannot read (a !!tag, or a date that does not "
            "exist); put the value in quotes"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CredentialsError("the credentials must be a mapping: <mailbox id>: {user, password}")
    logins: dict[str, StoredLogin] = {}
    for mailbox_id, entry in data.items():
        if not isinstance(mailbox_id, str | int) or isinstance(mailbox_id, bool):
            raise CredentialsError("a credentials key is not a mailbox id; write `<id>:`")
        where = f"credentials[{mailbox_id}]"
        if not isinstance(entry, dict) or not entry:
            raise CredentialsError(f"{where}: expected a mapping with user and/or password")
        values: dict[str, str] = {}
        for name, value in entry.items():
            if name not in _FIELDS:
                # {user: a, password hunter2} (a colon left out) has the password in a key
                raise CredentialsError(
                    f"{where}.{key_name(name)}: unknown key; known keys: user, password"
                )
            if not isinstance(value, str) or value == "":
                # YAML reads an unquoted 0755 as 493: never guess a password.
                raise CredentialsError(
                    f"{where}.{name}: expected a non-empty string; put the value in quotes"
                )
            values[name] = value
        logins[str(mailbox_id)] = StoredLogin(**values)
    return logins


def read_text(path: Path, key: Key) -> str:
    """The decrypted YAML text of the credentials file ``path``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        hint = "; create it with mailroom credentials edit" if not path.exists() else ""
        raise CredentialsError(f"cannot read {path}: {exc.strerror}{hint}") from exc
    plaintext = decrypt(data, key, name=str(path))
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsError(f"{path} does not hold UTF-8 text") from None


def read(path: Path, key: Key) -> dict[str, StoredLogin]:
    """The logins stored in the credentials file ``path``."""
    return parse_logins(read_text(path, key))


def write_text(path: Path, key: Key, text: str) -> None:
    """Validate and encrypt ``text`` into ``path``, atomically (keeps an existing file's mode)."""
    parse_logins(text)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(encrypt(text.encode("utf-8"), key))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _ask_again(error: CredentialsError) -> bool:
    """Interactive only (like ``crontab -e``): offer to fix an invalid edit instead of losing it."""
    if not sys.stdin.isatty():
        return False
    print(f"mailroom: {error}", file=sys.stderr)
    answer = input("Edit again? (nothing is saved otherwise) [Y/n] ")
    return answer.strip().lower() in ("", "y", "yes")


def _ram_dir() -> str | None:
    """Where the plain text goes: RAM-backed when possible, never written to a disk."""
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return None  # the system's temp directory


@contextlib.contextmanager
def _signals_exit() -> Iterator[None]:
    """SIGHUP (a closed terminal) and SIGTERM raise SystemExit meanwhile, so ``finally`` and
    ``with`` clean up (Python's default for them ends the process at once); then restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, leave)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def edit(
    path: Path,
    key: Key,
    *,
    editor: str,
    ask_again: Callable[[CredentialsError], bool] = _ask_again,
) -> bool:
    """Open the decrypted credentials in ``editor``; encrypt them back. True when saved.

    The plain text lives only in a private temp directory (mode 0700, file 0600; in
    ``$XDG_RUNTIME_DIR`` or ``/dev/shm`` when there is one) that is removed afterwards, whatever
    happens, a SIGHUP or SIGTERM too (the editor is killed first). Nothing is saved when the
    editor fails, when the text did not change, or when it is not valid (unless ``ask_again``
    lets the user fix it).
    """
    original = read_text(path, key) if path.exists() else TEMPLATE
    text = original
    command = shlex.split(editor)
    if not command:
        raise CredentialsError("no editor: set VISUAL or EDITOR")
    with (
        _signals_exit(),
        tempfile.TemporaryDirectory(prefix="mailroom-credentials-", dir=_ram_dir()) as tmp,
    ):
        plain = Path(tmp) / "credentials.yml"
        while True:
            fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            try:
                status = subprocess.run([*command, str(plain)], check=False).returncode
            except OSError as exc:
                raise CredentialsError(
                    f"cannot run the editor {command[0]!r}: {exc.strerror}"
                ) from exc
            if status != 0:
                raise CredentialsError(f"the editor exited with status {status}; nothing saved")
            text = plain.read_text(encoding="utf-8")
            if text == original:
                return False
            try:
                parse_logins(text)
            except CredentialsError as exc:
                if ask_again(exc):
                    continue
                raise CredentialsError(f"{exc}; nothing saved") from None
            write_text(path, key, text)
            return True
