"""The kinds of source mailroom knows: one module each, and one line each in ``KINDS``.

A kind module (``imap``, ``graph``) gathers what the rest of mailroom needs of its kind into a
``registry.Kind``: its config section, its source and what that source shares, its ``mailroom
check``, its ``mailroom redrive`` (or none). Nothing else branches on the kind: ``runtime``,
``check`` and ``redrive`` get ``KINDS`` from the command line (they sit below this floor and
see it only through their own small protocols), and ``observe`` and ``delivery`` read what they
need as values of the mailbox's config (``readiness``, ``dead_letter``). May import every stage
below the command line: ``runtime``, ``check``, ``redrive``, ``sources``, ``config`` and what
they import.
"""

from __future__ import annotations

from mailroom.kinds import graph, imap
from mailroom.kinds.registry import Kind, Kinds

__all__ = ["KINDS", "Kind", "Kinds"]

KINDS = Kinds(
    imap.KIND,
    graph.KIND,
)
