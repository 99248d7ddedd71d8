"""A reader for the one Ruby ``Marshal`` value GitLab's encrypted settings hold: a String.

``ActiveSupport::MessageEncryptor`` serializes with ``Marshal.dump`` by default, so the plaintext
of ``incoming_email.yaml.enc`` is Marshal format 4.8 of the YAML text. This reads exactly that
subset and refuses everything else: it builds no objects and runs nothing, so a crafted file can
at worst be refused. Linear in the input.

The subset (Ruby's marshal.c, ``w_object``)::

    "\\x04\\x08" '"' <len> <bytes>                         a binary (ASCII-8BIT) String
    "\\x04\\x08" 'I' '"' <len> <bytes> <1> ':' <len> "E" ('T' | 'F')   UTF-8 | US-ASCII
    "\\x04\\x08" 'I' '"' <len> <bytes> <1> ':' <len> "encoding" '"' <len> <name>
"""

from __future__ import annotations

__all__ = ["MarshalError", "load_string"]

_VERSION = b"\x04\x08"


class MarshalError(ValueError):
    """Not a Ruby Marshal dump of one String."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MarshalError("truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def length(self) -> int:
        """A non-negative Marshal long (marshal.c ``w_long``)."""
        c = int.from_bytes(self.take(1), "little", signed=True)
        if c == 0:
            return 0
        if c > 4:  # small numbers are stored as n + 5 in one byte
            return c - 5
        if c > 0:  # 1..4 little-endian bytes follow
            return int.from_bytes(self.take(c), "little")
        raise MarshalError("negative length")

    def string(self) -> bytes:
        return self.take(self.length())


def load_string(data: bytes) -> str:
    """The text of ``data``, a ``Marshal.dump`` of one Ruby String; ``MarshalError`` otherwise."""
    reader = _Reader(data)
    if reader.take(2) != _VERSION:
        raise MarshalError("not Ruby Marshal format 4.8")
    tag = reader.byte()
    if tag == ord('"'):
        raw, encoding = reader.string(), "utf-8"  # binary: GitLab writes UTF-8 YAML text
    elif tag == ord("I"):
        if reader.byte() != ord('"'):
            raise MarshalError("not a String")
        raw = reader.string()
        if reader.length() != 1:  # a String carries exactly its encoding
            raise MarshalError("unexpected instance variables")
        if reader.byte() != ord(":"):
            raise MarshalError("unexpected instance variable")
        name = reader.string()
        if name == b"E":
            flag = reader.byte()
            if flag not in (ord("T"), ord("F")):
                raise MarshalError("unexpected encoding flag")
            encoding = "utf-8" if flag == ord("T") else "ascii"
        elif name == b"encoding":
            if reader.byte() != ord('"'):
                raise MarshalError("unexpected encoding name")
            encoding = reader.string().decode("ascii", "replace")
        else:
            raise MarshalError("unexpected instance variable")
    else:
        raise MarshalError("not a String")
    if reader.pos != len(data):
        raise MarshalError("trailing data")
    try:
        return raw.decode(encoding)  # text encodings only: bytes.decode refuses "zlib" & co.
    except (LookupError, UnicodeDecodeError) as exc:
        raise MarshalError(f"text not in its encoding ({encoding})") from exc
