"""RFC 8601 Authentication-Results: did the receiving server authenticate the sender?

``notices`` asks before it sends a reject notice with ``require_authenticated_sender``: only
the receiving server's own header counts (RFC 8601 §5: the ones below may be forged). Pure: no
I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailroom.mail.message import ParsedMessage

__all__ = [
    "MAX_AUTH_RESULTS_CHARS",
    "AuthResult",
    "authenticated_sender",
    "parse_authentication_results",
]

MAX_AUTH_RESULTS_CHARS = 8_192
# RFC 8601 §2.2 lexemes: comments nest, quoted strings may escape; each alternative starts with a
# distinct character, so the scan is linear.
_AR_TOKEN = re.compile(r'[()]|"(?:[^"\\]|\\.)*"?|[;=]|[^\s()";=]+')


@dataclass(frozen=True, slots=True)
class AuthResult:
    """One ``method=result`` of an Authentication-Results header with its properties."""

    method: str
    result: str
    properties: tuple[tuple[str, str], ...] = ()

    def prop(self, name: str) -> str | None:
        return next((v for k, v in self.properties if k == name), None)


def parse_authentication_results(value: str) -> tuple[str, tuple[AuthResult, ...]]:
    """The authserv-id and results of one Authentication-Results value (RFC 8601 §2.2).

    Comments are dropped and quoted strings unquoted; whatever cannot be read is skipped.
    """
    clauses: list[list[str]] = [[]]
    depth = 0
    for token in _AR_TOKEN.findall(value[:MAX_AUTH_RESULTS_CHARS]):
        if token in "()":  # RFC 5322 §3.2.2 comments nest
            depth = max(depth + (1 if token == "(" else -1), 0)
        elif depth:
            continue
        elif token == ";":
            clauses.append([])
        else:
            clauses[-1].append(token[1:].removesuffix('"') if token[0] == '"' else token)
    authserv_id = clauses[0][0].lower() if clauses[0] else ""
    results = []
    for clause in clauses[1:]:
        pairs = [
            (clause[i - 1].lower(), clause[i + 1])
            for i in range(1, len(clause) - 1)
            if clause[i] == "=" and clause[i - 1] != "="
        ]
        if not pairs or "." in pairs[0][0]:
            continue
        method = pairs[0][0].split("/", 1)[0]  # RFC 8601 §2.2: method may carry "/version"
        props = tuple((k, v) for k, v in pairs[1:] if "." in k)
        results.append(AuthResult(method, pairs[0][1].lower(), props))
    return authserv_id, tuple(results)


def _domain(address: str | None) -> str:
    return (address or "").rpartition("@")[2].strip().strip(">").lower()


def _aligned(a: str, b: str) -> bool:
    # RFC 7489 §3.1.1 relaxed alignment compares organisational domains; "the same domain or a
    # subdomain of the other" approximates it without a public-suffix list.
    if "." not in a or "." not in b:
        return False
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def authenticated_sender(
    parsed: ParsedMessage, *, authserv_ids: frozenset[str] = frozenset()
) -> bool:
    """True when a trusted Authentication-Results shows dmarc=pass, or spf=pass with an
    smtp.mailfrom domain aligned with the From domain.

    Trusted: the headers whose authserv-id is in ``authserv_ids``; when that is empty, only the
    topmost one (added last, by the receiving server; RFC 8601 §5: the ones below may be forged).
    """
    from_domain = _domain(parsed.from_.address if parsed.from_ else None)
    if not from_domain:
        return False
    values = parsed.authentication_results
    ids = {i.lower() for i in authserv_ids}
    for value in values if ids else values[:1]:
        authserv_id, results = parse_authentication_results(value)
        if ids and authserv_id not in ids:
            continue
        for result in results:
            if result.result != "pass":
                continue
            if result.method == "dmarc":
                header_from = (result.prop("header.from") or from_domain).lower()
                if header_from == from_domain:
                    return True
            if result.method == "spf" and _aligned(
                _domain(result.prop("smtp.mailfrom")), from_domain
            ):
                return True
    return False
