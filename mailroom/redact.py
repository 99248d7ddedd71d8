"""What may be shown of text that others chose or that may hold a secret.

Log lines, errors, health reasons and terminal output show strangers' text (a server's answer,
a key of a config file, a URL) only through these: one line, bounded, nothing that could be a
credential.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

__all__ = ["WORD", "error_text", "key_name", "origin", "printable"]

WORD = re.compile(r"[^\s\x00-\x1f\x7f]{1,40}")  # what an error may quote: a short single word
# A URL in someone else's error text: a scheme of at most 16 characters (linear: no scan of a
# long word from every position), "://", and everything up to a space or a quote.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,15}://[^\s'\"<>]*")
ERROR_CHARS = 300  # of an error text others built


def printable(text: str, limit: int, *, blank: bool = False) -> str:
    """Text someone else chose, fit for one line of a log or a terminal: at most ``limit``
    characters (then ``…``), each that is not printable (line breaks, control and format
    characters such as escape sequences, lone surrogates) shown as ``?``, or with ``blank`` as
    a space (then stripped)."""
    shown = "".join(c if c.isprintable() else " " if blank else "?" for c in text[: limit + 1])
    if blank:
        shown = shown.strip()
    return shown if len(shown) <= limit else shown[:limit] + "…"


def error_text(exc: BaseException, *urls: str) -> str:
    """``ClassName: text`` of an error that someone else's code built (aiohttp's, say), fit
    to be logged, raised or shown as a health reason: every URL in it as ``scheme://host:port``
    (its ``user:password@``, path, ``?query`` and ``#fragment`` can hold a credential: a
    receiver's token), and the parts of ``urls`` (the URLs it is about) that could, wherever
    they appear on their own; one line, at most ``ERROR_CHARS`` characters."""
    text = str(exc)[: ERROR_CHARS * 8]
    text = _URL.sub(lambda match: origin(match.group()), text)
    for url in urls:
        for secret in _secret_parts(url):
            text = text.replace(secret, "…")
    shown = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return printable(shown, ERROR_CHARS, blank=True)


def _secret_parts(url: str) -> list[str]:
    """What of ``url`` may be a credential, longest first: its userinfo, path, query and
    fragment (those of four characters or more: shorter ones would blank out ordinary text)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    userinfo = parts.netloc.rpartition("@")[0]
    found = [userinfo, parts.path, parts.query, parts.fragment]
    found += [unquote(x) for x in found]
    return sorted({x for x in found if len(x) >= 4}, key=len, reverse=True)


def key_name(key: Any) -> str:
    """A key as an error shows it: itself when it is a short word (every key mailroom knows
    is one), else only what it is (a secret may have ended up as a key)."""
    if isinstance(key, str):
        return key if WORD.fullmatch(key) else f"<a key of {len(key)} characters>"
    return f"<a key of type {type(key).__name__}>"


def origin(url: str) -> str:
    """``scheme://host:port`` of ``url``: what may be shown of it (a path or query, or a
    ``user:password@``, can hold a credential). A port that is not a number is shown as ?."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(not a URL)"
    host = parts.hostname or ""
    try:
        port: int | str | None = parts.port
    except ValueError:
        port = _port_text(parts)
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    scheme = parts.scheme if WORD.fullmatch(parts.scheme or "-") else "?"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def _port_text(parts: SplitResult) -> str:
    hostport = parts.netloc.rpartition("@")[2].rpartition("]")[2]
    text = hostport.rpartition(":")[2] if ":" in hostport else ""
    return text if text.isdigit() and len(text) <= 10 else "?"
