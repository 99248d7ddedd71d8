"""Credentials and identity: whom mailroom trusts and how it proves who it is.

``tls`` is the one trust rule for every TLS client; ``proxies`` which proxy an HTTP request
takes; ``tokens`` the token cache every provider shares, ``http`` the HTTP session they hand
their libraries (the only requests importer, imported on a provider's first token); ``entra``
(the only msal importer) and ``google`` (the only google-auth importer) the OAuth token
providers, ``providers`` their registry; ``credentials`` the encrypted credentials file.
May import: the shared utilities only: ``config`` hands values in (it builds on this package's
value types, ``oauth``).
"""
