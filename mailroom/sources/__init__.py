"""Where mail comes from: the source lifecycle and one module per kind of source.

``lifecycle.Source`` is what every source shares (supervision and backoff, the in-flight set,
settlement, release, handing over before a stop's drain); ``budget`` the process-wide in-flight
budget a source reserves before it fetches. ``imap`` (with ``imap_session``, the only
aioimaplib importer, and ``imap_wire``, pure IMAP syntax) and ``graph`` (with
``graph_client``) are the pull sources; ``lmtp`` (with ``lmtp_session``, the only aiosmtpd
importer, ``lmtp_wire``, pure LMTP replies, and ``lmtp_socket``) is the push source, whose
settlement is its reply to the MTA. A source hands each message to the dispatcher as an
``Envelope`` and settles it when told. May import: ``envelope``, ``config``, ``trust``,
``observe``, ``mail`` (pure: an LMTP listener matches recipients at RCPT) and the shared
utilities; never ``delivery`` (sources know nothing of webhooks).
"""
