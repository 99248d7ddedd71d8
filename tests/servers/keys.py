"""RSA keys and self-signed certificates for the mock identity providers' credentials: an
Entra ID app's certificate, a Google service account's key. Made once per process and name
(a 2048-bit key takes a while)."""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class KeyPair:
    """A private key, its self-signed certificate and what a config or a server wants of them."""

    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @property
    def key_pem(self) -> str:
        """The private key, PKCS#8 PEM, unencrypted."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()

    @property
    def certificate_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def thumbprint(self) -> str:
        """SHA-1 of the certificate (DER), upper-case hex: what the Entra portal shows."""
        return self.certificate.fingerprint(hashes.SHA1()).hex().upper()


@functools.cache
def key_pair(name: str = "app", bits: int = 2048) -> KeyPair:
    """An RSA key and a self-signed certificate for it (CN=``name``), valid for a year."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return KeyPair(key=key, certificate=certificate)
