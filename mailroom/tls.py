"""TLS client contexts, one way for every connection mailroom makes (IMAP, webhook, SMTP)."""

from __future__ import annotations

import ssl

__all__ = ["client_context"]


def client_context(*, ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """The system's trust store plus ``ca_file`` (a private CA), hostname checked.

    ``verify=False`` turns verification off entirely (the config's ``tls_verify: false``): for
    a throwaway test server only, never for production mail.
    """
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
