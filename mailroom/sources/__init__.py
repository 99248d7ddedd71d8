"""Where mail comes from: the source lifecycle and one module per kind of source.

``lifecycle.Source`` is what every source shares (supervision and backoff, the in-flight set,
settlement, release); ``budget`` the process-wide in-flight budget a source reserves before it
fetches. ``imap`` (with ``imap_session``, the only aioimaplib importer, and ``imap_wire``, pure
IMAP syntax) and ``graph`` (with ``graph_client``) are the kinds. A source hands each message to
the dispatcher as an ``Envelope`` and settles it when told. May import: ``envelope``,
``config``, ``trust``, ``observe`` and the shared utilities; never ``delivery`` (sources know
nothing of webhooks).
"""
