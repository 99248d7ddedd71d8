"""TCP and TLS for ``mailroom check``: connect, describe the certificate, say what to do."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import time

from mailroom.check.report import Failed, Finding, Status

__all__ = ["CONNECT_TIMEOUT_S", "certificate", "close", "is_loopback", "open_connection", "tcp"]

CONNECT_TIMEOUT_S = 10.0  # TCP and TLS, per attempt
CERT_EXPIRY_WARN_DAYS = 14


async def open_connection(
    host: str, port: int, context: ssl.SSLContext | None, what: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP (and TLS) connection, or ``Failed`` saying why and what to do."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            return await asyncio.open_connection(
                host, port, ssl=context, server_hostname=host if context else None
            )
    except ssl.SSLCertVerificationError as exc:
        raise Failed(
            f"certificate of {host} not trusted ({exc.verify_message}); "
            f"set {what}ca_file to the CA that signed it"
        ) from exc
    except ssl.SSLError as exc:
        raise Failed(f"TLS handshake with {host}:{port} failed ({exc.reason}); is it TLS?") from exc
    except TimeoutError as exc:
        raise Failed(
            f"no answer from {host}:{port} within {CONNECT_TIMEOUT_S:g}s; a firewall dropping "
            "packets, or the wrong host?"
        ) from exc
    except socket.gaierror as exc:
        raise Failed(f"cannot resolve {host}: {exc.strerror}; check the host name") from exc
    except OSError as exc:
        # asyncio's own text is "Connect call failed (host, port)"; the errno says why.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise Failed(
            f"cannot connect to {host}:{port}: {reason}; is the server running, "
            "and is the port right?"
        ) from exc


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError):
        pass  # the peer may drop the connection first; nothing to report


async def tcp(host: str, port: int) -> Finding:
    _, writer = await open_connection(host, port, None, "")
    peer = writer.get_extra_info("peername")
    await close(writer)
    address = f" ({peer[0]})" if peer and peer[0] != host else ""
    return Status.OK, f"{host}:{port}{address} accepts connections"


def _names(pairs: object) -> dict[str, str]:
    """``getpeercert()``'s subject/issuer: a tuple of RDNs, each a tuple of (name, value)."""
    found: dict[str, str] = {}
    if isinstance(pairs, tuple):
        for rdn in pairs:
            for name, value in rdn:
                found.setdefault(name, value)
    return found


def certificate(layer: ssl.SSLObject | None, *, verified: bool, how: str) -> Finding:
    """Describe the peer's certificate; WARN when unverified or about to expire."""
    if layer is None:
        return Status.FAIL, "no TLS layer on the connection"
    version = layer.version() or "TLS"
    if not verified:
        return Status.WARN, f"{how}, {version}; certificate NOT verified (tls_verify: false)"
    cert = layer.getpeercert() or {}
    subject, issuer = _names(cert.get("subject")), _names(cert.get("issuer"))
    alt_names = [str(pair[1]) for pair in cert.get("subjectAltName", ()) if len(pair) == 2]
    name = subject.get("commonName") or (alt_names[0] if alt_names else "?")
    by = issuer.get("commonName") or issuer.get("organizationName") or "?"
    detail = f"{how}, {version}; certificate for {name} verified, issued by {by}"
    not_after = cert.get("notAfter")
    if isinstance(not_after, str):
        expires = ssl.cert_time_to_seconds(not_after)
        days = int((expires - time.time()) // 86400)
        day = time.strftime("%Y-%m-%d", time.gmtime(expires))
        if days < CERT_EXPIRY_WARN_DAYS:
            return Status.WARN, f"{detail}; it expires on {day}, in {days} days: renew it"
        detail += f", valid until {day}"
    return Status.OK, detail


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
