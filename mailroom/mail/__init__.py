"""What a message is and who it is for: pure logic, no I/O.

``message`` turns raw bytes into a ``ParsedMessage`` without ever raising on bad mail, ``mime``
reads MIME parameters in linear time and caps what one message may hold, ``authresults`` reads
Authentication-Results, ``routing`` finds the key (or the reason to reject or ignore), and
``decision`` is the dispatcher's whole decision on one message. Every function takes values and
returns values. May import: the shared utilities (``errors``, ``logs``) only; not ``config``,
which builds on ``routing``'s types.
"""
