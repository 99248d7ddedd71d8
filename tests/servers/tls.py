"""A session-wide test CA (trustme) and a server certificate for 127.0.0.1 / localhost."""

from __future__ import annotations

import atexit
import functools
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trustme

SERVER_IDENTITIES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class ServerCertFiles:
    """Paths of the PEM files a TLS server needs."""

    cert: Path  # server certificate followed by its chain
    key: Path  # private key


@functools.cache
def ca() -> trustme.CA:
    """The test CA, created once per process."""
    return trustme.CA()


@functools.cache
def server_cert() -> trustme.LeafCert:
    """The server certificate for 127.0.0.1 and localhost, signed by `ca()`."""
    return ca().issue_cert(*SERVER_IDENTITIES)


def write_ca(directory: Path) -> Path:
    """Write the CA certificate PEM into `directory`; return its path."""
    path = directory / "ca.pem"
    ca().cert_pem.write_to_path(str(path))
    return path


def write_server_cert(directory: Path) -> ServerCertFiles:
    """Write the server certificate chain and key PEMs into `directory`."""
    cert, key = directory / "server.crt", directory / "server.key"
    leaf = server_cert()
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return ServerCertFiles(cert=cert, key=key)


@functools.cache
def ca_file() -> Path:
    """A process-wide CA PEM file (in a temp dir), for clients that need a path."""
    directory = Path(tempfile.mkdtemp(prefix="mailroom-ca-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return write_ca(directory)


def client_ssl_context() -> ssl.SSLContext:
    """A client context that trusts only the test CA (hostname checks on)."""
    return ssl.create_default_context(cafile=str(ca_file()))


def server_ssl_context() -> ssl.SSLContext:
    """A server context presenting the test server certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert().configure_cert(ctx)
    return ctx
