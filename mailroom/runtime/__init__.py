"""What runs it: the process around the stages.

``supervisor`` owns the TaskGroup, the signals, reload and the bounded, ordered shutdown;
``running`` the mailboxes of a run (start, stop, abort, the two-phase reload); ``resources``
what sources share, built once per key (budget, connect limit, token providers, HTTP sessions,
TLS contexts), and ``SourceKinds``, what this floor asks of the kinds of source, which the
command line hands down (``mailroom.kinds.KINDS``: no kind is known here); ``health_server`` the
HTTP endpoints (/healthz, /readyz, /metrics). May import every stage below it: ``sources``,
``delivery``, ``arbitration``, ``observe``, ``config``, ``trust``, ``mail`` and the shared
utilities.
"""
