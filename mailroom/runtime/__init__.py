"""What runs it: the process around the stages.

``supervisor`` owns the TaskGroup, the signals, reload and the bounded, ordered shutdown;
``running`` the mailboxes of a run (start, stop, abort, the two-phase reload); ``resources``
what sources share, built once per key (budget, connect limit, token providers, HTTP sessions,
TLS contexts); ``health_server`` the HTTP endpoints (/healthz, /readyz, /metrics). May import
every stage below it: ``sources``, ``delivery``, ``arbitration``, ``observe``, ``config``,
``trust``, ``mail`` and the shared utilities.
"""
