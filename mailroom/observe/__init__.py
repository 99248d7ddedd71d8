"""What is happening: events in, health and metrics out.

``monitor`` is the one narrow interface the sources, the dispatcher and the coordinator report
through (``Monitor``: events typed by its enums, such as ``SourceState``, each cheap and never
raising). ``health`` records them as
per-mailbox and per-webhook state and readiness and logs each change once; ``metrics`` is the
Prometheus registry. Nothing here calls back into the delivery path. May import: ``config``,
``mail`` (its rule names), ``envelope`` and the shared utilities.
"""
