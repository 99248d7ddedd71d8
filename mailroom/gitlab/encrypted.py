"""GitLab's encrypted settings (``incoming_email.yaml.enc``, ``service_desk_email.yaml.enc``),
read the way GitLab writes them (``Gitlab::EncryptedConfiguration``, made by
``gitlab-rake gitlab:incoming_email:secret:write``).

- The key: ``ActiveSupport::KeyGenerator.new(base_key).generate_key("GitLabEncryptedConfigSalt",
  32)``, PBKDF2-HMAC with 2**16 iterations over ``encrypted_settings_key_base`` from secrets.yml.
  The digest is ``KeyGenerator.hash_digest_class``: SHA1, ActiveSupport's default. GitLab keeps
  it (``config.active_support.key_generator_hash_digest_class = nil`` under ``load_defaults
  7.0`` in config/application.rb), and MailRoom, which reads these files, runs without Rails.
  SHA256 (the Rails 7.0 default GitLab opted out of) is tried second: the tag authenticates
  either way, so trying it costs a key derivation and never a wrong answer.
- The file: ``MessageEncryptor.new(key, cipher: "aes-256-gcm").encrypt_and_sign(yaml)``, i.e.
  ``base64(ciphertext) "--" base64(iv) "--" base64(auth tag)``, a 12-byte IV, a 16-byte tag, no
  associated data (NIST SP 800-38D).
- The plaintext: the YAML text serialized by MessageEncryptor's default serializer, Marshal
  (``default_message_encryptor_serializer = :marshal``; GitLab does not configure another). A
  JSON string (Rails 7.1's ``:json`` serializers) is read too. See ``marshal``.
- Rotation: ``rotated_encrypted_settings_key_base`` keys are tried after the current one, as
  ``MessageEncryptor#rotate`` does.

Errors are ``ValueError`` with a message naming the file, never a key or a value.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mailroom.config.document import load as load_yaml
from mailroom.config.reader import read_regular
from mailroom.errors import ConfigError
from mailroom.gitlab.marshal import MarshalError, load_string

__all__ = ["derive_key", "read_settings"]

SALT = b"GitLabEncryptedConfigSalt"
ITERATIONS = 2**16  # ActiveSupport::KeyGenerator's default
KEY_BYTES = 32  # MessageEncryptor.key_len("aes-256-gcm")
DIGESTS = ("sha1", "sha256")  # GitLab's first; see the module docstring
IV_BYTES, TAG_BYTES = 12, 16
MIN_BASE_KEY = 16  # Gitlab::EncryptedConfiguration.generate_key: 'Base key too small'
MAX_FILE_BYTES = 1 << 20  # settings are a few lines; refuse to read a huge file into memory


def derive_key(base_key: str, digest: str = "sha1") -> bytes:
    """``ActiveSupport::KeyGenerator.new(base_key).generate_key(SALT, 32)``."""
    return hashlib.pbkdf2_hmac(digest, base_key.encode(), SALT, ITERATIONS, KEY_BYTES)


def _parts(data: bytes, name: str) -> tuple[bytes, bytes, bytes]:
    damaged = ValueError(
        f"{name} is not an encrypted settings file as GitLab writes it (base64--base64--base64); "
        "write it again with gitlab-rake gitlab:incoming_email:secret:write (or "
        "gitlab:service_desk_email:secret:write)"
    )
    try:
        fields = data.decode("ascii").strip().split("--")
        if len(fields) != 3:
            raise damaged
        ciphertext, iv, tag = (base64.b64decode(f, validate=True) for f in fields)
    except (UnicodeDecodeError, binascii.Error):
        raise damaged from None
    if len(iv) != IV_BYTES or len(tag) != TAG_BYTES:
        raise damaged
    return ciphertext, iv, tag


def decrypt(data: bytes, base_keys: Sequence[str], *, name: str) -> str:
    """The YAML text in ``data`` (the content of the file ``name``), decrypted with the first of
    ``base_keys`` (the current key, then the rotated ones) that authenticates it."""
    # here: cryptography, 9 MiB at start where no encrypted settings are read
    from cryptography.exceptions import InvalidTag  # noqa: PLC0415
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: PLC0415

    ciphertext, iv, tag = _parts(data, name)
    for base_key in base_keys:
        if len(base_key) < MIN_BASE_KEY:
            raise ValueError(
                f"an encrypted_settings_key_base for {name} is shorter than {MIN_BASE_KEY} "
                "characters, which GitLab refuses too; restore the key GitLab generated"
            )
        for digest in DIGESTS:
            try:
                plain = AESGCM(derive_key(base_key, digest)).decrypt(iv, ciphertext + tag, None)
            except InvalidTag:
                continue
            return _deserialize(plain, name)
    rotated = len(base_keys) - 1
    tried = f" (nor with the {rotated} rotated keys)" if rotated > 0 else ""
    raise ValueError(
        f"{name} does not decrypt with encrypted_settings_key_base{tried}: the key is not the "
        "one the file was written with. Use GitLab's secrets.yml (or the old key under "
        "rotated_encrypted_settings_key_base), or write the file again with gitlab-rake"
    )


def _deserialize(plain: bytes, name: str) -> str:
    try:
        if plain.startswith(b"\x04\x08"):
            return load_string(plain)
        text = json.loads(plain)
        if isinstance(text, str):
            return text
    except (MarshalError, ValueError):
        pass
    raise ValueError(
        f"{name} decrypts, but does not hold text as GitLab writes it (a Marshal or JSON string)"
    )


def read_settings(path: Path, base_keys: Sequence[str]) -> dict[str, Any]:
    """The decrypted settings in ``path``: ``{"user": ..., "password": ...}`` and whatever else
    it holds, keys without the leading ``:`` of Ruby symbols."""
    try:
        data = read_regular(path, MAX_FILE_BYTES)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise ValueError(
                f"{path} is over {MAX_FILE_BYTES} bytes: not an encrypted settings file"
            ) from exc
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    text = decrypt(data, base_keys, name=str(path))
    try:
        document = load_yaml(text, str(path))
    except ConfigError:
        # never what PyYAML says: it quotes the text, which holds the password
        raise ValueError(
            f"{path} decrypts, but is not valid YAML; fix it with gitlab-rake "
            "gitlab:incoming_email:secret:edit (or gitlab:service_desk_email:secret:edit)"
        ) from None
    if document is None:
        return {}  # GitLab: YAML.safe_load(...).presence || {}
    if not isinstance(document, dict):
        raise ValueError(f"{path} decrypts, but is not a mapping of settings (user, password)")
    return {str(key).removeprefix(":"): value for key, value in document.items()}
