"""TLS client contexts: one trust rule for every connection mailroom makes, built once per key;
and the server context of a listener that offers STARTTLS (``server_context``).

Every TLS client (IMAP, SMTP, webhook, Entra ID, Graph) trusts the same set: the system store,
what ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` / ``REQUESTS_CA_BUNDLE`` name (how users hand a private
or TLS-inspection CA to Python programs), and the config's ``ca_file`` on top. OpenSSL lets
``SSL_CERT_FILE`` *replace* the system file, so the system's own paths are loaded as well.

Building a context costs about 16 ms (it parses the whole system store), so contexts are shared
by key: ``(ca_file, verify)`` plus the identity of the files behind it, so an edited CA file
gets a new context on the next reload. Contexts are never modified after they are built.
"""

from __future__ import annotations

import asyncio.sslproto
import os
import ssl
import threading
from pathlib import Path

__all__ = [
    "TlsConfigError",
    "client_context",
    "server_context",
    "small_read_buffers",
    "trust_sources",
]

# asyncio's TLS transport (Python 3.11+) gives every connection a read buffer of 256 KiB, zeroed
# up front: 1,000 idling IMAP sessions held 280 MiB in them (bench/many_mailboxes.py --tls).
# A TLS record carries at most 16 KiB (RFC 8446 §5.1), so this buffer still takes a whole one.
READ_BUFFER_BYTES = 16 * 1024

_ENV_FILES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
_ENV_DIRS = ("SSL_CERT_DIR",)
_cache: dict[tuple[object, ...], ssl.SSLContext] = {}
_lock = threading.Lock()  # contexts are also built in threads (config load, msal)


class TlsConfigError(ValueError):
    """A CA file (or a variable naming one) cannot be used; ``str()`` says which and why.
    ``ca_file``: it is the config's ``ca_file``, not one the environment or the system names."""

    def __init__(self, message: str, *, ca_file: bool) -> None:
        super().__init__(message)
        self.ca_file = ca_file


def trust_sources(ca_file: str | None = None) -> tuple[list[str], list[str]]:
    """The CA files and directories a context trusts, in the order they are loaded."""
    paths = ssl.get_default_verify_paths()
    files = [paths.openssl_cafile]
    dirs = [paths.openssl_capath]
    files += [os.environ[name] for name in _ENV_FILES if os.environ.get(name)]
    dirs += [
        entry for name in _ENV_DIRS for entry in os.environ.get(name, "").split(os.pathsep) if entry
    ]
    if ca_file:
        files.append(ca_file)
    return list(dict.fromkeys(files)), list(dict.fromkeys(dirs))


def _signature(path: str) -> tuple[object, ...]:
    try:
        stat = os.stat(path)
    except OSError:
        return (path, None)
    return (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def client_context(
    *, ca_file: str | None, verify: bool = True, private: bool = False
) -> ssl.SSLContext:
    """The shared context trusting ``trust_sources(ca_file)``, hostname checked.

    ``private=True`` builds one that is not shared, for a client that changes the contexts it
    is given (urllib3 sets ALPN and the verify mode on them: msal's requests session).

    ``verify=False`` turns verification off entirely (the config's ``tls_verify: false``): for
    a throwaway test server only, never for production mail. ``TlsConfigError`` when
    ``ca_file`` (or a file an environment variable names) holds no usable certificate.
    """
    files, dirs = trust_sources(ca_file)
    if private:
        return _build(files, dirs, ca_file, verify)
    key = (verify, tuple(_signature(f) for f in files), tuple(dirs))
    with _lock:
        context = _cache.get(key)
        if context is None:
            context = _cache[key] = _build(files, dirs, ca_file, verify)
    return context


def _build(files: list[str], dirs: list[str], ca_file: str | None, verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()  # TLS 1.2+, hostname check, the default paths
    for path in files:
        if path != ca_file and not Path(path).is_file():
            continue  # an unset default or a variable naming nothing: the others still count
        try:
            context.load_verify_locations(cafile=path)
        except (ssl.SSLError, OSError, ValueError) as exc:
            what = "ca_file" if path == ca_file else _variable_for(path)
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise TlsConfigError(
                f"{what} {path} cannot be used as a CA bundle ({reason}); it must hold PEM "
                "certificates (-----BEGIN CERTIFICATE-----)",
                ca_file=path == ca_file,
            ) from exc
    for path in dirs:
        if Path(path).is_dir():
            context.load_verify_locations(capath=path)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def server_context(*, cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server's context (the LMTP listener's STARTTLS): its certificate chain and key, TLS 1.2
    or later, no client certificate asked. ``TlsConfigError`` when the files cannot be used."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise TlsConfigError(
            f"the certificate and key cannot be used ({reason}); tls_cert_file must hold the PEM "
            "certificate chain and tls_key_file its unencrypted PEM private key",
            ca_file=False,
        ) from exc
    return context


def _variable_for(path: str) -> str:
    names = [name for name in _ENV_FILES if os.environ.get(name) == path]
    return f"the file named by {names[0]}" if names else "the system CA file"


def small_read_buffers() -> None:
    """Every asyncio TLS connection made from now on reads into ``READ_BUFFER_BYTES``, and
    into one such buffer per thread instead of one per connection.

    asyncio's TLS protocol (Python 3.11: the private ``asyncio.sslproto.SSLProtocol``'s
    ``max_size``, ``get_buffer`` and ``_ssl_buffer``/``_ssl_buffer_view``) reads the socket
    into its buffer and copies what came into OpenSSL's in the same callback
    (``buffer_updated``), so the buffer holds nothing between two reads: one per thread
    serves every connection of that thread's event loop, and 1,000 idle TLS mailboxes hold
    16 MiB less (bench/many_mailboxes.py --tls; issue 23). A Python without these names makes
    this raise (the tests call it) rather than change nothing silently."""
    protocol = asyncio.sslproto.SSLProtocol
    if not isinstance(getattr(protocol, "max_size", None), int) or not callable(
        getattr(protocol, "get_buffer", None)
    ):
        raise RuntimeError("asyncio.sslproto.SSLProtocol has changed: see mailroom/trust/tls.py")
    protocol.max_size = READ_BUFFER_BYTES
    protocol.get_buffer = _thread_buffer  # type: ignore[method-assign]


_buffers = threading.local()


def _thread_buffer(self: asyncio.sslproto.SSLProtocol, n: int) -> memoryview:
    """``SSLProtocol.get_buffer``: this thread's read buffer, which ``buffer_updated`` copies
    from before anything else can read into it."""
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(READ_BUFFER_BYTES))
    # buffer_updated reads what came from these attributes; the connection's own buffer,
    # made when it was, is freed at its first read.
    self._ssl_buffer = view.obj  # type: ignore[attr-defined]
    self._ssl_buffer_view = view  # type: ignore[attr-defined]
    return view
