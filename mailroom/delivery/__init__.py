"""Where a message goes: the dispatcher and everything after the decision.

``dispatch`` takes each ``Envelope`` to an outcome: delivered markers (``markers``), the
decision (``mail.decision``), the webhook contract (``webhook``: payload, headers, signature,
what answers mean), posting with slots, retries and a circuit per webhook (``posting``,
``circuit``), reject notices (``notices``: pure; ``reject``: the only aiosmtplib importer), then
``Envelope.settle``. May import: ``mail``, ``envelope``, ``config``, ``trust``, ``observe`` and
the shared utilities; never ``sources`` (it knows nothing of IMAP or Graph).
"""
